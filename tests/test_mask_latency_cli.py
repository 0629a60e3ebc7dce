"""Command-line checks of `python -m bench.mask_latency` that exit before any model is built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--repeats", "0"], "--repeats 0 must be 1 or more"),
        (["--threads", "0"], "--threads 0 must be 1 or more"),
        (["--preset", "bench", "--family", "sd3"], "--preset bench sets the Flux model only; add --family flux"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ],
)
def test_bad_option_exits_naming_it(arguments: list[str], message: str) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench.mask_latency", *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 2
    assert message in finished.stderr
