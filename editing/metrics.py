"""The /metrics endpoint: job counts from the database plus every live worker's cache metrics.

Workers publish their own snapshot (Prometheus text format) to Redis after each job; this view merges
them, adding a ``worker`` label to each sample and keeping each metric family together.
"""

from __future__ import annotations

import logging
import re

import redis
from django.conf import settings
from django.db.models import Count
from django.utils.crypto import constant_time_compare
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from editing.models import EditJob, JobStatus
from editor_site import redis_keys

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")


def job_metrics() -> list[str]:
    counts = dict(EditJob.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    lines = ["# HELP editor_jobs Edit jobs by status.", "# TYPE editor_jobs gauge"]
    lines += [f'editor_jobs{{status="{status}"}} {counts.get(status, 0)}' for status in JobStatus.values]
    return lines


def merge_worker_snapshots(snapshots: dict[str, str]) -> list[str]:
    """Merge per-worker expositions into one, grouping samples under their family's HELP/TYPE lines."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in sorted(snapshots.items()):
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    headers.setdefault(family, [])
                    if line not in headers[family]:
                        headers[family].append(line)
                continue
            match = SAMPLE.match(line)
            if match is None:
                continue
            labels = f'worker="{worker}"' + (f",{match['labels']}" if match["labels"] else "")
            samples.setdefault(family, []).append(f"{match['name']}{{{labels}}} {match['value']}")
    lines: list[str] = []
    for family, family_samples in samples.items():
        lines += headers.get(family, [])
        lines += family_samples
    return lines


def worker_snapshots() -> dict[str, str]:
    try:
        client = redis_keys.client()
        prefix = redis_keys.worker_metrics_key("")
        keys = list(client.scan_iter(match=prefix + "*"))
        values = client.mget(keys) if keys else []
    except (redis.RedisError, ValueError):
        logger.warning("could not read worker metrics from Redis", exc_info=True)
        return {}
    return {
        key.decode()[len(prefix):]: value.decode()
        for key, value in zip(keys, values, strict=True)
        if value is not None
    }


def may_read_metrics(request: HttpRequest) -> bool:
    """Staff users, or a scraper sending ``Authorization: Bearer <EDITOR_METRICS_TOKEN>``."""
    token = settings.EDITOR_METRICS_TOKEN
    if token and constant_time_compare(request.headers.get("Authorization", ""), f"Bearer {token}"):
        return True
    return request.user.is_authenticated and request.user.is_staff


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not may_read_metrics(request):
        return HttpResponse(
            "Log in as staff, or send 'Authorization: Bearer <EDITOR_METRICS_TOKEN>'.\n",
            status=403, content_type="text/plain",
        )
    lines = job_metrics() + merge_worker_snapshots(worker_snapshots())
    return HttpResponse("\n".join(lines) + "\n", content_type=CONTENT_TYPE)
