"""Calibration search: choose the models of a cascade and its thresholds from a pool's logits.

Pure numpy (optionally torch for the per-prefix maths), no Beam. The inputs are the logits that
``pipelines.score`` wrote for every pool entry (a model at one resolution) on a labelled held-out set.

How the search works
- Sequences: every ordered choice of 1..n pool entries. An entry appears at most once, since the same
  model at the same resolution twice gives identical logits; entries of one *family* (independently
  trained copies, e.g. ``b0#1``, ``b0#2``) stand for one model that may be repeated, the i-th use taking
  the i-th copy. Sequences are walked as a prefix tree, so a prefix's running logit sum, confidence and
  threshold statistics are computed once for all the sequences that extend it.
- Thresholds: stage k's candidates are percentiles of the confidence of the committee of the first k
  models (over all records), plus 0 (all exit) and 1 (none exit: the ensemble). Exit sets are nested
  (monotone in each threshold), so one histogram of the records over the candidate bins of stages
  1..k, summed cumulatively along each axis, gives accuracy, average cost and exit ratios for *every*
  point of the threshold grid at once: O(N + grid) per sequence, exact, no sampling.
- Monotonicity shortcuts (``prune=True``), which never change the answer: appending a stage never lowers
  a cascade's cost at given thresholds of its first stages, nor its worst case. So a prefix whose least
  cost over its grid exceeds the budget, whose worst case exceeds the bound, or (least-cost objective)
  whose least cost exceeds the best feasible cost found so far, is not extended.
- Large pools (``strategy="beam"``): exhaustive search is |pool|^n sequences; beam search keeps, at
  each depth, only the ``beam_width`` prefixes whose best feasible point scores best for the objective
  (and every prefix on the accuracy/GMACs Pareto frontier of that depth), then extends those: about
  beam_width x |pool| x n sequences.
- Overfitting: a grid of 1M threshold tuples fitted to a few thousand records is optimistic. Constraints
  are checked with a safety margin of ``margin_sigmas`` standard errors of the difference between this
  set's estimate and a new set of ``reference_size`` records (binomial for accuracy and for the share
  past stage 1, the records' cost spread for GMACs); ``pipelines.calibrate`` can also choose the
  sequence by k-fold cross-validation (``cross_validate``).

- Held out by construction: ``split_by_group`` puts every record of a group (the variants of one image) on
  one side of the selection / held-out split, and ``group_folds`` does the same for cross-validation;
  ``measure`` gives a choice's figures on the held-out set with cluster-robust standard errors
  (``clustered_se``), from which a config's promised margins are made.
- Label-free targets: replace ``Pool.labels`` by a reference's ``predictions`` and "accuracy" becomes
  agreement with it; nothing else changes.

Every result is replayed with ``models.committee.cascade`` (``replay``), the maths the pipeline routes by.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from models import committee

DEFAULT_PERCENTILES = tuple(float(q) for q in range(0, 101, 2))
# shadow records (every stage's answer known) below which a run's agreement, and thresholds recalibrated from
# them, are too noisy to trust (docs/CALIBRATION.md, "How many shadow records")
MIN_SHADOW_RECORDS = 400


class Goal(str, enum.Enum):
    MIN_COST = "min_cost"  # least average GMACs with accuracy >= target
    MAX_ACCURACY = "max_accuracy"  # best accuracy with average GMACs <= budget


@dataclass(frozen=True)
class Objective:
    """What the search optimises and under which constraints (all optional but the goal's own)."""

    goal: Goal = Goal.MAX_ACCURACY
    target_accuracy: float | None = None  # MIN_COST: accuracy to reach (fraction)
    budget_gmacs: float | None = None  # average GMACs per record allowed
    max_worst_gmacs: float | None = None  # bound on the sum of the cascade's models' GMACs
    max_past_first: float | None = None  # share of records allowed past stage 1
    margin_sigmas: float = 0.0  # safety margin on every constraint, in standard errors
    reference_size: int | None = None  # size of the new set the margin protects (default: this set's)

    def __post_init__(self):
        object.__setattr__(self, "goal", Goal(self.goal))
        if self.goal is Goal.MIN_COST and self.target_accuracy is None:
            raise ValueError("objective min_cost needs target_accuracy")
        if self.goal is Goal.MAX_ACCURACY and self.budget_gmacs is None and self.max_past_first is None:
            raise ValueError("objective max_accuracy needs budget_gmacs or max_past_first")


@dataclass(frozen=True)
class Pool:
    """Logits of every pool entry on one labelled set: ``logits`` is (P, N, C), rows aligned on records."""

    keys: tuple[str, ...]
    gmacs: np.ndarray  # (P,)
    logits: np.ndarray  # (P, N, C) float32
    labels: np.ndarray  # (N,) int; -1 where a record has no label
    families: tuple[str, ...] = ()  # entries of one family are independent copies of one model
    groups: np.ndarray | None = None  # (N,) int: records of one group (variants of one image) are split together

    def __post_init__(self):
        if not self.families:
            object.__setattr__(self, "families", tuple(self.keys))
        p, n = self.logits.shape[:2]
        if len(self.keys) != p or len(self.gmacs) != p or len(self.families) != p or len(self.labels) != n:
            raise ValueError(f"pool: {len(self.keys)} keys, {len(self.gmacs)} gmacs, {len(self.families)} families "
                             f"and {len(self.labels)} labels for logits of shape {self.logits.shape}")
        if len(set(self.keys)) != p:
            raise ValueError(f"pool: duplicate keys in {self.keys}")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"pool: {len(self.groups)} groups for {n} records")

    @property
    def size(self) -> int:
        return self.logits.shape[1]

    def index(self, key: str) -> int:
        if key not in self.keys:
            raise ValueError(f"unknown pool entry {key!r}; pool: {', '.join(self.keys)}")
        return self.keys.index(key)

    def subset(self, rows: np.ndarray) -> Pool:
        groups = None if self.groups is None else self.groups[rows]
        return replace(self, logits=self.logits[:, rows], labels=self.labels[rows], groups=groups)

    def group_of_each(self) -> np.ndarray:
        """Each record's group; a record without one is its own group."""
        return np.arange(self.size) if self.groups is None else np.asarray(self.groups)

    def select(self, keys: Sequence[str]) -> Pool:
        """The pool of the given entries only (same records)."""
        idx = [self.index(k) for k in keys]
        return replace(self, keys=tuple(keys), gmacs=self.gmacs[idx], logits=self.logits[idx],
                       families=tuple(self.families[i] for i in idx))

    def stack(self, models: Sequence[str]) -> np.ndarray:
        return self.logits[[self.index(k) for k in models]]

    def solitary_accuracy(self, key: str) -> float:
        return float((self.logits[self.index(key)].argmax(-1) == self.labels).mean())


