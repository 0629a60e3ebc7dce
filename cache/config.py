"""Cache settings read from environment variables, and the factory that builds the store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cache.compression import Codec, DEFAULT_CODEC, check_codec
from cache.disk import DiskTier
from cache.metrics import CacheMetrics
from cache.policies import DEFAULT_POLICY, POLICY_NAMES, create_policy
from cache.store import ActivationStore

GIB = 1024**3


@dataclass(frozen=True)
class CacheSettings:
    """Memory and disk budgets in bytes, cache directory, eviction policy and storage codec."""

    memory_bytes: int = 8 * GIB
    disk_bytes: int = 64 * GIB
    directory: Path = Path("var/cache")
    policy: str = DEFAULT_POLICY
    codec: Codec = DEFAULT_CODEC
    write_through: bool = True

    @classmethod
    def from_env(cls) -> CacheSettings:
        """Read EDITOR_CACHE_BYTES, EDITOR_CACHE_DISK_BYTES, EDITOR_CACHE_DIR, EDITOR_CACHE_POLICY,
        EDITOR_CACHE_DTYPE and EDITOR_CACHE_WRITE_THROUGH; unset variables keep the defaults of this class."""
        defaults = cls()
        policy = os.environ.get("EDITOR_CACHE_POLICY") or defaults.policy
        if policy not in POLICY_NAMES:
            raise ValueError(f"EDITOR_CACHE_POLICY={policy!r} is not supported; use one of {POLICY_NAMES}.")
        return cls(
            memory_bytes=_read_bytes("EDITOR_CACHE_BYTES", defaults.memory_bytes),
            disk_bytes=_read_bytes("EDITOR_CACHE_DISK_BYTES", defaults.disk_bytes),
            directory=Path(os.environ.get("EDITOR_CACHE_DIR") or defaults.directory),
            policy=policy,
            codec=check_codec(os.environ.get("EDITOR_CACHE_DTYPE") or defaults.codec),
            write_through=_read_switch("EDITOR_CACHE_WRITE_THROUGH", defaults.write_through),
        )


def _read_switch(name: str, default: bool) -> bool:
    raw = (os.environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a switch; pass 1 or 0.")


def _read_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; pass a size in bytes such as 8589934592.") from None
    if value < 0:
        raise ValueError(f"{name}={value} is negative; pass 0 to disable the tier or a size in bytes.")
    return value


def build_store(settings: CacheSettings | None = None, metrics: CacheMetrics | None = None) -> ActivationStore:
    """Build the store of one worker from `settings` (default: the environment)."""
    settings = settings or CacheSettings.from_env()
    metrics = metrics or CacheMetrics()
    disk = DiskTier(settings.directory, settings.disk_bytes, metrics) if settings.disk_bytes > 0 else None
    policy = create_policy(settings.policy, max(1, settings.memory_bytes))
    return ActivationStore(
        settings.memory_bytes, policy, disk=disk, codec=settings.codec, metrics=metrics,
        write_through=settings.write_through,
    )
