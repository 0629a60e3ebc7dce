"""ProcessGroup shutdown order: the broker outlives the processes that use it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from editor_site.stack import ProcessGroup

# On SIGTERM, wait a little (as a worker finishing its shutdown does), then record whether the process
# with pid argv[2] still runs (Linux /proc).
CHILD = """
import os, signal, sys, time
def on_term(*_):
    time.sleep(0.3)
    try:
        # A process that exited but was not reaped yet is a zombie, state Z.
        state = open(f"/proc/{sys.argv[2]}/stat").read().rsplit(")", 1)[1].split()[0]
        alive = "gone" if state == "Z" else "alive"
    except FileNotFoundError:
        alive = "gone"
    open(sys.argv[1], "w").write(alive)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1] + ".ready", "w").write("1")
while True:
    time.sleep(0.05)
"""


def test_stop_last_process_outlives_the_others(tmp_path: Path) -> None:
    group = ProcessGroup()
    broker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    group.adopt("broker", broker, stop_last=True)
    report = tmp_path / "report"
    group.start("worker", [sys.executable, "-c", CHILD, str(report), str(broker.pid)])
    deadline = time.monotonic() + 10
    while not report.with_suffix(".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    group.stop(timeout_s=10)

    assert report.read_text() == "alive"
    assert broker.poll() is not None
