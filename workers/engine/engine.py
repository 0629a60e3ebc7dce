"""Step-level continuous batching engine for masked Flux Fill requests.

Each engine step first admits waiting requests, first come first served, within a token budget and a maximum
batch size. It then plans each request's cache use for that request's own step and runs ONE packed transformer
pass for all active requests. Finally it advances every request's own scheduler and retires finished, cancelled
and failed requests. Requests join and leave at any step, each with its own steps, timesteps, cache, prompt and
guidance.

The engine owns its pipeline: it configures `pipe.scheduler` when admitting requests and swaps the
transformer's attention processors during each pass, so nothing else may run on that pipeline meanwhile.
Callers prepare `MaskedDenoiseInputs` and decode the returned latents outside the engine. Every block runs on
text and masked tokens only, as `denoise_masked` with `full_prefix_blocks=0` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from diffusers import FluxFillPipeline

from workers.engine.attention import CacheLookupError
from workers.engine.forward import packed_forward
from workers.engine.packing import BatchLayout, build_layout, pack_step, unpack_noise
from workers.engine.request import EngineRequest, RequestCancelled, RequestHandle
from workers.engine.state import RequestState, admit_request
from workers.engine.stats import EngineStats, StepSample
from workers.masked.inference import check_compatible

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 8192
DEFAULT_MAX_BATCH_SIZE = 8


class Engine:
    """Batching runner of masked denoising requests on one FluxFillPipeline, one transformer pass per step.

    `token_budget` caps the text plus masked image tokens of the active requests in one pass. Drive it with
    `step()` / `run_until_idle()`, or with a background thread via `start()` / `stop()`. `pipeline_lock` is
    held during every step. `on_sample` receives each step's measurements after the step, outside the lock.
    """

    def __init__(
        self,
        pipe: FluxFillPipeline,
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        pipeline_lock: threading.Lock | None = None,
        on_sample: Callable[[StepSample], None] | None = None,
    ) -> None:
        if token_budget < 1 or max_batch_size < 1:
            raise ValueError(f"token_budget and max_batch_size must be >= 1, got {token_budget} and {max_batch_size}.")
        self.pipe = pipe
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.stats = EngineStats()
        self.on_sample = on_sample
        self._waiting: deque[RequestHandle] = deque()
        self._active: list[RequestState] = []
        self._layout: BatchLayout | None = None
        self._condition = threading.Condition()
        # Held for each whole step. Callers that run the same pipeline outside the engine (stock runs,
        # warm-ups) pass the lock they hold meanwhile, so the two never interleave.
        self._step_lock = pipeline_lock or threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def num_waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request and return its handle. Raise ValueError when it can never run on this engine."""
        check_compatible(request.activations.metadata, request.inputs, request.inputs.embedding.prompt_embeds.dtype)
        if request.num_tokens > self.token_budget:
            raise ValueError(
                f"Request needs {request.num_tokens} tokens per pass, more than the engine's token_budget "
                f"{self.token_budget}. Raise the budget or mask fewer tokens."
            )
        handle = RequestHandle(request)
        with self._condition:
            self._waiting.append(handle)
            self._condition.notify_all()
        return handle

    def step(self) -> bool:
        """Run one engine step and return whether there was anything to run."""
        sample = self._step()
        if sample is None:
            return False
        if self.on_sample is not None:
            try:
                self.on_sample(sample)
            except Exception:  # noqa: BLE001 - a failing observer must not stop the batch
                logger.warning("the engine's step observer failed", exc_info=True)
        return True

    def _step(self) -> StepSample | None:
        with self._step_lock, torch.inference_mode():
            started = time.perf_counter()
            self._retire_cancelled()
            admitted = self._admit()
            if not self._active:
                self._layout = None
                return None
            batch_size = len(self._active)
            tokens = sum(state.request.num_tokens for state in self._active)
            noise, compute_s = self._compute()
            if noise is not None:
                self._advance(noise)
            self._retire_finished()
            overhead_s = time.perf_counter() - started - compute_s
            sample = StepSample(
                overhead_s=overhead_s, compute_s=compute_s, batch_size=batch_size, tokens=tokens, admitted=admitted
            )
            self.stats.record(sample)
            return sample

    def run_until_idle(self) -> int:
        """Run steps until no request is waiting or active, and return the number of steps run."""
        steps = 0
        while self.step():
            steps += 1
        return steps

    def start(self) -> None:
        """Run steps on a background thread that sleeps while there is no work."""
        with self._condition:
            if self._thread is not None:
                raise RuntimeError("Engine is already running; call stop() first.")
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="masked-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step. Unfinished requests stay queued or active."""
        with self._condition:
            thread = self._thread
            self._stopping = True
            self._condition.notify_all()
        if thread is not None:
            thread.join()
        with self._condition:
            self._thread = None

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not (self._waiting or self._active):
                    self._condition.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:
                # Only a bug in the engine gets here. Fail the batch rather than leave its callers waiting.
                logger.exception("Engine step failed, failing %d active requests", len(self._active))
                for state in list(self._active):
                    self._fail(state, error)

    def _retire_cancelled(self) -> None:
        for state in [state for state in self._active if state.handle.cancel_requested]:
            error = RequestCancelled(f"Request {state.handle.request_id} was cancelled after {state.step} steps.")
            self._fail(state, error)

    def _admit(self) -> int:
        """Move waiting requests to the active batch in arrival order while they fit, and return how many."""
        admitted = 0
        tokens = sum(state.request.num_tokens for state in self._active)
        while len(self._active) < self.max_batch_size:
            with self._condition:
                if not self._waiting:
                    return admitted
                handle = self._waiting[0]
                if handle.cancel_requested:
                    self._waiting.popleft()
                    handle.set_error(RequestCancelled(f"Request {handle.request_id} was cancelled before it started."))
                    continue
                if tokens + handle.request.num_tokens > self.token_budget:
                    return admitted
                self._waiting.popleft()
            try:
                state = admit_request(self.pipe, handle)
            except Exception as error:
                logger.exception("Admission of request %d failed", handle.request_id)
                handle.set_error(error)
                continue
            handle.mark_running()
            self._active.append(state)
            tokens += handle.request.num_tokens
            admitted += 1
        return admitted

    def _current_layout(self) -> BatchLayout:
        key = tuple(state.handle.request_id for state in self._active)
        if self._layout is None or self._layout.key != key:
            self._layout = build_layout(self._active)
        return self._layout

    def _compute(self) -> tuple[list[torch.Tensor] | None, float]:
        """Run the packed pass. A failing cache source retires only its request, and the pass reruns without it."""
        compute_s = 0.0
        while self._active:
            packed = pack_step(self._current_layout())
            started = time.perf_counter()
            try:
                noise = packed_forward(self.pipe.transformer, packed)
            except CacheLookupError as error:
                compute_s += time.perf_counter() - started
                logger.warning("Retiring request %d: %s (cause: %r)", error.request_id, error, error.__cause__)
                failed = next(state for state in self._active if state.handle.request_id == error.request_id)
                self._fail(failed, error)
                continue
            except Exception as error:
                compute_s += time.perf_counter() - started
                logger.exception("Transformer pass failed, failing its %d requests", len(self._active))
                for state in list(self._active):
                    self._fail(state, error)
                return None, compute_s
            compute_s += time.perf_counter() - started
            return unpack_noise(packed.layout, noise), compute_s
        return None, compute_s

    def _advance(self, noise: list[torch.Tensor]) -> None:
        """Step each request's own scheduler and report progress. A failure retires only that request."""
        for state, noise_pred in zip(list(self._active), noise):
            try:
                timestep = state.timesteps[state.step]
                state.latents = state.scheduler.step(noise_pred, timestep, state.latents, return_dict=False)[0]
                state.step += 1
                if state.request.on_step is not None:
                    state.request.on_step(state.step, state.steps_total)
            except Exception as error:
                logger.exception("Step %d of request %d failed", state.step, state.handle.request_id)
                self._fail(state, error)

    def _retire_finished(self) -> None:
        for state in [state for state in self._active if state.finished]:
            self._active.remove(state)
            state.handle.set_result(state.final_latents())

    def _fail(self, state: RequestState, error: BaseException) -> None:
        self._active.remove(state)
        state.handle.set_error(error)
