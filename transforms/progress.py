"""Progress of a long run: Beam counters (for the runner's UI and the final summary) and, in each process, a
display of the counts so far: a live bar (tqdm) in the process that started the run when stderr is a terminal,
else a line logged every ``interval`` seconds. Both say the records done (exited, dead-lettered or skipped) of
the inputs listed once that total is known (the command line counts them beside the run, never before it),
the rate and the time left.

The per-process tallies are only for display; results never depend on them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Optional

from apache_beam.metrics import Metrics

NAMESPACE = "cascade"
DONE = ("exited", "failed", "skipped")  # what ends an input's journey (at some stage; skipped at reading)
log = logging.getLogger("cascade.progress")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    def __init__(self, interval: float = 10.0, bar_interval: float = 0.5):
        self.interval = interval
        self.bar_interval = bar_interval
        self.total: Optional[int] = None  # the inputs listed, once counted
        self._counts: dict[tuple[int, str], int] = defaultdict(int)
        self._counters: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._started: Optional[float] = None
        self._bar = None  # a tqdm bar, in the process that started the run on a terminal
        self._last_line = ""

    def start_run(self, bar: Optional[bool] = None) -> None:
        """A run starts in this process (the command line): counts from zero, the bar on a terminal."""
        with self._lock:
            self._counts.clear()
            self.total, self._started = None, None
            if bar if bar is not None else sys.stderr.isatty():
                from tqdm import tqdm

                try:
                    sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
                except OSError:
                    sized = False
                # a terminal that reports no width (a bare pseudo-terminal) gets 100 columns, not an empty bar
                self._bar = tqdm(total=None, unit=" records", file=sys.stderr, dynamic_ncols=sized,
                                 ncols=None if sized else 100, nrows=None if sized else 20, smoothing=0.1,
                                 desc="cascade", leave=True)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total

    def finish_run(self) -> None:
        """The run ended: the bar shows its last counts and closes."""
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            self._draw(bar)
            bar.close()

    def add(self, stage: int, what: str, n: int = 1) -> None:
        """Count ``n`` records of ``stage`` as ``what`` (in, exited, escalated, failed, skipped)."""
        key = (stage, what)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = Metrics.counter(NAMESPACE, f"stage{stage}_{what}")
        counter.inc(n)
        with self._lock:
            self._counts[key] += n
            if self._started is None:
                self._started = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._report_loop, name="cascade-progress", daemon=True)
                self._thread.start()

    def done(self) -> int:
        with self._lock:
            return sum(v for (_, what), v in self._counts.items() if what in DONE)

    def rate(self) -> Optional[float]:
        """Records done per second since the first record."""
        with self._lock:
            started = self._started
        elapsed = None if started is None else time.monotonic() - started
        return self.done() / elapsed if elapsed else None

    def stages(self) -> str:
        with self._lock:
            counts = dict(self._counts)
        stages = sorted({s for s, _ in counts if s > 0})
        parts = [f"stage {s}: {counts.get((s, 'in'), 0)} in, {counts.get((s, 'exited'), 0)} exited, "
                 f"{counts.get((s, 'escalated'), 0)} escalated" for s in stages]
        dead = sum(v for (_, what), v in counts.items() if what == "failed")
        return " | ".join(parts + [f"dead letters: {dead}"])

    def line(self) -> str:
        done, rate, total = self.done(), self.rate(), self.total
        head = f"{done:,} of {total:,} inputs done ({done / total:.1%})" if total else \
            f"{done:,} inputs done (total not counted yet)"
        if rate:
            head += f", {rate:,.1f} records/s"
            if total and total > done:
                head += f", about {_duration((total - done) / rate)} left"
        return f"progress (this process) | {head} | {self.stages()}"

    def _draw(self, bar) -> None:
        bar.total = self.total
        done = self.done()
        if done > bar.n:
            bar.update(done - bar.n)
        bar.set_postfix_str(self.stages(), refresh=False)
        bar.refresh()

    def _report_loop(self) -> None:
        last = 0.0
        while True:
            bar = self._bar
            if bar is not None:
                self._draw(bar)
                time.sleep(self.bar_interval)
                continue
            time.sleep(min(self.interval, 1.0))
            if time.monotonic() - last < self.interval:
                continue
            last = time.monotonic()
            line = self.line()
            if line != self._last_line:
                self._last_line = line
                log.info(line)


progress = Progress()
