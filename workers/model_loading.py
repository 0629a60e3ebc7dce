"""Loading the pipelines a worker serves, once per process and model name."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.demo_model import ensure_demo_model
from workers.families import get_family
from workers.families.base import ModelFamily

logger = logging.getLogger(__name__)

DEMO_MODEL_REF = "demo"
DEFAULT_VAR_DIR = Path(__file__).resolve().parent.parent / "var"
# Small text files that define a pipeline folder: configs, tokenizer vocabularies, weight indexes.
CONFIG_SUFFIXES = frozenset({".json", ".txt", ".model"})
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"})

# A job waiting for the pipeline refreshes its row this often, well inside EDITOR_STALE_RUNNING_S.
KEEP_ALIVE_S = 2.0

_model_lock = threading.Lock()
_process_models: dict[str, LoadedModel] = {}


@dataclass
class LoadedModel:
    """A pipeline on its device, its family adapter and the identity that caches key on."""

    pipe: Any
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    family: ModelFamily = field(default_factory=lambda: get_family("flux"))
    name: str = "flux"  # the EDITOR_MODELS name jobs use
    # Serialises pipeline calls, because the scheduler keeps per-call state (timesteps, step index).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @contextmanager
    def hold(self, keep_alive: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the pipeline's lock; while waiting for it call `keep_alive` every KEEP_ALIVE_S seconds."""
        while not self.lock.acquire(timeout=KEEP_ALIVE_S):
            if keep_alive is not None:
                keep_alive()
        try:
            yield
        finally:
            self.lock.release()

    @property
    def token_pixels(self) -> int:
        return self.family.pixels_per_token(self.pipe)

    @property
    def working_multiple(self) -> int:
        return self.family.working_multiple(self.pipe)


def load_model(model_ref: str | None, *, var_dir: Path, family: str = "flux", name: str | None = None) -> LoadedModel:
    """Load a pipeline of `family`: the built-in demo model, a local folder or a Hugging Face hub id.

    `None` or "demo" builds the family's demo preset under `var_dir/models` on first use. The pipeline runs on
    CUDA in bfloat16 when a GPU is available, else on the CPU in float32.
    """
    adapter = get_family(family)
    device, dtype = _pick_device()
    if model_ref is None or model_ref == DEMO_MODEL_REF:
        folder_name = DEMO_MODEL_REF if family == "flux" else f"{family}-{DEMO_MODEL_REF}"
        folder = ensure_demo_model(Path(var_dir) / "models", DEMO_MODEL_REF, builder=adapter.build_demo, folder_name=folder_name)
        model_id = DEMO_MODEL_REF if family == "flux" else f"{family}:{DEMO_MODEL_REF}"
        revision = folder_revision(folder)
    elif Path(model_ref).expanduser().is_dir():
        folder = Path(model_ref).expanduser().resolve()
        model_id = str(folder)
        revision = folder_revision(folder)
    else:
        # NOTE: the hub branch has not run in tests, because tests have no network access.
        folder = Path(adapter.pipeline_class.download(model_ref))
        model_id = model_ref
        revision = _hub_revision(folder)

    logger.info("Loading %s model %s (revision %s) from %s on %s as %s", family, model_id, revision, folder, device, dtype)
    quiet_loading_progress()
    pipe = adapter.load(folder, dtype=dtype, device=device)
    return LoadedModel(
        pipe=pipe, model_id=model_id, revision=revision, device=device, dtype=dtype, family=adapter,
        name=name or family,
    )


def quiet_loading_progress() -> None:
    """Turn off the loading progress bars of diffusers and transformers.

    A Celery worker logs its stderr as warnings, so each bar would become several WARNING lines per load.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def get_model(name: str | None = None) -> LoadedModel:
    """Return this process's model called `name` (an EDITOR_MODELS entry; default the first), loading it once.

    Thread-safe: concurrent first calls load the model once. `EDITOR_VAR_DIR` sets where demo models are
    built (default `var/` in the repository).
    """
    from editing import catalog

    spec = catalog.get(name) if name else catalog.default_model()
    if spec is None:
        raise ValueError(f"Model {name!r} is not in EDITOR_MODELS ({catalog.names()}); it cannot run here.")
    loaded = _process_models.get(spec.name)
    if loaded is not None:
        return loaded
    with _model_lock:
        if spec.name not in _process_models:
            var_dir = Path(os.environ.get("EDITOR_VAR_DIR") or DEFAULT_VAR_DIR)
            _process_models[spec.name] = load_model(spec.ref, var_dir=var_dir, family=spec.family, name=spec.name)
    return _process_models[spec.name]


def reset_process_model() -> None:
    """Forget the process-wide models so the next `get_model()` loads again (for tests and reloads)."""
    with _model_lock:
        _process_models.clear()


def folder_revision(folder: Path) -> str:
    """Return a revision id for a local pipeline folder, "local-" plus 16 hex digits of a SHA-256.

    The hash covers the content of every config and tokenizer file, and the name, size and modification
    time of every weight file. Weight contents are not read because real checkpoints have tens of GB, so
    rebuilding or copying a folder changes the revision even when the weights are identical.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or "/." in relative:
            continue
        if path.suffix in CONFIG_SUFFIXES:
            digest.update(f"config {relative}\n".encode())
            digest.update(path.read_bytes())
        elif path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(f"weights {relative} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:16]


def _hub_revision(folder: Path) -> str:
    # The hub cache stores each download under snapshots/<commit hash>.
    if folder.parent.name == "snapshots":
        return folder.name
    return folder_revision(folder)


def _pick_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32
