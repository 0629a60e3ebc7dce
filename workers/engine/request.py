"""Engine requests, the handles callers wait on, and the cancellation error."""

from __future__ import annotations

import enum
import itertools
import threading
from dataclasses import dataclass

import torch

from workers.masked.activations import BlockCacheSource, TemplateActivations
from workers.masked.inference import MaskedDenoiseInputs, StepCallback

_request_ids = itertools.count(1)


class RequestCancelled(Exception):
    """Raised by `RequestHandle.result` when the request was cancelled before it finished."""


@dataclass(frozen=True)
class EngineRequest:
    """One masked denoising request: prepared inputs and the template cache they reuse.

    `block_source` overrides where cached block activations come from (default: `activations` in memory).
    `activations` still supplies the metadata and the template's latent trajectory.
    `on_step(steps_done, steps_total)` runs on the engine thread after each of the request's steps.
    """

    inputs: MaskedDenoiseInputs
    activations: TemplateActivations
    block_source: BlockCacheSource | None = None
    on_step: StepCallback | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens the request adds to each transformer pass: its text tokens and its masked image tokens."""
        return self.inputs.embedding.num_tokens + self.inputs.layout.num_masked


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class RequestHandle:
    """Future-like view of a submitted request. All methods are thread-safe."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.request_id = next(_request_ids)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._status = RequestStatus.WAITING
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None

    @property
    def status(self) -> RequestStatus:
        return self._status

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> bool:
        """Ask the engine to stop the request at the next step boundary. Return False when it already finished."""
        if self._done.is_set():
            return False
        self._cancel.set()
        return True

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """Return the final packed latents (N_img, 64), or raise the request's error or RequestCancelled."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"Request {self.request_id} did not finish within {timeout} s.")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def mark_running(self) -> None:
        self._status = RequestStatus.RUNNING

    def set_result(self, latents: torch.Tensor) -> None:
        self._result = latents
        self._finish()

    def set_error(self, error: BaseException) -> None:
        self._error = error
        self._finish()

    def _finish(self) -> None:
        self._status = RequestStatus.DONE
        self._done.set()
