"""Mask-ratio buckets and their queues."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from editing.routing import all_queues, bucket_for, buckets, control_queue

EDGES = [0.10, 0.25, 0.50, 1.0]


@pytest.mark.parametrize(
    ("ratio", "queue"),
    [(0.0, "edit.flux.m10"), (0.05, "edit.flux.m10"), (0.10, "edit.flux.m10"), (0.11, "edit.flux.m25"),
     (0.25, "edit.flux.m25"), (0.26, "edit.flux.m50"), (0.5, "edit.flux.m50"), (0.51, "edit.flux.m100"),
     (1.0, "edit.flux.m100")],
)
def test_bucket_for_ratio(ratio, queue):
    assert bucket_for(ratio, EDGES).queue("flux") == queue


def test_custom_edges_name_queues():
    assert [bucket.queue("sd3") for bucket in buckets([0.2, 1.0])] == ["edit.sd3.m20", "edit.sd3.m100"]


def test_all_queues_per_model():
    queues = all_queues(["flux", "sd2"], EDGES)
    assert queues[4] == control_queue("flux") == "edit.flux.control"
    assert queues[-1] == "edit.sd2.control"
    assert len(queues) == 10
    assert not set(all_queues(["flux"], EDGES)) & set(all_queues(["sd2"], EDGES))


def test_all_queues_defaults_to_the_models_this_worker_serves(settings):
    settings.EDITOR_WORKER_MODELS = ["sd2"]
    assert all(queue.startswith("edit.sd2.") for queue in all_queues(edges=EDGES))


@pytest.mark.parametrize("edges", [[], [0.5, 0.2, 1.0], [0.1, 0.5], [0.0, 1.0], [0.3, 0.3, 1.0]])
def test_invalid_edges_are_rejected(edges):
    with pytest.raises(ImproperlyConfigured):
        buckets(edges)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError):
        bucket_for(ratio, EDGES)
