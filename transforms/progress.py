"""Progress of a long run: Beam counters (for the runner's UI and the final summary) and, in each worker
process, a line logged at most every ``interval`` seconds with each stage's counts so far.

The per-process tallies are only for display; results never depend on them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import defaultdict

from apache_beam.metrics import Metrics

NAMESPACE = "cascade"
log = logging.getLogger("cascade.progress")


class Progress:
    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._counts: dict[tuple[int, str], int] = defaultdict(int)
        self._counters: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_line = ""

    def add(self, stage: int, what: str, n: int = 1) -> None:
        """Count ``n`` records of ``stage`` as ``what`` (in, exited, escalated, failed)."""
        key = (stage, what)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = Metrics.counter(NAMESPACE, f"stage{stage}_{what}")
        counter.inc(n)
        with self._lock:
            self._counts[key] += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._report_loop, name="cascade-progress", daemon=True)
                self._thread.start()

    def line(self) -> str:
        with self._lock:
            counts = dict(self._counts)
        stages = sorted({s for s, _ in counts if s > 0})
        parts = [
            f"stage {s}: {counts.get((s, 'in'), 0)} in, {counts.get((s, 'exited'), 0)} exited, "
            f"{counts.get((s, 'escalated'), 0)} escalated"
            for s in stages
        ]
        dead = sum(v for (_, what), v in counts.items() if what == "failed")
        return "progress (this process) | " + " | ".join(parts) + f" | dead letters: {dead}"

    def _report_loop(self) -> None:
        tty = sys.stderr.isatty()
        while True:
            time.sleep(self.interval)
            line = self.line()
            if line == self._last_line:
                continue
            self._last_line = line
            if tty:
                sys.stderr.write("\r" + line[:200].ljust(120))
                sys.stderr.flush()
            else:
                log.info(line)


progress = Progress()