@dataclass(frozen=True)
class Choice:
    """One cascade at one threshold tuple, with its figures on the set it was measured on."""

    models: tuple[str, ...]
    thresholds: tuple[float, ...]  # one fewer than models
    accuracy: float
    avg_gmacs: float
    worst_gmacs: float
    exit_ratios: tuple[float, ...]

    @property
    def kind(self) -> str:
        if len(self.models) == 1:
            return "solitary"
        return "ensemble" if all(t >= 1.0 for t in self.thresholds) else "cascade"

    def as_row(self) -> dict:
        return {"kind": self.kind, "models": " -> ".join(self.models), "thresholds": list(self.thresholds),
                "accuracy": self.accuracy, "avg_gmacs": self.avg_gmacs, "worst_gmacs": self.worst_gmacs,
                "exit_ratios": list(self.exit_ratios)}


@dataclass
class SearchResult:
    best: Choice | None  # None when nothing meets the constraints
    per_sequence: dict[tuple[str, ...], Choice] = field(default_factory=dict)  # best feasible per sequence
    frontier: list[Choice] = field(default_factory=list)  # Pareto points (accuracy vs avg GMACs)
    sequences: int = 0  # sequences evaluated
    grid_points: int = 0  # threshold tuples evaluated


# ---- per-prefix maths ---------------------------------------------------------------------------------

def numpy_prefix(pool: Pool, kind, aggregation):
    """(add, stats, final_correct) for the exact path: the committee's own float64 maths (replays bit for
    bit). ``final_correct`` is None: a final stage is scored with add + stats."""
    labels = pool.labels

    def add(score_sum, entry: int, depth: int):
        scores = committee.member_scores(pool.logits[entry], aggregation).astype(np.float64)
        return committee.accumulate(score_sum, scores, aggregation)

    def stats(score_sum, count: int, need_conf: bool):
        combined = committee.combine(score_sum, count, aggregation)
        conf = committee.confidence(combined, kind) if need_conf else None
        return conf, combined.argmax(-1) == labels

    return add, stats, None


def torch_prefix(pool: Pool, kind, aggregation, device: str = "auto", reuse_buffers: bool = True, top_k: int = 8):
    """(add, stats, final_correct) in torch (multi-threaded, or on the GPU): the fast path for large pools.
    Running sums are float32, confidences float64 (as the reference's), so the threshold candidates agree
    with the reference's to ~1e-7; ``replay`` gives exact figures.

    - ``add`` writes each depth's running sum into one preallocated buffer (a depth-first walk needs one
      per depth), so no 100 MB tensor is allocated per prefix.
    - ``final_correct`` scores a final stage without summing all classes: the top-k classes of the prefix
      sum and of the new model contain the argmax whenever the best sum among them beats the k-th values'
      sum; the few records where that bound fails are summed in full. Exact, and ~1,000/2k times less work.
    """
    import torch

    from models.inference import resolve_device

    dev = resolve_device(device)
    kind, aggregation = committee.Confidence(kind), committee.Aggregation(aggregation)
    labels = torch.as_tensor(pool.labels, device=dev)
    probs = aggregation is committee.Aggregation.PROBS
    last = aggregation is committee.Aggregation.LAST  # a stage's answer is its own model's: nothing is summed
    buffers: dict[int, torch.Tensor] = {}
    member: dict[int, torch.Tensor] = {}
    member_top: dict[int, tuple] = {}
    prefix_top: dict = {}

    def scores(entry: int):
        if entry not in member:
            z = torch.as_tensor(pool.logits[entry], dtype=torch.float32).to(dev)
            member[entry] = torch.softmax(z, -1) if probs else z
        return member[entry]

    def add(score_sum, entry: int, depth: int):
        x = scores(entry)
        if score_sum is None or last:
            return x
        if not reuse_buffers:
            return score_sum + x
        if depth not in buffers:
            buffers[depth] = torch.empty_like(x)
        return torch.add(score_sum, x, out=buffers[depth])

    def stats(score_sum, count: int, need_conf: bool):
        correct = (score_sum.argmax(-1) == labels).cpu().numpy()  # the mean's argmax is the sum's
        if not need_conf:
            return None, correct
        # float64: in float32, max_prob is exactly 1 from a logit gap of ~17 (logit_gap likewise), which merges
        # the most confident percentiles into "never exit"; the pipeline routes on float64 confidences
        z = score_sum.double() / (1 if last else count)
        if probs:
            z = torch.log(z.clamp_min_(torch.finfo(torch.float64).tiny))
        return committee.confidence_torch(z, kind).cpu().numpy(), correct

    def final_correct(prefix_sum, prefix_key, entry: int):
        if last:
            return (scores(entry).argmax(-1) == labels).cpu().numpy()
        if prefix_top.get("key") != prefix_key:
            v, i = torch.topk(prefix_sum, top_k, -1)
            prefix_top.update(key=prefix_key, v=v, i=i)
        x = scores(entry)
        if entry not in member_top:
            member_top[entry] = torch.topk(x, top_k, -1)
        xv, xi = member_top[entry]
        cand = torch.cat([prefix_top["i"], xi], 1).sort(1).values  # class order: ties go to the lowest class
        sums = prefix_sum.gather(1, cand) + x.gather(1, cand)
        best = sums.max(1)
        pred = cand.gather(1, best.indices[:, None])[:, 0]
        unsure = torch.nonzero(~(best.values > prefix_top["v"][:, -1] + xv[:, -1]))[:, 0]
        if len(unsure):
            pred[unsure] = (prefix_sum[unsure] + x[unsure]).argmax(-1)
        return (pred == labels).cpu().numpy()

    return add, stats, final_correct


