"""The element types that flow through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

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


@dataclass(frozen=True)
class DeadLetter:
    """An input that could not be classified, and why."""

    id: str
    uri: str
    stage: int  # 0 = listing/reading the input, k = stage k (decode or inference)
    error: str

    def as_row(self) -> dict:
        return {"id": self.id, "uri": self.uri, "stage": self.stage, "error": self.error}
