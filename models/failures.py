"""Why an input could not be classified, as a category an analyst can group by (``dead_letter.category``);
the free-text reason beside it says the rest. Each category is set where its failure is raised.

And when the failures are the job's rather than its records': ``CircuitBreaker`` stops a job in which (nearly)
every record of a stage fails with one category (docs/ROBUSTNESS.md, "The circuit breaker")."""

from __future__ import annotations

import collections
import enum
import math
import threading
from dataclasses import dataclass
from typing import Mapping


class Category(str, enum.Enum):
    NOT_FOUND = "not_found"  # no file at the uri
    PERMISSION_DENIED = "permission_denied"  # the file exists but may not be read
    TIMEOUT = "timeout"  # reading the file timed out
    HTTP_ERROR = "http_error"  # an HTTP(S) input answered with an error, or could not be reached
    NOT_A_REGULAR_FILE = "not_a_regular_file"  # a folder, a device, a pipe
    READ_ERROR = "read_error"  # any other failure to read the bytes (unknown protocol, ...)
    TOO_LARGE = "too_large"  # over decode.max_bytes, decode.max_pixels or video.max_frames
    NOT_AN_IMAGE = "not_an_image"  # empty, or a format no decoder identifies (for videos: not a video)
    DECODE_ERROR = "decode_error"  # an identified format whose data is corrupt or truncated
    MODEL_ERROR = "model_error"  # the model raised on the record alone, or returned NaN or inf
    BAD_MANIFEST_ROW = "bad_manifest_row"  # a manifest line or row that cannot be read as one (an empty uri, ...)
    BAD_LABEL = "bad_label"  # earlier runs only: a label that is no class index is now predictions.label_error
    DUPLICATE_ID = "duplicate_id"  # a later row of an id: another input listed earlier has it


# --- the circuit breaker: a failure of the job, not of its records -------------------------------------------

# What a stage whose records all fail with one category most likely has, said in the breaker's message.
SYSTEMIC_CAUSES = {
    Category.NOT_FOUND: "no input is found: a wrong path or base folder, or storage that is not mounted",
    Category.PERMISSION_DENIED: "the storage refuses every read: credentials or permissions",
    Category.TIMEOUT: "the storage stalls on every read",
    Category.HTTP_ERROR: "the server refuses every request or cannot be reached",
    Category.NOT_A_REGULAR_FILE: "the inputs are folders, devices or pipes",
    Category.READ_ERROR: "no input can be read: the storage or its protocol fails",
    Category.TOO_LARGE: "every input is over the limits (decode.max_bytes, decode.max_pixels, video.max_frames)",
    Category.NOT_AN_IMAGE: "the inputs are not images (or videos) this job decodes",
    Category.DECODE_ERROR: "no input decodes",
    Category.MODEL_ERROR: "the model cannot run: out of memory, a model that fails on any input, or a device "
                          "that does not work",
    Category.BAD_MANIFEST_ROW: "the manifest's rows cannot be read as records",
    Category.BAD_LABEL: "the labels are not class indices of the models",
    Category.DUPLICATE_ID: "the ids are not unique",
}
MARK = "systemic failure:"  # starts the breaker's message, so that it can be found in a runner's error text


@dataclass
class BreakerConfig:
    """When the job stops for a systemic failure: the ``circuit_breaker`` block of a cascade config
    (docs/ROBUSTNESS.md, "The circuit breaker")."""

    # records a stage's worker looks back over (the breaker is per stage and per worker); a job whose stage has
    # fewer records is judged on all of them when it ends; 0: off, every record fails on its own
    window: int = 200
    # stop when at least this share of the window (or of a shorter stage's records) failed with one category;
    # in (0.5, 1]
    share: float = 0.99


class SystemicFailure(RuntimeError):
    """(Nearly) every record of a stage failed the same way: the job stops, nothing is committed."""


def systemic_message(what: str, failed: int, records: int, category: Category | str, reason: str,
                     over: str) -> str:
    """The breaker's one line: where, how many, which category, its likely cause and the last reason."""
    category = Category(category)
    return (f"{MARK} {what}: {failed} of {over} {records} records failed with {category.value} "
            f"({SYSTEMIC_CAUSES[category]}); last reason: {reason}. Nothing is committed; fix the cause and rerun "
            "(circuit_breaker.window=0 lets every record fail on its own)")


class CircuitBreaker:
    """Counts one stage's outcomes per category over the last ``window`` records and raises ``SystemicFailure``
    when one category has at least ``share`` of them. Beam-free; a step keeps one per stage (per worker) and
    calls ``observe`` with each record's outcome: None for a record that passed, else its failure's category."""

    def __init__(self, what: str, config: BreakerConfig | None = None):
        config = config or BreakerConfig()
        self.what = what  # "stage 1 (lite0@224)", "reading"
        self.size = int(config.window)
        self.needed = math.ceil(config.share * self.size - 1e-9)  # failures of one category that trip it
        self._window: collections.deque = collections.deque()
        self._counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def observe(self, category: Category | str | None, reason: str = "") -> None:
        if self.size <= 0:
            return
        with self._lock:
            if len(self._window) == self.size:
                old = self._window.popleft()
                if old is not None:
                    self._counts[old] -= 1
            key = None if category is None else Category(category)
            self._window.append(key)
            if key is None:
                return
            self._counts[key] += 1
            failed = self._counts[key]
        if len(self._window) == self.size and failed >= self.needed:
            raise SystemicFailure(systemic_message(self.what, failed, self.size, key, reason, "the last"))


def judge(what: str, records: int, failures: Mapping[str, int], reason: str = "",
          config: BreakerConfig | None = None) -> str | None:
    """The breaker's rule over a whole stage of a finished job (``records`` reached it, ``failures`` per
    category): the message if one category has at least ``share`` of them, else None. Catches the jobs
    shorter than the window, and failures spread over workers each of which saw less than a window."""
    config = config or BreakerConfig()
    if config.window <= 0 or records <= 0 or not failures:
        return None
    category, failed = max(failures.items(), key=lambda kv: kv[1])
    if failed < math.ceil(config.share * records - 1e-9):
        return None
    return systemic_message(what, failed, records, category, reason, "all")


def systemic_cause(err: BaseException) -> str | None:
    """The breaker's line in an error a runner raised (Beam wraps a DoFn's exception in its own, often as
    text), or None when the error is another one."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        start = text.find(MARK)
        if start >= 0:
            line = text[start:].splitlines()[0]
            return line.split(" [while running")[0].rstrip()
        err = err.__cause__ or err.__context__
    return None