# ---- threshold grid of one prefix ---------------------------------------------------------------------


def candidates(conf: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """Thresholds to try at a stage: 0 (all exit), percentiles of its confidence, and 1 (none exit)."""
    q = np.percentile(conf, [p for p in percentiles if 0 < p <= 100]) if len(conf) else np.zeros(0)
    inner = np.unique(np.concatenate([[0.0], q]))
    return np.concatenate([inner[inner < 1.0], [1.0]])


def _prefix_sums(h: np.ndarray, axes: int) -> np.ndarray:
    for ax in range(axes):
        h = np.cumsum(h, axis=ax)
    return h


def _hist(bins: list[np.ndarray], shape: tuple[int, ...], weights: np.ndarray | None) -> np.ndarray:
    flat = np.ravel_multi_index(tuple(bins), shape) if bins else np.zeros(len(weights), dtype=np.int64)
    size = int(np.prod(shape)) if shape else 1
    return np.bincount(flat, weights=weights, minlength=size).reshape(shape)


@dataclass
class _Node:
    """What a prefix of k stages passes to its extensions (grids over the thresholds of stages 1..k)."""

    entries: tuple[int, ...]
    score_sum: object
    bins: list[np.ndarray]  # per stage: index of the highest candidate <= confidence (exits iff index > i)
    thresholds: list[np.ndarray]  # per stage: candidate values
    exit_correct: np.ndarray  # correct records exiting at stages 1..k, grid (P_1..P_k)
    reach: list[np.ndarray]  # reach[j]: records reaching stage j+1, grid (P_1..P_j)
    reach_next: np.ndarray  # records reaching stage k+1, grid (P_1..P_k)


def _expand(grid: np.ndarray, ndim: int) -> np.ndarray:
    return grid.reshape(grid.shape + (1,) * (ndim - grid.ndim))


@dataclass
class _Grid:
    """Figures of one sequence over its whole threshold grid (axes: thresholds of stages 1..k-1)."""

    correct: np.ndarray
    cost: np.ndarray  # average GMACs
    cost_sq: np.ndarray  # mean of squared per-record GMACs (for the cost's standard error)
    reach: list[np.ndarray]  # records reaching each stage, broadcast to the grid
    worst: float
    n: int


def _evaluate(node_parent: _Node | None, bins_parent: list[np.ndarray], correct: np.ndarray,
              gmacs: np.ndarray, n: int) -> _Grid:
    """The cascade made of the parent's stages plus one final stage whose correctness is ``correct``."""
    k = len(bins_parent)
    shape = tuple(len(t) for t in node_parent.thresholds) if node_parent else ()
    final = _prefix_sums(_hist(bins_parent, shape, correct.astype(np.float64)), k)
    total = final if node_parent is None else node_parent.exit_correct + final
    reach = [np.float64(n)] + ([] if node_parent is None else node_parent.reach[1:] + [node_parent.reach_next])
    reach = [_expand(np.asarray(r, dtype=np.float64), k) for r in reach]
    cum = np.cumsum(gmacs)
    cost = sum(g * r for g, r in zip(gmacs, reach)) / n
    cost_sq = np.zeros_like(total, dtype=np.float64) + 0.0
    for j in range(k + 1):  # records exiting at stage j+1 paid cum[j]
        leaving = reach[j] - (reach[j + 1] if j < k else 0.0)
        cost_sq = cost_sq + cum[j] ** 2 * leaving / n
    return _Grid(np.broadcast_to(total, cost_sq.shape) / n if k else np.asarray(total) / n,
                 np.broadcast_to(cost, cost_sq.shape), cost_sq, reach, float(cum[-1]), n)


def _child_node(parent: _Node | None, entries, score_sum, conf: np.ndarray, correct: np.ndarray,
                percentiles: Sequence[float], n: int) -> _Node:
    """Bin the new stage's confidence and extend the exit grids by one axis."""
    thr = candidates(conf, percentiles)
    b = np.searchsorted(thr[:-1], conf, side="right")
    bins = ([] if parent is None else parent.bins) + [b]
    thresholds = ([] if parent is None else parent.thresholds) + [thr]
    shape = tuple(len(t) for t in thresholds)
    k = len(bins)
    # exits at stage k: reached it (b_j <= i_j for j < k) and b_k > i_k
    h = _prefix_sums(_hist(bins, shape, correct.astype(np.float64)), k - 1)
    exit_k = h.sum(axis=k - 1, keepdims=True) - np.cumsum(h, axis=k - 1)
    counts = _prefix_sums(_hist(bins, shape, None), k)
    exit_correct = exit_k if parent is None else _expand(parent.exit_correct, k) + exit_k
    reach = [np.float64(n)] if parent is None else parent.reach + [parent.reach_next]
    return _Node(entries, score_sum, bins, thresholds, exit_correct, reach, counts)


# ---- objective over a grid ----------------------------------------------------------------------------


def _feasible(grid: _Grid, objective: Objective) -> np.ndarray:
    n_ref = objective.reference_size or grid.n
    z = objective.margin_sigmas
    scale = math.sqrt(1.0 / grid.n + 1.0 / n_ref)
    ok = np.ones(grid.cost.shape, dtype=bool)
    if objective.max_worst_gmacs is not None and grid.worst > objective.max_worst_gmacs + 1e-12:
        ok[...] = False
    if objective.budget_gmacs is not None:
        sd = np.sqrt(np.maximum(grid.cost_sq - grid.cost ** 2, 0.0))
        ok &= grid.cost + z * sd * scale <= objective.budget_gmacs + 1e-12
    if objective.max_past_first is not None and len(grid.reach) > 1:
        share = grid.reach[1] / grid.n
        ok &= share + z * np.sqrt(share * (1 - share)) * scale <= objective.max_past_first + 1e-12
    if objective.goal is Goal.MIN_COST:
        acc = grid.correct
        ok &= acc - z * np.sqrt(acc * (1 - acc)) * scale >= objective.target_accuracy - 1e-12
    return ok


def _pick(grid: _Grid, ok: np.ndarray, objective: Objective) -> tuple[int, ...] | None:
    """Grid index of the best feasible point: max accuracy then least cost, or least cost then max accuracy."""
    if not ok.any():
        return None
    acc = np.where(ok, grid.correct, -np.inf)
    cost = np.where(ok, grid.cost, np.inf)
    if objective.goal is Goal.MAX_ACCURACY:
        primary, secondary = -acc, cost
    else:
        primary, secondary = cost, -acc
    best = primary.min()
    tied = primary <= best + 1e-12
    flat = np.argmin(np.where(tied, secondary, np.inf))
    return np.unravel_index(flat, ok.shape) if ok.ndim else ()


def _better(a: Choice | None, b: Choice, objective: Objective) -> bool:
    """Is ``b`` better than ``a`` for the objective (on ties the one found first stays)?"""
    if a is None:
        return True
    if objective.goal is Goal.MAX_ACCURACY:
        ka, kb = (-a.accuracy, a.avg_gmacs), (-b.accuracy, b.avg_gmacs)
    else:
        ka, kb = (a.avg_gmacs, -a.accuracy), (b.avg_gmacs, -b.accuracy)
    return kb[0] < ka[0] - 1e-12 or (abs(kb[0] - ka[0]) <= 1e-12 and kb[1] < ka[1] - 1e-12)


def _choice(keys, grid: _Grid, thresholds: list[np.ndarray], idx: tuple[int, ...]) -> Choice:
    reach = [float(np.broadcast_to(r, grid.cost.shape)[idx]) for r in grid.reach]
    exits = [(reach[j] - (reach[j + 1] if j + 1 < len(reach) else 0.0)) / grid.n for j in range(len(reach))]
    return Choice(tuple(keys), tuple(float(t[i]) for t, i in zip(thresholds, idx)),
                  float(grid.correct[idx]), float(grid.cost[idx]), grid.worst, tuple(exits))


def trimmed(pool: Pool, choice: Choice, kind: committee.Confidence | str = committee.Confidence.MAX_PROB,
            aggregation: committee.Aggregation | str = committee.Aggregation.LOGITS) -> Choice:
    """The same cascade without the stages no record reaches (after a threshold of 0 every record has exited)
    and, with ``last``, without the stages whose answer is never used (threshold 1: no record exits there, and
    the next stage's answer replaces theirs), replayed on ``pool``."""
    cut = next((i for i, t in enumerate(choice.thresholds) if t <= 0.0), len(choice.thresholds))
    models, thresholds = list(choice.models[: cut + 1]), list(choice.thresholds[:cut])
    if committee.Aggregation(aggregation) is committee.Aggregation.LAST:
        kept = [i for i, t in enumerate(thresholds) if t < 1.0] + [len(models) - 1]
        models, thresholds = [models[i] for i in kept], [thresholds[i] for i in kept[:-1]]
    return replay(pool, models, thresholds, kind, aggregation)


def pareto(points: list[Choice]) -> list[Choice]:
    """Points not beaten on both accuracy and average GMACs, by increasing cost."""
    out, best = [], -np.inf
    for c in sorted(points, key=lambda c: (c.avg_gmacs, -c.accuracy, len(c.models))):
        if c.accuracy > best + 1e-12:
            out.append(c)
            best = c.accuracy
    return out


def _grid_frontier(keys, grid: _Grid, thresholds, limit: int = 64) -> list[Choice]:
    """Pareto points of one sequence's grid (at most ``limit``, spread over its cost range)."""
    cost, acc = grid.cost.ravel(), grid.correct.ravel()
    order = np.lexsort((-acc, cost))
    run = np.maximum.accumulate(acc[order])
    keep = order[np.flatnonzero(np.concatenate([[True], run[1:] > run[:-1] + 1e-12]))]
    if len(keep) > limit:
        keep = keep[np.linspace(0, len(keep) - 1, limit).round().astype(int)]
    shape = grid.cost.shape
    return [_choice(keys, grid, thresholds, np.unravel_index(i, shape) if shape else ()) for i in keep]


# ---- the search ---------------------------------------------------------------------------------------


def next_entries(pool: Pool, prefix: tuple[int, ...]) -> list[int]:
    """Entries that may follow ``prefix``: for each family, its next unused copy (the i-th use of a family
    takes its i-th copy, so copies are never permuted among themselves); a single entry never repeats."""
    used = [pool.families[i] for i in prefix]
    out, seen = [], set()
    for i, fam in enumerate(pool.families):
        if fam in seen:
            continue
        members = [j for j, f in enumerate(pool.families) if f == fam]
        if used.count(fam) < len(members):
            out.append(members[used.count(fam)])
        seen.add(fam)
    return out


def sequences(pool: Pool, max_models: int) -> Iterator[tuple[int, ...]]:
    """Every ordered choice of 1..max_models entries (see ``next_entries``), in prefix (depth-first) order."""

    def walk(prefix: tuple[int, ...]):
        if prefix:
            yield prefix
        if len(prefix) < max_models:
            for e in next_entries(pool, prefix):
                yield from walk(prefix + (e,))

    yield from walk(())


def search(
    pool: Pool,
    objective: Objective,
    *,
    max_models: int = 4,
    kind: committee.Confidence | str = committee.Confidence.MAX_PROB,
    aggregation: committee.Aggregation | str = committee.Aggregation.LOGITS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    only: Sequence[Sequence[str]] | None = None,
    prune: bool = True,
    strategy: str = "exhaustive",
    beam_width: int = 8,
    frontier: bool = False,
    backend: str = "numpy",
    device: str = "auto",
) -> SearchResult:
    """Best cascade of up to ``max_models`` pool entries (and thresholds) for ``objective``.

    ``only`` restricts the search to the given sequences (and their prefixes are computed once).
    ``backend="torch"`` runs the per-prefix maths in torch (GPU when there is one): float32 sums, float64
    confidences.
    """
    if strategy not in ("exhaustive", "beam"):
        raise ValueError(f"strategy {strategy!r}: use 'exhaustive' or 'beam'")
    add, stats, final_correct = (numpy_prefix(pool, kind, aggregation) if backend == "numpy" else
                                 torch_prefix(pool, kind, aggregation, device, reuse_buffers=strategy == "exhaustive"))
    n = pool.size
    gm = np.asarray(pool.gmacs, dtype=np.float64)
    wanted = None if only is None else {tuple(pool.index(k) for k in s) for s in only}
    allowed_prefixes = None if wanted is None else {s[:j] for s in wanted for j in range(1, len(s) + 1)}
    result = SearchResult(best=None)
    points: list[Choice] = []

    def visit(parent: _Node | None, entry: int):
        entries = (parent.entries if parent else ()) + (entry,)
        keys = tuple(pool.keys[i] for i in entries)
        extend = len(entries) < max_models
        if not extend and parent is not None and final_correct is not None:
            score_sum, conf, correct = None, None, final_correct(parent.score_sum, parent.entries, entry)
        else:
            score_sum = add(parent.score_sum if parent else None, entry, len(entries))
            conf, correct = stats(score_sum, len(entries), extend)
        grid = _evaluate(parent, parent.bins if parent else [], correct, gm[list(entries)], n)
        ok = _feasible(grid, objective)
        thresholds = parent.thresholds if parent else []
        evaluated = wanted is None or entries in wanted
        if evaluated:
            result.sequences += 1
            result.grid_points += ok.size
            idx = _pick(grid, ok, objective)
            if idx is not None:
                choice = _choice(keys, grid, thresholds, idx)
                result.per_sequence[keys] = choice
                if _better(result.best, choice, objective):
                    result.best = choice
            if frontier:
                points.extend(_grid_frontier(keys, grid, thresholds))
        if not extend:
            return None
        if prune:  # extensions cost at least this prefix's least cost, and at least its worst case
            least = float(grid.cost.min())
            if objective.max_worst_gmacs is not None and grid.worst > objective.max_worst_gmacs + 1e-12:
                return None
            if objective.budget_gmacs is not None and least > objective.budget_gmacs + 1e-12:
                return None
            if (objective.goal is Goal.MIN_COST and result.best is not None
                    and least > result.best.avg_gmacs + 1e-12 and not frontier):
                return None
        return _child_node(parent, entries, score_sum, conf, correct, percentiles, n)

    def children_of(prefix: tuple[int, ...]) -> list[int]:
        return [e for e in next_entries(pool, prefix)
                if allowed_prefixes is None or prefix + (e,) in allowed_prefixes]

    if strategy == "exhaustive":
        def walk(parent: _Node | None):
            for entry in children_of(parent.entries if parent else ()):
                node = visit(parent, entry)
                if node is not None:
                    walk(node)
        walk(None)
    else:
        layer: list[_Node | None] = [None]
        while layer:
            scored = []
            for parent in layer:
                for entry in children_of(parent.entries if parent else ()):
                    node = visit(parent, entry)
                    if node is not None:
                        keys = tuple(pool.keys[i] for i in node.entries)
                        scored.append((result.per_sequence.get(keys), node))
            on_front = {id(c) for c in pareto([c for c, _ in scored if c is not None])}
            ranked = sorted(scored, key=lambda cn: _rank(cn[0], objective))
            layer = [nd for i, (c, nd) in enumerate(ranked) if i < beam_width or (c is not None and id(c) in on_front)]
    if frontier:
        result.frontier = pareto(points)
    return result


def _rank(choice: Choice | None, objective: Objective) -> tuple:
    if choice is None:
        return (1, 0.0, 0.0)
    if objective.goal is Goal.MAX_ACCURACY:
        return (0, -choice.accuracy, choice.avg_gmacs)
    return (0, choice.avg_gmacs, -choice.accuracy)


# ---- replay and validation ----------------------------------------------------------------------------


def replay(pool: Pool, models: Sequence[str], thresholds: Sequence[float],
           kind: committee.Confidence | str = committee.Confidence.MAX_PROB,
           aggregation: committee.Aggregation | str = committee.Aggregation.LOGITS) -> Choice:
    """Figures of a cascade by ``committee.cascade`` (Algorithm 1), the maths the pipeline routes by."""
    idx = [pool.index(k) for k in models]
    gm = np.asarray(pool.gmacs, dtype=np.float64)[idx]
    res = committee.cascade(pool.logits[idx], list(thresholds), gm, kind, aggregation)
    return Choice(tuple(models), tuple(float(t) for t in thresholds), float((res.pred == pool.labels).mean()),
                  float(res.gmacs.mean()), float(gm.sum()), tuple(float(r) for r in res.exit_ratios(len(idx))))


def cross_validate(pool: Pool, objective: Objective, folds: int = 5, seed: int = 0,
                   **search_kw) -> tuple[tuple[str, ...] | None, list[dict]]:
    """Choose the *sequence* by k-fold cross-validation: thresholds are fitted on k-1 folds and measured on
    the held-out fold; a sequence's score is its mean held-out figure, and it qualifies only if its
    held-out figures meet the constraints on average (accuracy target / GMACs budget without margin).
    Folds split the pool's groups (``Pool.groups``), so no group has records on both sides.
    Returns the best sequence (or None) and one row per sequence."""
    parts = group_folds(pool.group_of_each(), folds, seed)
    held: dict[tuple[str, ...], list[Choice]] = {}
    for f in range(folds):
        train = np.concatenate([parts[g] for g in range(folds) if g != f])
        fitted = search(pool.subset(np.sort(train)), objective, prune=False, **search_kw).per_sequence
        test = pool.subset(parts[f])
        for keys, choice in fitted.items():
            held.setdefault(keys, []).append(
                replay(test, keys, choice.thresholds, search_kw.get("kind", committee.Confidence.MAX_PROB),
                       search_kw.get("aggregation", committee.Aggregation.LOGITS)))
    rows = []
    for keys, outs in held.items():
        if len(outs) < folds:
            continue  # infeasible on some fold's training part
        acc = float(np.mean([c.accuracy for c in outs]))
        cost = float(np.mean([c.avg_gmacs for c in outs]))
        past = float(np.mean([1 - c.exit_ratios[0] for c in outs]))
        ok = ((objective.budget_gmacs is None or cost <= objective.budget_gmacs)
              and (objective.max_past_first is None or past <= objective.max_past_first)
              and (objective.goal is not Goal.MIN_COST or acc >= objective.target_accuracy))
        rows.append({"models": " -> ".join(keys), "cv_accuracy": acc, "cv_avg_gmacs": cost,
                     "cv_past_first": past, "qualifies": ok, "_keys": keys})
    qualified = [r for r in rows if r["qualifies"]]
    if not qualified:
        return None, rows
    if objective.goal is Goal.MAX_ACCURACY:
        best = min(qualified, key=lambda r: (-r["cv_accuracy"], r["cv_avg_gmacs"], len(r["_keys"])))
    else:
        best = min(qualified, key=lambda r: (r["cv_avg_gmacs"], -r["cv_accuracy"], len(r["_keys"])))
    return best["_keys"], rows


# ---- held-out protocol --------------------------------------------------------------------------------


def split_by_group(groups: np.ndarray, heldout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the selection set and of the held-out set: a random share ``heldout`` of the *groups* is held
    out, so that all records of a group (the variants of one image) fall on the same side."""
    uniq = np.unique(groups)
    held = np.random.default_rng(seed).permutation(uniq)[: int(round(heldout * len(uniq)))]
    mask = np.isin(groups, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def group_folds(groups: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Rows (sorted) of ``folds`` cross-validation folds made of whole groups."""
    uniq = np.random.default_rng(seed).permutation(np.unique(groups))
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(uniq, folds)]


def clustered_se(values: np.ndarray, groups: np.ndarray) -> float:
    """Standard error of the mean of per-record ``values`` when the records of one group are correlated
    (cluster-robust: from the spread of each group's summed deviations; equals the usual one for groups of 1)."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values - values.mean())
    g = len(sums)
    if g < 2:
        return float("nan")
    return math.sqrt(g / (g - 1) * float((sums ** 2).sum())) / len(values)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial share (95 % at z = 1.96): unlike the normal one, it stays inside
    [0, 1] and is honest near 0 and 1, where agreement shares live."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside, despite rounding


def predictions(pool: Pool, committee_keys: Sequence[str],
                aggregation: committee.Aggregation | str = committee.Aggregation.LOGITS) -> np.ndarray:
    """Class predicted for each record by one entry, or by the ensemble of several (a label-free reference)."""
    return committee.ensemble(pool.stack(committee_keys), aggregation).argmax(-1)


@dataclass(frozen=True)
class Measured:
    """A cascade's figures on a set it was not chosen on, with their group-level standard errors."""

    models: tuple[str, ...]
    thresholds: tuple[float, ...]
    accuracy: float | None  # on the records with a label; None when none has one
    accuracy_se: float | None
    agreement: float | None  # share of records whose prediction equals the reference's; None without one
    agreement_se: float | None
    avg_gmacs: float
    gmacs_se: float
    exit_ratios: tuple[float, ...]  # share of all records exiting at each stage
    escalated: tuple[float, ...]  # share of all records sent past each stage but the last
    records: int
    groups: int

    def margin(self, figure: str, sigmas: float, reference_groups: int | None = None) -> float | None:
        """``sigmas`` standard errors of the difference between this set's ``figure`` (accuracy, agreement or
        avg_gmacs) and that of a new set of ``reference_groups`` groups alike (default: as many as here)."""
        se = {"accuracy": self.accuracy_se, "agreement": self.agreement_se, "avg_gmacs": self.gmacs_se}[figure]
        if se is None:
            return None
        return sigmas * se * math.sqrt(1.0 + self.groups / (reference_groups or self.groups))


def measure(pool: Pool, models: Sequence[str], thresholds: Sequence[float],
            kind: committee.Confidence | str = committee.Confidence.MAX_PROB,
            aggregation: committee.Aggregation | str = committee.Aggregation.LOGITS,
            reference: np.ndarray | None = None) -> Measured:
    """Figures of a cascade (Algorithm 1, ``committee.cascade``) on ``pool``: accuracy against its labels (-1:
    none), agreement with ``reference`` predictions, cost and exit ratios, with standard errors by group."""
    idx = [pool.index(k) for k in models]
    gm = np.asarray(pool.gmacs, dtype=np.float64)[idx]
    res = committee.cascade(pool.logits[idx], list(thresholds), gm, kind, aggregation)
    return _measured(models, thresholds, res, pool.labels, reference, pool.group_of_each())


def _measured(models: Sequence[str], thresholds: Sequence[float], res: committee.CascadeResult, labels: np.ndarray,
              reference: np.ndarray | None, groups: np.ndarray) -> Measured:
    labelled = labels >= 0
    accuracy = accuracy_se = agreement = agreement_se = None
    if labelled.any():
        correct = (res.pred == labels)[labelled]
        accuracy, accuracy_se = float(correct.mean()), clustered_se(correct, groups[labelled])
    if reference is not None:
        same = res.pred == reference
        agreement, agreement_se = float(same.mean()), clustered_se(same, groups)
    exits = res.exit_ratios(len(models))
    return Measured(tuple(models), tuple(float(t) for t in thresholds), accuracy, accuracy_se, agreement,
                    agreement_se, float(res.gmacs.mean()), clustered_se(res.gmacs, groups),
                    tuple(float(r) for r in exits), tuple(float(1.0 - c) for c in np.cumsum(exits)[:-1]),
                    len(res.pred), len(np.unique(groups)))


# ---- from a run's answers (the shadow sample) -----------------------------------------------------------


def reference_of(keys: Sequence[str], aggregation: committee.Aggregation | str) -> str:
    """What the last stage of the cascade ``keys`` answers, spelled as a label-free target's reference: its own
    model's answer (``last``, or one stage), else the ensemble of every stage."""
    if len(keys) == 1 or committee.Aggregation(aggregation) is committee.Aggregation.LAST:
        return keys[-1]
    return f"ensemble({','.join(keys)})"


@dataclass(frozen=True)
class ShadowAgreement:
    """What a run's shadow sample measured: the records shadowed, those that went through every stage
    (``complete``), how many of those have the cascade's answer equal to the last stage's, its 95 % interval,
    and what the last stage answers (``reference``)."""

    records: int
    complete: int
    agreed: int
    low: float
    high: float
    reference: str

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.complete if self.complete else None


def shadow_agreement(stats: Sequence[Mapping], aggregation: committee.Aggregation | str
                     ) -> ShadowAgreement | None:
    """A run's shadow agreement from its exit_stats rows (stage 0 first; None: the run had no shadow sample).
    ``aggregation`` as a config's YAML spells it too (``LOGITS``)."""
    if not stats[0].get("shadow_records"):
        return None
    stages = [s for s in stats if s["stage"] >= 1]
    n, agreed = sum(s["shadow_exited"] for s in stages), sum(s["shadow_agreed"] for s in stages)
    low, high = wilson_interval(agreed, n)
    reference = reference_of([s["model"] for s in stages], str(getattr(aggregation, "value", aggregation)).lower())
    return ShadowAgreement(stats[0]["shadow_records"], n, agreed, low, high, reference)


@dataclass(frozen=True)
class Answers:
    """Every stage's answer (the committee's class and confidence at that stage, what routing saw) on records
    that went through every stage of one cascade: a run's shadow records. Enough to replay Algorithm 1 at any
    thresholds of that cascade, or of its prefixes, without logits."""

    keys: tuple[str, ...]  # the stages' pool entries, in order
    gmacs: np.ndarray  # (K,) per stage
    pred: np.ndarray  # (K, N) int
    conf: np.ndarray  # (K, N) float64
    labels: np.ndarray  # (N,) int; -1 where a record has no label
    groups: np.ndarray | None = None  # (N,) int, as Pool.groups

    @property
    def size(self) -> int:
        return self.pred.shape[1]

    def subset(self, rows: np.ndarray) -> Answers:
        return replace(self, pred=self.pred[:, rows], conf=self.conf[:, rows], labels=self.labels[rows],
                       groups=None if self.groups is None else self.groups[rows])

    def group_of_each(self) -> np.ndarray:
        return np.arange(self.size) if self.groups is None else np.asarray(self.groups)


def below_float32(threshold: float) -> float:
    """A threshold chosen on float32 confidences (the ``stages`` column's) made exact for the pipeline's float64
    ones: halfway down to the next float32, so that a float64 confidence reaches it exactly when its float32
    rounding reaches ``threshold`` (0 and 1 stay: all exit, none exit)."""
    if threshold <= 0.0 or threshold >= 1.0:
        return float(threshold)
    t = np.float32(threshold)
    return (float(t) + float(np.nextafter(t, np.float32(0.0)))) / 2.0


def decide(answers: Answers, thresholds: Sequence[float]) -> committee.CascadeResult:
    """Algorithm 1 over recorded answers: the cascade of the first ``len(thresholds) + 1`` stages; a record
    exits at the first stage whose confidence reaches its threshold (``committee.exits``), else at the last.
    ``logits`` of the result is None: only classes were recorded."""
    k, n = len(thresholds) + 1, answers.size
    exit_stage = np.full(n, k, dtype=np.int64)
    for j in reversed(range(k - 1)):  # the first stage that lets a record exit wins
        exit_stage[committee.exits(answers.conf[j], thresholds[j])] = j + 1
    rows = np.arange(n)
    return committee.CascadeResult(
        pred=answers.pred[exit_stage - 1, rows], confidence=answers.conf[exit_stage - 1, rows],
        exit_stage=exit_stage, logits=None, gmacs=np.cumsum(answers.gmacs[:k])[exit_stage - 1])


def search_answers(answers: Answers, truth: np.ndarray, objective: Objective,
                   percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> SearchResult:
    """The best thresholds of the answers' cascade, and of each of its prefixes (a prefix is the same cascade
    with its later stages removed), for ``objective``; ``truth`` is what counts as correct (labels, or the last
    stage's answers for agreement with it). The same exact grid as ``search``, on recorded confidences."""
    n, gm = answers.size, np.asarray(answers.gmacs, dtype=np.float64)
    result, parent = SearchResult(best=None), None
    for k in range(len(answers.keys)):
        correct = answers.pred[k] == truth
        grid = _evaluate(parent, parent.bins if parent else [], correct, gm[: k + 1], n)
        ok = _feasible(grid, objective)
        result.sequences += 1
        result.grid_points += ok.size
        idx = _pick(grid, ok, objective)
        if idx is not None:
            choice = _choice(answers.keys[: k + 1], grid, parent.thresholds if parent else [], idx)
            result.per_sequence[choice.models] = choice
            if _better(result.best, choice, objective):
                result.best = choice
        if k + 1 < len(answers.keys):
            parent = _child_node(parent, tuple(range(k + 1)), None, answers.conf[k], correct, percentiles, n)
    return result


def measure_answers(answers: Answers, thresholds: Sequence[float], reference: np.ndarray | None = None) -> Measured:
    """``measure`` for a cascade (a prefix of the answers' stages) replayed on recorded answers."""
    res = decide(answers, thresholds)
    return _measured(answers.keys[: len(thresholds) + 1], thresholds, res, answers.labels, reference,
                     answers.group_of_each())


def brute_force(pool: Pool, objective: Objective, models: Sequence[str],
                kind: committee.Confidence | str = committee.Confidence.MAX_PROB,
                aggregation: committee.Aggregation | str = committee.Aggregation.LOGITS,
                percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Choice | None:
    """Reference for tests: every candidate threshold tuple of one sequence replayed with committee.cascade."""
    import itertools

    idx = [pool.index(k) for k in models]
    grids, score_sum = [], None
    for j, i in enumerate(idx[:-1]):
        s = committee.member_scores(pool.logits[i], aggregation).astype(np.float64)
        score_sum = committee.accumulate(score_sum, s, aggregation)
        grids.append(candidates(committee.confidence(committee.combine(score_sum, j + 1, aggregation), kind),
                                percentiles))
    best = None
    for ts in itertools.product(*grids):
        c = replay(pool, models, ts, kind, aggregation)
        g = _single_grid(pool, c)
        if _feasible(g, objective).item() and _better(best, c, objective):
            best = c
    return best


def _single_grid(pool: Pool, c: Choice) -> _Grid:
    """A one-point grid of a replayed choice, to check it against an objective the way the search does."""
    cum = np.cumsum(pool.gmacs[[pool.index(k) for k in c.models]])
    n = pool.size
    exits = np.asarray(c.exit_ratios) * n
    reach = [np.asarray(n - exits[:j].sum()) for j in range(len(exits))]
    cost_sq = np.asarray(float((cum ** 2 * exits).sum() / n))
    return _Grid(np.asarray(c.accuracy), np.asarray(c.avg_gmacs), cost_sq, reach, c.worst_gmacs, n)


def synthetic_pool(n: int, classes: int, skills: Sequence[float], gmacs: Sequence[float], seed: int = 0,
                   copies: int = 1, shared: float = 0.3) -> Pool:
    """A pool of correlated synthetic classifiers (for tests and benchmarks): each record has a difficulty
    shared by all models and a noise pattern partly shared, so committees help as they do on real data.
    With ``copies`` > 1 every model gets that many independent copies (one family)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    difficulty = rng.gamma(2.0, 0.5, n).astype(np.float32)
    common = rng.standard_normal((n, classes), dtype=np.float32)
    keys, fams, gm, logits = [], [], [], np.empty((len(skills) * copies, n, classes), dtype=np.float32)
    for m, (skill, cost) in enumerate(zip(skills, gmacs)):
        for c in range(copies):
            i = m * copies + c
            z = logits[i]
            z[...] = rng.standard_normal((n, classes), dtype=np.float32)
            z *= math.sqrt(1 - shared)
            z += math.sqrt(shared) * common
            z[np.arange(n), labels] += skill / difficulty
            z *= 2.0
            keys.append(f"m{m}" if copies == 1 else f"m{m}#{c + 1}")
            fams.append(f"m{m}")
            gm.append(cost)
    return Pool(tuple(keys), np.asarray(gm, dtype=np.float64), logits, labels, tuple(fams))
