"""The element types that flow through the pipeline."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from models.failures import Category
from transforms.tables import DEAD_LETTER

READ_STAGE = 0  # dead letters raised while listing or reading inputs, before stage 1

# A dead letter raised where its failure's kind is known carries its category (``models.failures.Category``);
# the others take it from the first words of their reason (first match wins); a reason that matches none is a
# decoding failure (Pillow's and PyAV's many ways of saying "corrupt").
REASON_CATEGORIES = (
    ("file not found", Category.NOT_FOUND),
    ("permission denied", Category.PERMISSION_DENIED),
    ("HTTP error", Category.HTTP_ERROR),
    ("connection failed", Category.HTTP_ERROR),
    ("timeout", Category.TIMEOUT),
    ("not a regular file", Category.NOT_A_REGULAR_FILE),
    ("too large", Category.TOO_LARGE),
    ("image of ", Category.TOO_LARGE),
    ("video of ", Category.TOO_LARGE),
    ("more than ", Category.TOO_LARGE),
    ("file of ", Category.TOO_LARGE),
    ("file exceeds", Category.TOO_LARGE),
    ("empty file", Category.NOT_AN_IMAGE),
    ("not an image", Category.NOT_AN_IMAGE),
    ("image has no pixels", Category.NOT_AN_IMAGE),
    ("not a readable video", Category.NOT_AN_IMAGE),
    ("no video stream", Category.NOT_AN_IMAGE),
    ("model ", Category.MODEL_ERROR),
    ("bad manifest row", Category.BAD_MANIFEST_ROW),
    ("manifest row", Category.BAD_MANIFEST_ROW),
    ("duplicate id", Category.DUPLICATE_ID),
    ("could not read", Category.READ_ERROR),
)
CATEGORIES = tuple(c.value for c in Category)


def category_of(reason: str) -> Category:
    """The category of a dead letter's reason, for a dead letter raised without one."""
    return next((c for prefix, c in REASON_CATEGORIES if reason.startswith(prefix)), Category.DECODE_ERROR)


def utf8_text(text: str) -> str:
    """``text`` as valid UTF-8 for a table: a byte that is not UTF-8 (a file name decoded with
    surrogateescape) as ``\\xNN``, any other lone surrogate as ``\\uNNNN``; valid text unchanged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(c if not 0xD800 <= ord(c) <= 0xDFFF else f"\\x{ord(c) - 0xDC00:02x}"
                       if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}" for c in text)


def in_shadow(record_id: str, share: float) -> bool:
    """The shadow rule: a record goes through every stage when the hash of its id falls in the first ``share``
    of the hash range, so that a rerun (or another execution mode, or another worker) picks the same records."""
    if share <= 0.0:
        return False
    draw = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return draw < share


@dataclass(frozen=True)
class StageAnswer:
    """What one stage answered for a record: its committee's class and confidence (what routing saw)."""

    stage: int  # 1-based
    model: str  # the stage's pool entry, name@resolution
    pred_class: int
    confidence: float

    def as_entry(self) -> dict:
        """The entry of the predictions' ``stages`` list."""
        return {"stage": self.stage, "model": self.model, "pred_class": self.pred_class,
                "confidence": self.confidence}


@dataclass(frozen=True)
class Decision:
    """The cascade's decision on a shadow record, kept while the record goes on through the later stages."""

    stage: int
    combined: np.ndarray  # float64 (C,): the committee's logits at that stage
    confidence: float
    gmacs: float  # what the cascade spent on the record up to that stage


@dataclass
class Record:
    """One input on its way through the cascade.

    Continuing records carry their encoded bytes (re-decoding at the next stage's resolution is cheaper
    than shipping pixels between workers) and the running sum of member scores that Algorithm 1 needs.
    """

    id: str
    uri: str
    label: Optional[int] = None  # a class index; None: unlabelled
    label_error: Optional[str] = None  # why the manifest's label cell is not a class index (the record is unlabelled)
    data: bytes = b""
    score_sum: Optional[np.ndarray] = None  # float64 (C,), sum over the stages applied so far
    stages_run: int = 0
    gmacs: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)  # the manifest's own columns, written with the prediction
    answers: tuple[StageAnswer, ...] = ()  # each stage's answer so far, in stage order
    decision: Optional[Decision] = None  # a shadow record's: the cascade decided, the later stages still run


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
    """A record leaving the cascade: its combined logits (the committee of the stages it went through, at the
    stage the cascade decided on) and their confidence. Its task turns it into a prediction row
    (``transforms.tasks``)."""

    record: Record
    combined: np.ndarray  # float64 (C,)
    confidence: float

    @property
    def stage(self) -> int:
        """The stage the cascade exited the record at (a shadow record's later stages are not counted)."""
        return self.record.decision.stage if self.record.decision else self.record.stages_run

    @property
    def gmacs(self) -> float:
        """What the cascade spent on the record; a shadow record's later stages are ``shadow_gmacs``."""
        return self.record.decision.gmacs if self.record.decision else self.record.gmacs

    @property
    def shadow_gmacs(self) -> float:
        return self.record.gmacs - self.gmacs

    @classmethod
    def decided(cls, record: Record) -> "Exit":
        """A shadow record leaving with the cascade's decision (its answers hold every stage it went through)."""
        return cls(record, record.decision.combined, record.decision.confidence)


@dataclass(frozen=True)
class DeadLetter:
    """An input that could not be classified, and why."""

    id: str
    uri: str
    stage: int  # 0 = listing/reading the input, k = stage k (decode or inference)
    error: str  # the reason, for a person
    category: Category | str = ""  # the reason's kind, for grouping; from ``error`` when not given

    def __post_init__(self):
        object.__setattr__(self, "category", Category(self.category) if self.category else category_of(self.error))

    def as_row(self, run_id: str) -> dict:
        return DEAD_LETTER.row(run_id=run_id, id=utf8_text(self.id), uri=utf8_text(self.uri), stage=self.stage,
                               category=Category(self.category).value, error=utf8_text(self.error))
