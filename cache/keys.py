"""Identity of a cached warm-up: every input that changes the stored activations."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Literal

Variant = Literal["kv", "hidden"]
VARIANTS: tuple[str, ...] = ("kv", "hidden")

# Bump when the canonical encoding or the meaning of a field changes, so old files never match.
KEY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CacheKey:
    """Inputs of one warm-up run; two runs with equal keys produce the same activations."""

    template_hash: str
    model_id: str
    model_revision: str
    width: int
    height: int
    steps: int
    scheduler_hash: str
    seed: int
    guidance: float
    dtype: str
    variant: Variant
    prompt_hash: str

    def __post_init__(self) -> None:
        for name in ("template_hash", "model_id", "model_revision", "scheduler_hash", "dtype", "prompt_hash"):
            if not getattr(self, name):
                raise ValueError(f"CacheKey.{name} is empty; pass the value that identifies the warm-up run.")
        for name in ("width", "height", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CacheKey.{name}={value!r} is invalid; pass a positive integer.")
        if not isinstance(self.seed, int):
            raise ValueError(f"CacheKey.seed={self.seed!r} is invalid; pass an integer.")
        if self.variant not in VARIANTS:
            raise ValueError(f"CacheKey.variant={self.variant!r} is invalid; use one of {VARIANTS}.")

    def canonical(self) -> str:
        """Return the canonical JSON encoding: sorted keys, no spaces, floats in repr form."""
        payload: dict[str, object] = {"format": KEY_FORMAT_VERSION}
        for field in fields(self):
            value = getattr(self, field.name)
            # repr keeps every bit of a float, so 7.5 and 7.500001 never collide.
            payload[field.name] = repr(float(value)) if field.name == "guidance" else value
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """Return the sha256 hex digest of `canonical()`, used as the file name and log id."""
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()

    def short(self) -> str:
        """Return the first 12 hex digits of `digest()`, for log lines."""
        return self.digest()[:12]

    @classmethod
    def from_canonical(cls, text: str) -> CacheKey:
        """Parse a string written by `canonical()`; raises ValueError on another format version."""
        payload = json.loads(text)
        version = payload.pop("format", None)
        if version != KEY_FORMAT_VERSION:
            raise ValueError(f"cache key format {version!r} is not supported; expected {KEY_FORMAT_VERSION}.")
        payload["guidance"] = float(payload["guidance"])
        return cls(**payload)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
