"""Location of the Redis broker: ``REDIS_URL``, or the embedded server that ``make run`` started."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_URL_FILE = "redis.url"


def embedded_url_file(var_dir: Path) -> Path:
    return var_dir / EMBEDDED_URL_FILE


def resolve_redis_url(var_dir: Path) -> str | None:
    """Return ``REDIS_URL`` if set, else the URL of the embedded server recorded under ``var_dir``."""
    url = os.environ.get("REDIS_URL", "").strip()
    if url:
        return url
    recorded = embedded_url_file(var_dir)
    if recorded.exists():
        return recorded.read_text().strip() or None
    return None
