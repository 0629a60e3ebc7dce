"""Mask-ratio buckets and their queues."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from editing.routing import all_queues, bucket_for, buckets

EDGES = [0.10, 0.25, 0.50, 1.0]


@pytest.mark.parametrize(
    ("ratio", "queue"),
    [(0.0, "edit.m10"), (0.05, "edit.m10"), (0.10, "edit.m10"), (0.11, "edit.m25"), (0.25, "edit.m25"),
     (0.26, "edit.m50"), (0.5, "edit.m50"), (0.51, "edit.m100"), (1.0, "edit.m100")],
)
def test_bucket_for_ratio(ratio, queue):
    assert bucket_for(ratio, EDGES).queue == queue


def test_custom_edges_name_queues():
    assert [bucket.queue for bucket in buckets([0.2, 1.0])] == ["edit.m20", "edit.m100"]


def test_all_queues_includes_control_queue():
    assert all_queues(EDGES)[-1] == "edit.control"
    assert len(all_queues(EDGES)) == 5


@pytest.mark.parametrize("edges", [[], [0.5, 0.2, 1.0], [0.1, 0.5], [0.0, 1.0], [0.3, 0.3, 1.0]])
def test_invalid_edges_are_rejected(edges):
    with pytest.raises(ImproperlyConfigured):
        buckets(edges)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError):
        bucket_for(ratio, EDGES)
