"""The models this deployment serves, as configured by EDITOR_MODELS.

Each entry is ``name=family:ref``: the name jobs and templates use, the pipeline family and where the weights
come from (``demo`` for the built-in demo model, a local folder or a Hugging Face hub id). The first entry is
the default model. This module reads only configuration, so the web side never imports torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

DEMO_REF = "demo"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class FamilyFacts:
    """What the web side needs to know about a family before any worker has loaded it."""

    label: str
    pixels_per_token: int  # side of one finest-level image token in pixels; sets the mask-ratio bucket
    native_resolution: int  # default side length when the checkpoint's config does not say
    variants: tuple[str, ...]  # cache variants its masked path supports; the first is its default


FAMILIES: dict[str, FamilyFacts] = {
    "flux": FamilyFacts("Flux Fill", 16, 1024, ("kv", "hidden")),
    "sd3": FamilyFacts("Stable Diffusion 3", 16, 1024, ("kv", "hidden")),
    "sdxl": FamilyFacts("Stable Diffusion XL", 8, 1024, ("kv",)),
    "sd2": FamilyFacts("Stable Diffusion 2", 8, 512, ("kv",)),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    ref: str

    @property
    def facts(self) -> FamilyFacts:
        return FAMILIES[self.family]

    @property
    def is_demo(self) -> bool:
        return self.ref == DEMO_REF


def parse_models(raw: str) -> list[ModelSpec]:
    """Parse ``name=family:ref,...``; raise ValueError naming the bad entry and the expected form."""
    specs: list[ModelSpec] = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, sep, rest = entry.partition("=")
        family, sep2, ref = rest.partition(":")
        name, family, ref = name.strip(), family.strip(), ref.strip()
        if not sep or not sep2 or not ref:
            raise ValueError(f"EDITOR_MODELS entry {entry!r} must look like name=family:ref, e.g. flux=flux:demo.")
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"EDITOR_MODELS name {name!r} must be 1-32 lowercase letters, digits, '-' or '_', starting with a "
                "letter or digit."
            )
        if family not in FAMILIES:
            raise ValueError(f"EDITOR_MODELS entry {entry!r} names family {family!r}; use one of {sorted(FAMILIES)}.")
        if any(spec.name == name for spec in specs):
            raise ValueError(f"EDITOR_MODELS names the model {name!r} twice; give each entry its own name.")
        specs.append(ModelSpec(name=name, family=family, ref=ref))
    if not specs:
        raise ValueError("EDITOR_MODELS lists no model; set it to e.g. flux=flux:demo.")
    return specs


def models() -> list[ModelSpec]:
    return list(settings.EDITOR_MODELS)


def default_model() -> ModelSpec:
    return models()[0]


def get(name: str) -> ModelSpec | None:
    return next((spec for spec in models() if spec.name == name), None)


def names() -> list[str]:
    return [spec.name for spec in models()]


def native_resolution(spec: ModelSpec) -> int:
    """Read the side length from a local checkpoint's configs; fall back to the family default."""
    folder = Path(spec.ref).expanduser()
    if spec.is_demo or not folder.is_dir():
        return spec.facts.native_resolution
    try:
        denoiser = next(
            json.loads((folder / part / "config.json").read_text())
            for part in ("transformer", "unet")
            if (folder / part / "config.json").is_file()
        )
        vae = json.loads((folder / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        sample_size = denoiser["sample_size"]
        side = sample_size[0] if isinstance(sample_size, list) else sample_size
        # Flux's transformer config has no usable sample size; its pipeline uses 128 latent pixels.
        return int(side) * factor if spec.family != "flux" else 128 * factor
    except (StopIteration, KeyError, OSError, ValueError, TypeError):
        return spec.facts.native_resolution
