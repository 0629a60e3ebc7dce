"""The scheduler-overhead report: JSON, Markdown table and plot from measured rows."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench.scheduler_overhead import EngineRow, RoutingRow, write_reports


def test_report_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    engine = [
        EngineRow(batch_size=1, steps=8, overhead_ms_median=0.19, overhead_ms_p95=0.37, compute_ms_median=13.4,
                  overhead_share=0.0141, observer_ms_median=0.096, batched_s=0.12, sequential_s=0.10, speedup=0.9),
        EngineRow(batch_size=4, steps=8, overhead_ms_median=0.35, overhead_ms_p95=0.97, compute_ms_median=41.5,
                  overhead_share=0.0085, observer_ms_median=0.121, batched_s=0.36, sequential_s=0.39, speedup=1.08),
    ]
    routing = [
        RoutingRow(workers=workers, refresh_s=refresh, decisions=10, ms_median=median, ms_p95=median * 1.2,
                   ms_mean=median * 1.1)
        for workers, refresh, median in ((2, 0.0, 1.2), (8, 0.0, 1.5), (2, 0.25, 0.017), (8, 0.25, 0.049))
    ]
    write_reports(engine, routing, {"cpu_count": 2}, tmp_path)

    payload = json.loads((tmp_path / "scheduler_overhead.json").read_text())
    assert [row["batch_size"] for row in payload["engine"]] == [1, 4]
    routing_keys = [(row["workers"], row["refresh_s"]) for row in payload["routing"]]
    assert routing_keys == [(2, 0.0), (8, 0.0), (2, 0.25), (8, 0.25)]
    markdown = (tmp_path / "scheduler_overhead.md").read_text()
    assert "| 4 | 8 | 0.350 | 0.970 | 41.5 | 0.85% | 0.121 | 0.36 | 0.39 | 1.08 |" in markdown
    assert "| 8 | 0.25 | 10 | 0.049 |" in markdown
    assert "(scheduler_overhead.png)" in markdown
    with Image.open(tmp_path / "scheduler_overhead.png") as plot:
        assert plot.format == "PNG"
        assert plot.width > 600
        assert plot.height > 300
