"""Committee maths of the paper (ensembles and Algorithm 1 cascades) over arrays of logits.

Pure numpy, no Beam: this is the reference that the pipeline's per-record routing must agree with,
and the building block of the calibration search.

Conventions:
- ``logits`` arrays have classes on the last axis; a stack of per-model logits is ``(M, N, C)``.
- Every confidence function returns a score in [0, 1], monotone in the quantity the paper names,
  so that thresholds mean the same range whatever the function (see ``Confidence``).
- A record exits at stage k when ``confidence >= t_k``; a threshold of 1 (or more) never lets a record
  exit, so all thresholds = 1 is the ensemble of all stages; the last stage always exits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


class Confidence(str, enum.Enum):
    """Confidence function g of the combined prediction."""

    MAX_PROB = "max_prob"  # max softmax probability
    LOGIT_GAP = "logit_gap"  # 1 - exp(-(z_top1 - z_top2)): a monotone map of the logit gap into [0, 1)
    PROB_GAP = "prob_gap"  # p_top1 - p_top2
    NEG_ENTROPY = "neg_entropy"  # 1 - H(p) / log(C): negative entropy rescaled into [0, 1]


class Aggregation(str, enum.Enum):
    """How the models of a committee are combined."""

    LOGITS = "logits"  # mean of logits (the paper's default)
    PROBS = "probs"  # mean of softmax probabilities
    LAST = "last"  # no committee: a stage's answer is its own model's (the early-exit cascade)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _top2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    part = np.partition(x, -2, axis=-1)
    return part[..., -1], part[..., -2]


def _max_prob(z: np.ndarray) -> np.ndarray:
    return softmax(z).max(axis=-1)


def _logit_gap(z: np.ndarray) -> np.ndarray:
    first, second = _top2(z)
    return -np.expm1(-(first - second))


def _prob_gap(z: np.ndarray) -> np.ndarray:
    first, second = _top2(softmax(z))
    return first - second


def _neg_entropy(z: np.ndarray) -> np.ndarray:
    entropy = -(softmax(z) * log_softmax(z)).sum(axis=-1)
    return 1.0 - entropy / np.log(z.shape[-1])


# Torch twins for large arrays (the calibration search): float32 or float64 tensors in, float64 out. From
# float32 input, only the small quantity that separates a confidence from 1 is computed in float32 (the
# mass outside the top class, the gap, the entropy), and 1 minus it in float64, so that confident records
# keep distinct scores: in plain float32, max_prob is exactly 1.0 beyond a logit gap of ~17 and the top
# percentiles would merge. The calibration search passes float64, to match the numpy reference bit for bit
# where a threshold sits exactly on a record's confidence.

def _rest(z):
    """exp(z - max) summed over every class but the top one, and the top two values of z."""
    top = z.topk(2, -1)
    e = (z - top.values[..., :1]).exp_()
    e.scatter_(-1, top.indices[..., :1], 0.0)
    return e.sum(-1), top.values


def _max_prob_torch(z):
    rest, _ = _rest(z)
    return 1.0 / (1.0 + rest.double())


def _logit_gap_torch(z):
    top = z.topk(2, -1).values
    return -(top[..., 1] - top[..., 0]).double().expm1()


def _prob_gap_torch(z):
    rest, top = _rest(z)
    second = (top[..., 1] - top[..., 0]).double().exp()
    return (1.0 - second) / (1.0 + rest.double())


def _neg_entropy_torch(z):
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return 1.0 - entropy.double() / np.log(z.shape[-1])


@dataclass(frozen=True)
class ConfidenceFunction:
    numpy: Callable[[np.ndarray], np.ndarray]  # float64 logits (..., C) -> (...) scores
    torch: Callable  # float32/64 tensor (..., C) -> float64 tensor (...); same scores to ~1e-7 (1e-15 from float64)


# Every member of Confidence has its implementations here (tests check the table covers the enum).
CONFIDENCE_FUNCTIONS: dict[Confidence, ConfidenceFunction] = {
    Confidence.MAX_PROB: ConfidenceFunction(_max_prob, _max_prob_torch),
    Confidence.LOGIT_GAP: ConfidenceFunction(_logit_gap, _logit_gap_torch),
    Confidence.PROB_GAP: ConfidenceFunction(_prob_gap, _prob_gap_torch),
    Confidence.NEG_ENTROPY: ConfidenceFunction(_neg_entropy, _neg_entropy_torch),
}


def confidence(logits: np.ndarray, kind: Confidence | str = Confidence.MAX_PROB) -> np.ndarray:
    """Confidence score in [0, 1] of each row of ``logits`` (computed in float64)."""
    return CONFIDENCE_FUNCTIONS[Confidence(kind)].numpy(np.asarray(logits, dtype=np.float64))


def confidence_torch(logits, kind: Confidence | str = Confidence.MAX_PROB):
    """``confidence`` over a float32 torch tensor, on its device; float64 result."""
    return CONFIDENCE_FUNCTIONS[Confidence(kind)].torch(logits)


def member_scores(logits: np.ndarray, aggregation: Aggregation | str = Aggregation.LOGITS) -> np.ndarray:
    """What a model adds to a committee's running sum: its logits, or its probabilities."""
    if Aggregation(aggregation) is Aggregation.PROBS:
        return softmax(logits).astype(np.float32)
    return np.asarray(logits, dtype=np.float32)


