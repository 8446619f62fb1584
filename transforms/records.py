"""The element types that flow through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from transforms.tables import DEAD_LETTER

READ_STAGE = 0  # dead letters raised while listing or reading inputs, before stage 1

# What kind of failure a dead letter is, from the first words of its reason (first match wins); a reason
# that matches none is a decoding failure (Pillow's and PyAV's many ways of saying "corrupt").
REASON_CATEGORIES = (
    ("file not found", "not_found"),
    ("permission denied", "permission_denied"),
    ("HTTP error", "http_error"),
    ("connection failed", "http_error"),
    ("timeout", "timeout"),
    ("not a regular file", "not_a_regular_file"),
    ("too large", "too_large"),
    ("image of ", "too_large"),
    ("video of ", "too_large"),
    ("more than ", "too_large"),
    ("empty file", "not_an_image"),
    ("not an image", "not_an_image"),
    ("image has no pixels", "not_an_image"),
    ("not a readable video", "not_an_image"),
    ("no video stream", "not_an_image"),
    ("model ", "model_error"),
    ("bad manifest row", "bad_manifest_row"),
    ("bad label", "bad_label"),
    ("duplicate id", "duplicate_id"),
    ("could not read", "read_error"),
)
DECODE_ERROR = "decode_error"
CATEGORIES = tuple(dict.fromkeys([c for _, c in REASON_CATEGORIES] + [DECODE_ERROR]))


def category_of(reason: str) -> str:
    """The category of a dead letter's reason (one of ``CATEGORIES``)."""
    return next((c for prefix, c in REASON_CATEGORIES if reason.startswith(prefix)), DECODE_ERROR)


def record_id(given: Optional[str], uri: str) -> str:
    """The id rule: a record's id is its manifest's ``id`` where it has one, else its uri."""
    return given or uri


@dataclass
class Record:
    """One input on its way through the cascade.

    Continuing records carry their encoded bytes (re-decoding at the next stage's resolution is cheaper
    than shipping pixels between workers) and the running sum of member scores that Algorithm 1 needs.
    """

    id: str
    uri: str
    label: Optional[int] = None
    data: bytes = b""
    score_sum: Optional[np.ndarray] = None  # float64 (C,), sum over the stages applied so far
    stages_run: int = 0
    gmacs: float = 0.0


@dataclass
class FrameRecord(Record):
    """A sampled video frame (``data`` holds it JPEG-encoded)."""

    video_id: str = ""
    frame_index: int = 0
    timestamp_s: float = 0.0


@dataclass
class VideoRecord(Record):
    """A whole video at video granularity: all its views (JPEG-encoded), classified together."""

    views: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Exit:
    """A record leaving the cascade: its combined logits (mean over the stages it went through) and their
    confidence. Its task turns it into a prediction row (``transforms.tasks``)."""

    record: Record
    combined: np.ndarray  # float64 (C,)
    confidence: float


@dataclass(frozen=True)
class DeadLetter:
    """An input that could not be classified, and why."""

    id: str
    uri: str
    stage: int  # 0 = listing/reading the input, k = stage k (decode or inference)
    error: str
    category: str = ""  # one of CATEGORIES; derived from ``error`` when not given

    def __post_init__(self):
        if not self.category:
            object.__setattr__(self, "category", category_of(self.error))

    def as_row(self) -> dict:
        return DEAD_LETTER.row(id=self.id, uri=self.uri, stage=self.stage, error=self.error)
