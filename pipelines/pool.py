"""Scored pools, shared by ``pipelines.calibrate`` (which searches them) and ``pipelines.report`` (which
plots them): reading the scores table of ``pipelines.score`` as a ``models.calibration.Pool``, and the
rows of a frontier (solitary entries, ensembles, cascades) as tables."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from models import calibration as cal
from pipelines.folder import RunFolder


def load_pool(scores: str, models: Sequence[str] | None = None, families: dict[str, str] | None = None,
              keep_ids: set[str] | None = None) -> tuple[cal.Pool, dict]:
    """The scores table as a Pool: records scored by every entry (others are counted and dropped). Records
    without a label keep label -1 (label-free targets need none). ``info`` holds the ids and uris."""
    table = RunFolder(scores).read("scores")
    ids = table.column("id").to_pylist()
    keys = table.column("model").to_pylist()
    wanted = list(dict.fromkeys(keys)) if not models else list(dict.fromkeys(models))
    missing = [m for m in wanted if m not in set(keys)]
    if missing:
        raise SystemExit(f"no scores for {', '.join(missing)} in {scores}; scored: {', '.join(sorted(set(keys)))}")
    by_entry = {m: {} for m in wanted}
    labels, gmacs, uris = {}, {}, {}
    label_col = table.column("label").to_pylist()
    uri_col = table.column("uri").to_pylist()
    gm_col = table.column("gmacs").to_pylist()
    logits_col = table.column("logits")
    for row, (rid, key) in enumerate(zip(ids, keys)):
        if key in by_entry and (keep_ids is None or rid in keep_ids):
            by_entry[key][rid] = row
            labels[rid] = label_col[row]
            uris[rid] = uri_col[row]
            gmacs[key] = gm_col[row]
    if not models:  # as scored, in order of cost (the table's row order is the runner's)
        wanted.sort(key=lambda m: (gmacs[m], m))
    common_ids = sorted(set.intersection(*(set(v) for v in by_entry.values())))
    if not common_ids:
        raise SystemExit(f"no record is scored by every entry of {', '.join(wanted)}")
    logits = np.stack([
        np.asarray(logits_col.take(pa.array([by_entry[m][i] for i in common_ids])).to_pylist(), dtype=np.float32)
        for m in wanted
    ])
    families = families or {}
    pool = cal.Pool(tuple(wanted), np.asarray([gmacs[m] for m in wanted]), logits,
                    np.asarray([-1 if labels[i] is None else labels[i] for i in common_ids]),
                    tuple(families.get(m, m) for m in wanted))
    info = {"records": len(common_ids), "dropped": len(set(labels) - set(common_ids)), "ids": common_ids,
            "uris": [uris[i] for i in common_ids]}
    return pool, info


def ensembles(pool: cal.Pool, max_models: int, kind, aggregation) -> list[cal.Choice]:
    """Every unordered committee of 2..max_models entries with all thresholds at 1 (order does not matter)."""
    out = []
    for k in range(2, max_models + 1):
        for combo in itertools.combinations(pool.keys, k):
            out.append(cal.replay(pool, combo, [1.0] * (k - 1), kind, aggregation))
    return out


def frontier_rows(pool: cal.Pool, frontier: list[cal.Choice], max_models: int, kind, aggregation,
                  heldout: cal.Pool | None = None) -> list[dict]:
    """Solitary entries, ensembles and frontier cascades of ``pool``, each replayed on ``heldout`` too."""
    solitary = [cal.replay(pool, [k], [], kind, aggregation) for k in pool.keys]
    ens = ensembles(pool, min(max_models, len(pool.keys)), kind, aggregation)
    cascades = [c for c in frontier if c.kind == "cascade"]
    everything = solitary + ens + cascades
    on_front = {id(c) for c in cal.pareto(everything)}
    rows = []
    for c in everything:
        held = None if heldout is None else cal.replay(heldout, c.models, c.thresholds, kind, aggregation)
        rows.append({**c.as_row(), "on_frontier": id(c) in on_front,
                     "heldout_accuracy": None if held is None else held.accuracy,
                     "heldout_avg_gmacs": None if held is None else held.avg_gmacs})
    return sorted(rows, key=lambda r: (r["avg_gmacs"], -r["accuracy"]))


def markdown_table(rows: list[dict]) -> str:
    held = any(r.get("heldout_accuracy") is not None for r in rows)
    lines = ["| kind | models | thresholds | accuracy | avg GMACs | worst GMACs | exit ratios | frontier |"
             + (" held-out accuracy | held-out avg GMACs |" if held else ""),
             "|---|---|---|---:|---:|---:|---|:-:|" + ("---:|---:|" if held else "")]
    for r in rows:
        t = ", ".join(f"{x:.4f}" for x in r["thresholds"]) or "-"
        e = " / ".join(f"{x:.1%}" for x in r["exit_ratios"])
        line = (f"| {r['kind']} | {r['models']} | {t} | {r['accuracy']:.2%} | {r['avg_gmacs']:.3f} | "
                f"{r['worst_gmacs']:.3f} | {e} | {'yes' if r['on_frontier'] else ''} |")
        if held:
            line += f" {r['heldout_accuracy']:.2%} | {r['heldout_avg_gmacs']:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
