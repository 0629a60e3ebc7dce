"""Model families the worker serves, by the names EDITOR_MODELS uses."""

from __future__ import annotations

from importlib import import_module

from workers.families.base import ModelFamily

# Family name -> "module:class". Imported on first use, so a worker loads only the pipelines it serves.
FAMILY_CLASSES: dict[str, str] = {
    "flux": "workers.families.flux:FluxFamily",
    "sd3": "workers.families.sd3:SD3Family",
    "sdxl": "workers.families.unet:SDXLFamily",
    "sd2": "workers.families.unet:SD2Family",
}


def get_family(name: str) -> ModelFamily:
    """Return the family adapter for `name`; raise ValueError naming the known families otherwise."""
    if name not in FAMILY_CLASSES:
        raise ValueError(f"Unknown model family {name!r}; use one of {sorted(FAMILY_CLASSES)}.")
    module_name, class_name = FAMILY_CLASSES[name].split(":")
    return getattr(import_module(module_name), class_name)()
