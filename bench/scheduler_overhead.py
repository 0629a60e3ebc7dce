"""The scheduler's own costs: batching-engine overhead per step and time per cost-routing decision.

Run `python -m bench.scheduler_overhead` (writes docs/benchmarks/scheduler_overhead.{json,md,png}) or with
`--quick` (test model, fewer requests, writes under var/bench/).

* Engine: the Flux demo model at 512x512 with 8 steps; batches of 1, 2, 4 and 8 masked requests (mask ratio
  about 0.11, 128 text tokens) run through `workers.engine.Engine`. Per step it reports the median and P95
  of the time outside the transformer pass (admission, planning, packing, scheduler updates, callbacks,
  retirement) next to the transformer pass itself, the cost-model update a batching worker runs after each
  step, and the engine's batched time against the same requests run one at a time with `denoise_masked`.
* Routing: `editing.cost_routing.choose` against 2, 8 and 64 live-worker records in an embedded Redis
  server on loopback (heartbeat, load record and backlog per worker), timed over many decisions.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "editor_site.settings")
os.environ.setdefault("DEBUG", "1")

import argparse
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
STEPS = 8
SEED = 0
GUIDANCE = 30.0
TEXT_TOKENS = 128


@dataclass(frozen=True)
class EngineRow:
    batch_size: int
    steps: int
    overhead_ms_median: float
    overhead_ms_p95: float
    compute_ms_median: float
    overhead_share: float
    observer_ms_median: float  # the batching worker's cost-model update, run between steps
    batched_s: float
    sequential_s: float
    speedup: float


@dataclass(frozen=True)
class RoutingRow:
    workers: int
    refresh_s: float  # EDITOR_ROUTING_REFRESH_S: how often the router re-reads the workers' records
    decisions: int
    ms_median: float
    ms_p95: float
    ms_mean: float


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def engine_rows(preset: str, batch_sizes: tuple[int, ...], size: int, steps: int) -> list[EngineRow]:
    from diffusers import FluxFillPipeline
    from PIL import Image

    from bench.mask_latency import brush_mask
    from workers.cost_model import CostModel
    from workers.demo_model import ensure_demo_model
    from workers.engine import Engine, EngineRequest
    from workers.masked.conditioning import encode_prompt
    from workers.masked.edit import mask_to_pil
    from workers.masked.inference import denoise_masked, prepare_masked_inputs
    from workers.masked.token_layout import TokenLayout
    from workers.masked.warmup import warm_up_template
    from workers.worker_state import COST_SAVE_INTERVAL_S, PRIOR_FIT

    folder = ensure_demo_model(REPO_ROOT / "var" / "models", preset)
    pipe = FluxFillPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    template = Image.open(REPO_ROOT / "demo" / "photos" / "astronaut.png").convert("RGB").resize((size, size))
    image = np.asarray(template)
    activations = warm_up_template(pipe, image, seed=SEED, steps=steps, guidance_scale=GUIDANCE, prompt="",
                                   max_sequence_length=TEXT_TOKENS)
    scratch = Path(tempfile.mkdtemp(prefix="scheduler-overhead-"))
    rows = []
    for batch in batch_sizes:
        requests = []
        for index in range(batch):
            mask = np.roll(brush_mask(0.11, size=size), shift=index * size // 9, axis=1)
            layout = TokenLayout.from_pixel_mask(mask, patch=16, dilation=1)
            embedding = encode_prompt(pipe, f"a bouquet of flowers number {index}", TEXT_TOKENS)
            inputs = prepare_masked_inputs(pipe, template, mask_to_pil(mask), embedding, layout, seed=SEED,
                                           steps=steps, guidance_scale=GUIDANCE)
            requests.append(EngineRequest(inputs=inputs, activations=activations))
        with torch.inference_mode():
            start = time.perf_counter()
            for request in requests:
                denoise_masked(pipe, activations, request.inputs)
            sequential_s = time.perf_counter() - start
        costs = CostModel(scratch / f"cost-{batch}.json", PRIOR_FIT, save_interval_s=COST_SAVE_INTERVAL_S)
        observer_s: list[float] = []

        def observe(sample, costs=costs, observer_s=observer_s) -> None:
            # What workers/batching.record_step_cost does for each step on a batching worker.
            started = time.perf_counter()
            costs.record_step(sample.tokens, sample.overhead_s + sample.compute_s)
            observer_s.append(time.perf_counter() - started)

        engine = Engine(pipe, token_budget=65536, max_batch_size=batch, on_sample=observe)
        start = time.perf_counter()
        handles = [engine.submit(request) for request in requests]
        engine.run_until_idle()
        for handle in handles:
            handle.result()
        batched_s = time.perf_counter() - start
        samples = [sample for sample in engine.stats.samples() if sample.admitted == 0]
        overhead = [1000 * sample.overhead_s for sample in samples]
        compute = [1000 * sample.compute_s for sample in samples]
        row = EngineRow(
            batch_size=batch, steps=len(engine.stats.samples()),
            overhead_ms_median=round(statistics.median(overhead), 3),
            overhead_ms_p95=round(percentile(overhead, 0.95), 3),
            compute_ms_median=round(statistics.median(compute), 2),
            overhead_share=round(statistics.median(overhead) / statistics.median(compute), 4),
            observer_ms_median=round(1000 * statistics.median(observer_s), 3),
            batched_s=round(batched_s, 3), sequential_s=round(sequential_s, 3),
            speedup=round(sequential_s / batched_s, 3),
        )
        logger.info("%s", row)
        rows.append(row)
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def routing_rows(worker_counts: tuple[int, ...], decisions: int, refresh_s: float) -> list[RoutingRow]:
    import django

    django.setup()
    from django.conf import settings

    from editing import cost_routing
    from editor_site import redis_keys
    from editor_site.celery import app as celery_app
    from editor_site.stack import start_embedded_redis

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        process, url = start_embedded_redis(Path(scratch))
        try:
            celery_app.conf.broker_url = url
            settings.EDITOR_ROUTING_REFRESH_S = refresh_s
            client = redis_keys.client()
            rng = np.random.default_rng(0)
            for count in worker_counts:
                client.flushdb()
                cost_routing.forget_fleet_view()
                for index in range(count):
                    hostname = f"w{index}@bench"
                    heartbeat = {"hostname": hostname, "models": ["flux"], "queues": [], "at": time.time()}
                    resident = [f"flux:{rng.integers(0, 64):064x}:8:0:30" for _ in range(32)]
                    load = {"busy_until": time.time() + float(rng.uniform(0, 5)),
                            "costs": {"flux": {"step_intercept_s": 0.01, "step_s_per_token": 1e-4,
                                               "load_latency_s": 0.05, "load_s_per_mib": 0.002,
                                               "text_tokens": TEXT_TOKENS}},
                            "resident": {"memory": resident[:16], "disk": resident[16:]}}
                    client.set(redis_keys.worker_state_key(hostname), json.dumps(heartbeat))
                    client.set(redis_keys.worker_load_key(hostname), json.dumps(load))
                    client.hset(redis_keys.worker_backlog_key(hostname), mapping={f"j{k}": "0.5" for k in range(3)})
                timings = []
                for decision in range(decisions):
                    shape = cost_routing.JobShape(
                        model="flux", template_hash=f"{rng.integers(0, 64):064x}", width=SIZE, height=SIZE,
                        mask_ratio=float(rng.uniform(0.02, 0.3)), steps=8, seed=0, guidance=30.0,
                    )
                    start = time.perf_counter()
                    chosen = cost_routing.choose(shape)
                    timings.append(1000 * (time.perf_counter() - start))
                    assert chosen is not None
                row = RoutingRow(
                    count, refresh_s, decisions, round(statistics.median(timings), 3),
                    round(percentile(timings, 0.95), 3), round(statistics.fmean(timings), 3),
                )
                logger.info("%s", row)
                rows.append(row)
        finally:
            process.terminate()
            process.wait(timeout=10)
    return rows


def write_reports(engine: list[EngineRow], routing: list[RoutingRow], environment: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"engine": [asdict(row) for row in engine], "routing": [asdict(row) for row in routing],
               "environment": environment}
    (out_dir / "scheduler_overhead.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Scheduler overhead: batching engine and cost routing",
        "",
        "Generated by `python -m bench.scheduler_overhead`. Engine overhead is the wall time of an engine step",
        "outside its transformer pass (admission, cache planning, packing, per-request scheduler updates,",
        "callbacks, retirement), over steps that admitted no new request; a request's one-time admission",
        "(timesteps, rotary tables) is in the steps that admit it. The cost-model update (refit, and a file write",
        "at most every few seconds) runs on the engine thread after each step, as on a batching worker.",
        "`batched_s` is the engine running the batch, `sequential_s` the same requests one at a time with",
        "`denoise_masked`, in the same run.",
        "Routing times one `cost_routing.choose` call against live-worker records in an embedded Redis on",
        "loopback: a SCAN and MGET of heartbeats, then the load records and every backlog in one pipelined",
        "round trip.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in environment.items()]
    lines += [
        "",
        "## Engine",
        "",
        "| batch | steps | overhead ms (median) | overhead ms (P95) | transformer ms (median) | overhead / compute "
        "| cost-model update ms (median) | batched s | sequential s | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in engine:
        lines.append(
            f"| {row.batch_size} | {row.steps} | {row.overhead_ms_median:.3f} | {row.overhead_ms_p95:.3f} | "
            f"{row.compute_ms_median:.1f} | {row.overhead_share:.2%} | {row.observer_ms_median:.3f} | "
            f"{row.batched_s:.2f} | {row.sequential_s:.2f} | "
            f"{row.speedup:.2f} |"
        )
    lines += [
        "", "## Cost routing", "",
        "`refresh s` 0 re-reads every worker's records from Redis for each decision; with the default 0.25 the",
        "router re-reads them at most every 0.25 s and decides from its view in between (the decisions here",
        "come back to back, so most use the view; the mean includes the re-reads).", "",
        "| live workers | refresh s | decisions | ms (median) | ms (P95) | ms (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for row in routing:
        lines.append(
            f"| {row.workers} | {row.refresh_s:g} | {row.decisions} | {row.ms_median:.3f} | {row.ms_p95:.3f} | "
            f"{row.ms_mean:.3f} |"
        )
    lines += ["", "Published figures for comparison: 1.2 ms per step and 0.6 ms per routing decision."]
    lines += ["", "![Engine overhead per step and routing time per decision](scheduler_overhead.png)"]
    (out_dir / "scheduler_overhead.md").write_text("\n".join(lines) + "\n")
    write_plot(engine, routing, out_dir / "scheduler_overhead.png")


def write_plot(engine: list[EngineRow], routing: list[RoutingRow], path: Path) -> None:
    """Plot the engine's overhead per step by batch size and the routing time per decision by worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (engine_axis, routing_axis) = plt.subplots(1, 2, figsize=(11, 4))
    positions = np.arange(len(engine))
    engine_axis.bar(positions - 0.27, [row.overhead_ms_median for row in engine], 0.27, label="engine (median)")
    engine_axis.bar(positions, [row.overhead_ms_p95 for row in engine], 0.27, label="engine (P95)")
    engine_axis.bar(positions + 0.27, [row.observer_ms_median for row in engine], 0.27,
                    label="cost-model update (median)")
    engine_axis.axhline(1.2, color="grey", linestyle="--", label="published, 1.2 ms")
    engine_axis.set_xticks(positions, [str(row.batch_size) for row in engine])
    engine_axis.set_xlabel("requests in the batch")
    engine_axis.set_ylabel("ms per step")
    engine_axis.set_title("Engine overhead per step")
    engine_axis.grid(alpha=0.3, axis="y")
    engine_axis.legend(fontsize=8)
    for refresh in sorted({row.refresh_s for row in routing}):
        selected = sorted((row for row in routing if row.refresh_s == refresh), key=lambda row: row.workers)
        routing_axis.plot([row.workers for row in selected], [row.ms_median for row in selected], marker="o",
                          label=f"refresh {refresh:g} s (median)")
    routing_axis.axhline(0.6, color="grey", linestyle="--", label="published, 0.6 ms")
    routing_axis.set_xscale("log", base=2)
    counts = sorted({row.workers for row in routing})
    routing_axis.set_xticks(counts, [str(count) for count in counts])
    routing_axis.minorticks_off()
    routing_axis.set_yscale("log")
    routing_axis.set_xlabel("live workers")
    routing_axis.set_ylabel("ms per decision")
    routing_axis.set_title("Cost routing")
    routing_axis.grid(alpha=0.3, which="both")
    routing_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="test model, 256 px, 2 steps; writes under var/bench/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        engine = engine_rows("test", (1, 4), 256, 2)
        routing = routing_rows((2, 8), 200, 0.0) + routing_rows((2, 8), 200, 0.25)
        out_dir = REPO_ROOT / "var" / "bench"
    else:
        engine = engine_rows("demo", (1, 2, 4, 8), SIZE, STEPS)
        routing = routing_rows((2, 8, 64), 2000, 0.0) + routing_rows((2, 8, 64), 2000, 0.25)
        out_dir = REPO_ROOT / "docs" / "benchmarks"
    environment = {
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": "test" if args.quick else "demo (Flux Fill architecture)",
        "resolution": f"{256 if args.quick else SIZE}x{256 if args.quick else SIZE}",
        "steps": 2 if args.quick else STEPS, "text_tokens": TEXT_TOKENS,
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    write_reports(engine, routing, environment, out_dir)
    logger.info("Wrote %s", out_dir / "scheduler_overhead.json")


if __name__ == "__main__":
    main()
