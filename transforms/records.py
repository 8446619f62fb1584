"""The element types that flow through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from models.failures import Category
from transforms.tables import DEAD_LETTER

READ_STAGE = 0  # dead letters raised while listing or reading inputs, before stage 1


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
    extras: dict[str, Any] = field(default_factory=dict)  # the manifest's own columns, written with the prediction


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
    error: str  # the reason, for a person
    category: Category  # the reason's kind, for grouping

    def as_row(self, run_id: str) -> dict:
        return DEAD_LETTER.row(run_id=run_id, id=self.id, uri=self.uri, stage=self.stage,
                               category=Category(self.category).value, error=self.error)