def accumulate(score_sum: np.ndarray | None, scores: np.ndarray,
               aggregation: Aggregation | str = Aggregation.LOGITS) -> np.ndarray:
    """The running score after one more member: the sum, or (``last``) the new member's scores alone."""
    if score_sum is None or Aggregation(aggregation) is Aggregation.LAST:
        return scores
    return score_sum + scores


def combine(score_sum: np.ndarray, count: int, aggregation: Aggregation | str = Aggregation.LOGITS) -> np.ndarray:
    """Combined logits of a committee from the running sum of ``count`` members' scores.

    For probability averaging it returns log(mean probabilities), whose softmax is the mean itself,
    so every confidence function applies to either kind of committee unchanged. With ``last`` the running
    score is the latest member's logits, returned as they are.
    """
    aggregation = Aggregation(aggregation)
    if aggregation is Aggregation.LAST:
        return np.asarray(score_sum, dtype=np.float64)
    mean = np.asarray(score_sum, dtype=np.float64) / count
    if aggregation is Aggregation.LOGITS:
        return mean
    return np.log(np.maximum(mean, np.finfo(np.float64).tiny))


def ensemble(stack: np.ndarray, aggregation: Aggregation | str = Aggregation.LOGITS) -> np.ndarray:
    """Combined logits of all M models of a ``(M, N, C)`` stack (with ``last``: the last model's)."""
    stack = np.asarray(stack)
    if Aggregation(aggregation) is Aggregation.LAST:
        return combine(member_scores(stack[-1], aggregation), 1, aggregation)
    scores = np.stack([member_scores(m, aggregation) for m in stack])
    return combine(scores.sum(axis=0, dtype=np.float64), stack.shape[0], aggregation)


def exits(conf: np.ndarray, threshold: float) -> np.ndarray:
    """The exit rule of Algorithm 1 for a non-final stage: g >= t, and t >= 1 never exits."""
    if threshold >= 1.0:
        return np.zeros(np.shape(conf), dtype=bool)
    return np.asarray(conf) >= threshold


@dataclass(frozen=True)
class CascadeResult:
    """Per-record outcome of a cascade over N records."""

    pred: np.ndarray  # (N,) int class index
    confidence: np.ndarray  # (N,) confidence of the final combined prediction
    exit_stage: np.ndarray  # (N,) 1-based stage at which the record exited
    logits: np.ndarray | None  # (N, C) combined logits at exit (None when replayed from recorded answers)
    gmacs: np.ndarray  # (N,) multiply-adds (1e9) spent on the record

    def exit_ratios(self, n_stages: int) -> np.ndarray:
        """Share of all records that exited at each stage."""
        counts = np.bincount(self.exit_stage, minlength=n_stages + 1)[1:]
        return counts / max(1, len(self.exit_stage))


def cascade(
    stack: np.ndarray,
    thresholds: Sequence[float],
    gmacs: Sequence[float] | None = None,
    kind: Confidence | str = Confidence.MAX_PROB,
    aggregation: Aggregation | str = Aggregation.LOGITS,
) -> CascadeResult:
    """Algorithm 1 of the paper over a ``(M, N, C)`` stack of per-model logits.

    ``thresholds`` has M - 1 entries (one more is accepted and ignored: the last stage always exits).
    ``gmacs`` gives each model's cost; a record's cost is the sum over the models it went through.
    """
    stack = np.asarray(stack)
    m, n = stack.shape[0], stack.shape[1]
    if len(thresholds) not in (m - 1, m):
        raise ValueError(f"{m} models need {m - 1} thresholds, got {len(thresholds)}")
    costs = np.zeros(m) if gmacs is None else np.asarray(gmacs, dtype=np.float64)
    score_sum = np.zeros(stack.shape[1:], dtype=np.float64)
    final = np.zeros(stack.shape[1:], dtype=np.float64)
    exit_stage = np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for k in range(m):
        score_sum[active] = accumulate(score_sum[active], member_scores(stack[k][active], aggregation), aggregation)
        combined = combine(score_sum[active], k + 1, aggregation)
        if k == m - 1:
            leaving = np.ones(int(active.sum()), dtype=bool)
        else:
            leaving = exits(confidence(combined, kind), thresholds[k])
        idx = np.flatnonzero(active)[leaving]
        final[idx] = combined[leaving]
        exit_stage[idx] = k + 1
        active[idx] = False
    return CascadeResult(
        pred=final.argmax(axis=-1),
        confidence=confidence(final, kind),
        exit_stage=exit_stage,
        logits=final,
        gmacs=np.cumsum(costs)[exit_stage - 1],
    )
