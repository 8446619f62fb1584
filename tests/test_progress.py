"""Progress a person can read: a live bar with the total, the rate and the time left on a terminal; lines with
the same figures elsewhere (a log file, CI, Dataflow's logs)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.conftest import write_manifest
from transforms.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def test_a_line_says_done_of_total_the_rate_and_the_time_left():
    progress = Progress()
    assert progress.line().startswith("progress (this process) | 0 inputs done (total not counted yet)")
    progress.add(1, "in", 10)
    progress.add(1, "exited", 4)
    progress.add(0, "failed", 1)
    progress.add(0, "skipped", 5)
    progress._started = time.monotonic() - 2.0  # 10 done in 2 s
    assert re.match(r"progress \(this process\) \| 10 inputs done \(total not counted yet\), [45]\.\d records/s",
                    progress.line())
    progress.set_total(40)
    assert re.match(r"progress \(this process\) \| 10 of 40 inputs done \(25\.0%\), [45]\.\d records/s, about "
                    r"\d s left \| stage 1: 10 in, 4 exited, 0 escalated \| dead letters: 1$", progress.line())


def run_in_a_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal of 120 x 40 as its stdin, stdout and stderr; (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_a_run_in_a_terminal_shows_a_bar_with_the_rate_and_the_time_left(tmp_path, sample_subset):
    manifest = write_manifest(tmp_path / "m.csv", [{"uri": r["uri"]} for r in sample_subset[:12]])
    status, out = run_in_a_terminal([sys.executable, "-m", "pipelines.cascade", "--runner=FnApiRunner", "--input",
                                     manifest, "--output", str(tmp_path / "out"), "stages=[{model: lite0, "
                                     "batch_size: 2}]"])
    assert status == 0, out[-3000:]
    frames = re.split(r"[\r\n]", out)
    bars = [f for f in frames if re.search(r"\d+/12 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ records/s", f)]
    assert bars, out[-3000:]  # done of total, elapsed < left, the rate
    assert any("12/12" in f for f in bars)
