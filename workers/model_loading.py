"""Loading the Flux Fill pipeline that workers run, once per process."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxFillPipeline

from workers.demo_model import ensure_demo_model

logger = logging.getLogger(__name__)

DEMO_MODEL_REF = "demo"
DEFAULT_VAR_DIR = Path(__file__).resolve().parent.parent / "var"
# Small text files that define a pipeline folder: configs, tokenizer vocabularies, weight indexes.
CONFIG_SUFFIXES = frozenset({".json", ".txt", ".model"})
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"})

_model_lock = threading.Lock()
_process_model: LoadedModel | None = None


@dataclass
class LoadedModel:
    """A Flux Fill pipeline on its device, with the identity that result caches key on."""

    pipe: FluxFillPipeline
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    family: str = "flux"
    # Serialises pipeline calls, because the scheduler keeps per-call state (timesteps, step index).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def load_model(model_ref: str | None, *, var_dir: Path) -> LoadedModel:
    """Load a Flux Fill pipeline: the built-in demo model, a local folder or a Hugging Face hub id.

    `None` or "demo" builds the demo preset under `var_dir/models` on first use. The pipeline runs on CUDA in
    bfloat16 when a GPU is available, else on the CPU in float32.
    """
    device, dtype = _pick_device()
    if model_ref is None or model_ref == DEMO_MODEL_REF:
        folder = ensure_demo_model(Path(var_dir) / "models", DEMO_MODEL_REF)
        model_id = DEMO_MODEL_REF
        revision = folder_revision(folder)
    elif Path(model_ref).expanduser().is_dir():
        folder = Path(model_ref).expanduser().resolve()
        model_id = str(folder)
        revision = folder_revision(folder)
    else:
        # NOTE: the hub branch has not run in tests, because tests have no network access.
        folder = Path(FluxFillPipeline.download(model_ref))
        model_id = model_ref
        revision = _hub_revision(folder)

    logger.info("Loading Flux Fill model %s (revision %s) from %s on %s as %s", model_id, revision, folder, device, dtype)
    pipe = FluxFillPipeline.from_pretrained(folder, dtype=dtype)
    pipe.to(device)
    if device.type == "cpu":
        # The VAE's convolutions run about twice as fast in channels-last layout on CPU, as measured with
        # bench.mask_latency on 2 cores. The values are the same up to float rounding.
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id=model_id, revision=revision, device=device, dtype=dtype)


def get_model() -> LoadedModel:
    """Return this process's model, loading it on first call from `EDITOR_MODEL` (default "demo").

    Thread-safe: concurrent first calls load the model once. `EDITOR_VAR_DIR` sets where the demo model
    is built (default `var/` in the repository).
    """
    global _process_model
    if _process_model is not None:
        return _process_model
    with _model_lock:
        if _process_model is None:
            model_ref = os.environ.get("EDITOR_MODEL") or DEMO_MODEL_REF
            var_dir = Path(os.environ.get("EDITOR_VAR_DIR") or DEFAULT_VAR_DIR)
            _process_model = load_model(model_ref, var_dir=var_dir)
    return _process_model


def reset_process_model() -> None:
    """Forget the process-wide model so the next `get_model()` loads again (for tests and reloads)."""
    global _process_model
    with _model_lock:
        _process_model = None


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
