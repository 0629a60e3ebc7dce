"""The /metrics endpoint: access rules and merging of worker snapshots."""

from __future__ import annotations

import pytest

from editing.metrics import merge_worker_snapshots

SNAPSHOT = """# HELP editor_cache_hits_total Cache hits.
# TYPE editor_cache_hits_total counter
editor_cache_hits_total{tier="memory"} 3
# HELP editor_cache_bytes Bytes held.
# TYPE editor_cache_bytes gauge
editor_cache_bytes 1024
"""


def test_merge_labels_samples_by_worker():
    lines = merge_worker_snapshots({"w1": SNAPSHOT, "w2": SNAPSHOT.replace(" 3", " 5")})
    assert 'editor_cache_hits_total{worker="w1",tier="memory"} 3' in lines
    assert 'editor_cache_hits_total{worker="w2",tier="memory"} 5' in lines
    assert 'editor_cache_bytes{worker="w2"} 1024' in lines


def test_merge_keeps_each_family_together():
    lines = merge_worker_snapshots({"w1": SNAPSHOT, "w2": SNAPSHOT})
    assert lines.count("# TYPE editor_cache_hits_total counter") == 1
    type_index = lines.index("# TYPE editor_cache_bytes gauge")
    samples = [i for i, line in enumerate(lines) if line.startswith("editor_cache_bytes{")]
    assert samples == [type_index + 1, type_index + 2]


@pytest.mark.django_db
def test_metrics_need_staff(client, django_user_model):
    assert client.get("/metrics").status_code == 403
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    client.force_login(user)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert 'editor_jobs{status="queued"} 0' in response.content.decode()


@pytest.mark.django_db
def test_metrics_accept_bearer_token(client, settings):
    settings.EDITOR_METRICS_TOKEN = "s3cret"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200
