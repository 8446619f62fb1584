"""Choose a cascade (models and thresholds) from a scored held-out set: the second step of calibration.

    python -m pipelines.calibrate --scores scores/ --output calibration/ \
        --objective max_accuracy --budget match:lite2@260 --margin_sigmas 1 --folds 5 \
        --config_out configs/my_calibrated.yaml

Reads the ``scores`` table of ``pipelines.score``, runs ``models.calibration.search`` and writes:
- the cascade config (``--config_out``, default ``OUTPUT/cascade.yaml``): ``--config`` (a cascade YAML or
  profile, default lite_cascade) with its stages, confidence and aggregation replaced; dotted overrides
  apply to it; ``python -m pipelines.cascade --config THAT.yaml`` runs it unchanged;
- ``frontier.parquet`` and ``frontier.md``: solitary models, ensembles and the Pareto-frontier cascades
  (accuracy vs average GMACs) with exit ratios per stage;
- ``calibration.json`` (objective, choice, figures replayed by ``models.committee.cascade``) and the
  plots and ``report.md`` of ``pipelines.report``.

Targets: ``--target 0.8`` or ``--target match:lite2@260`` (that entry's accuracy on this set);
``--budget 0.86`` or ``--budget match:lite2@260`` (its GMACs). ``--where variant=clean`` keeps the
records whose manifest row (``--manifest``) has that value.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs import schema
from models import calibration as cal
from models import committee
from pipelines import common

FRONTIER_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # solitary, ensemble or cascade
        pa.field("models", pa.string(), nullable=False),  # pool entries in stage order, " -> "-joined
        pa.field("thresholds", pa.list_(pa.float64())),  # one per stage but the last
        pa.field("accuracy", pa.float64(), nullable=False),
        pa.field("avg_gmacs", pa.float64(), nullable=False),
        pa.field("worst_gmacs", pa.float64(), nullable=False),
        pa.field("exit_ratios", pa.list_(pa.float64())),  # share of all records exiting at each stage
        pa.field("on_frontier", pa.bool_(), nullable=False),  # not beaten on both accuracy and GMACs
    ]
)


def parse(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(prog="python -m pipelines.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="output folder of pipelines.score")
    parser.add_argument("--output", required=True, help="folder for the frontier, summary and plots")
    parser.add_argument("--config_out", default=None, help="cascade YAML to write (default OUTPUT/cascade.yaml)")
    parser.add_argument("--config", default="lite_cascade", help="cascade YAML/profile the output inherits from")
    parser.add_argument("--objective", choices=[g.value for g in cal.Goal], default=cal.Goal.MAX_ACCURACY.value)
    parser.add_argument("--target", default=None, help="min_cost: accuracy to reach, or match:ENTRY")
    parser.add_argument("--budget", default=None, help="average GMACs allowed, or match:ENTRY")
    parser.add_argument("--max_worst_gmacs", type=float, default=None, help="bound on the sum of the models' GMACs")
    parser.add_argument("--max_past_first", type=float, default=None, help="share of records allowed past stage 1")
    parser.add_argument("--models", default=None, help="comma-separated pool entries to use (default: all scored)")
    parser.add_argument("--only", action="append", default=None,
                        help="search only this sequence, e.g. lite0@224,lite1@240,lite2@260 (repeatable)")
    parser.add_argument("--family", action="append", default=[],
                        help="ENTRY=FAMILY: entries of one family are independent copies of one model")
    parser.add_argument("--max_models", type=int, default=4, help="longest cascade searched")
    parser.add_argument("--confidence", default=None, help="confidence function (default: the --config's)")
    parser.add_argument("--aggregation", default=None, help="logits or probs (default: the --config's)")
    parser.add_argument("--percentile_step", type=float, default=2.0, help="threshold candidates every P percent")
    parser.add_argument("--margin_sigmas", type=float, default=1.0, help="safety margin in standard errors")
    parser.add_argument("--reference_size", type=int, default=None, help="size of the set the margin protects")
    parser.add_argument("--folds", type=int, default=5, help="choose the sequence by k-fold CV (0: off)")
    parser.add_argument("--strategy", choices=["exhaustive", "beam"], default="exhaustive")
    parser.add_argument("--beam_width", type=int, default=8)
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--manifest", default=None, help="manifest with extra columns for --where")
    parser.add_argument("--where", action="append", default=[], help="COLUMN=VALUE filter on --manifest rows")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    args, overrides, rest = common.split_argv(parser, argv)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    if args.where and not args.manifest:
        parser.error("--where needs --manifest")
    return args, overrides


def load_pool(scores: str, models: Sequence[str] | None = None, families: dict[str, str] | None = None,
              keep_ids: set[str] | None = None) -> tuple[cal.Pool, dict]:
    """The scores table as a Pool: records scored by every entry (others are counted and dropped)."""
    table = common.read_table(scores, "scores")
    ids = table.column("id").to_pylist()
    keys = table.column("model").to_pylist()
    wanted = list(dict.fromkeys(keys)) if not models else list(models)
    missing = [m for m in wanted if m not in set(keys)]
    if missing:
        raise SystemExit(f"no scores for {', '.join(missing)} in {scores}; scored: {', '.join(sorted(set(keys)))}")
    by_entry = {m: {} for m in wanted}
    labels, gmacs = {}, {}
    label_col = table.column("label").to_pylist()
    gm_col = table.column("gmacs").to_pylist()
    logits_col = table.column("logits")
    for row, (rid, key) in enumerate(zip(ids, keys)):
        if key in by_entry and (keep_ids is None or rid in keep_ids):
            by_entry[key][rid] = row
            labels[rid] = label_col[row]
            gmacs[key] = gm_col[row]
    common_ids = sorted(set.intersection(*(set(v) for v in by_entry.values())))
    common_ids = [i for i in common_ids if labels[i] is not None]
    if not common_ids:
        raise SystemExit(f"no labelled record is scored by every entry of {', '.join(wanted)}")
    logits = np.stack([
        np.asarray(logits_col.take(pa.array([by_entry[m][i] for i in common_ids])).to_pylist(), dtype=np.float32)
        for m in wanted
    ])
    families = families or {}
    pool = cal.Pool(tuple(wanted), np.asarray([gmacs[m] for m in wanted]), logits,
                    np.asarray([labels[i] for i in common_ids]), tuple(families.get(m, m) for m in wanted))
    info = {"records": len(common_ids), "dropped": len(set(labels) - set(common_ids)), "ids": common_ids}
    return pool, info


def manifest_ids(manifest: str, where: Sequence[str]) -> set[str]:
    """Ids (as ReadInputs makes them) of the manifest rows matching every COLUMN=VALUE filter."""
    from transforms.io import manifest_entries
    from transforms.records import Record

    tests = [w.split("=", 1) for w in where]
    return {entry.id for row, entry in manifest_entries(manifest)
            if isinstance(entry, Record) and all(str(row.get(c)) == v for c, v in tests)}


def resolve(value: str | None, pool: cal.Pool, what: str) -> float | None:
    """A number, or ``match:ENTRY``: that entry's accuracy (target) or GMACs (budget) on this set."""
    if value is None:
        return None
    if value.startswith("match:"):
        key = value[len("match:"):]
        return pool.solitary_accuracy(key) if what == "target" else float(pool.gmacs[pool.index(key)])
    return float(value)


def ensembles(pool: cal.Pool, max_models: int, kind, aggregation) -> list[cal.Choice]:
    """Every unordered committee of 2..max_models entries with all thresholds at 1 (order does not matter)."""
    out = []
    for k in range(2, max_models + 1):
        for combo in itertools.combinations(pool.keys, k):
            out.append(cal.replay(pool, combo, [1.0] * (k - 1), kind, aggregation))
    return out


def frontier_rows(pool: cal.Pool, frontier: list[cal.Choice], max_models: int, kind, aggregation) -> list[dict]:
    solitary = [cal.replay(pool, [k], [], kind, aggregation) for k in pool.keys]
    ens = ensembles(pool, min(max_models, len(pool.keys)), kind, aggregation)
    cascades = [c for c in frontier if c.kind == "cascade"]
    everything = solitary + ens + cascades
    on_front = {id(c) for c in cal.pareto(everything)}
    rows = [{**c.as_row(), "on_frontier": id(c) in on_front} for c in everything]
    return sorted(rows, key=lambda r: (r["avg_gmacs"], -r["accuracy"]))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| kind | models | thresholds | accuracy | avg GMACs | worst GMACs | exit ratios | frontier |",
             "|---|---|---|---:|---:|---:|---|:-:|"]
    for r in rows:
        t = ", ".join(f"{x:.4f}" for x in r["thresholds"]) or "-"
        e = " / ".join(f"{x:.1%}" for x in r["exit_ratios"])
        lines.append(f"| {r['kind']} | {r['models']} | {t} | {r['accuracy']:.2%} | {r['avg_gmacs']:.3f} | "
                     f"{r['worst_gmacs']:.3f} | {e} | {'yes' if r['on_frontier'] else ''} |")
    return "\n".join(lines) + "\n"


def cascade_config(base: schema.CascadeConfig, choice: cal.Choice, kind, aggregation) -> schema.CascadeConfig:
    """``base`` with the chosen stages (batch sizes and settings of base's first stage), confidence and
    aggregation; validated like any config."""
    template = base.stages[0]
    stages = []
    for i, key in enumerate(choice.models):
        name, _, res = key.partition("@")
        threshold = choice.thresholds[i] if i < len(choice.thresholds) else 1.0
        stages.append(schema.StageConfig(model=name, resolution=int(res) if res else None,
                                         batch_size=template.batch_size, threshold=float(threshold),
                                         precision=template.precision, channels_last=template.channels_last,
                                         compile=template.compile))
    cfg = schema.CascadeConfig(**{**base.__dict__, "stages": stages, "confidence": committee.Confidence(kind),
                                  "aggregation": committee.Aggregation(aggregation), "overwrite": False})
    schema.validate(cfg)
    return cfg


def write_config(path: str, cfg: schema.CascadeConfig, header: list[str]) -> None:
    with fsspec.open(path, "w") as fh:
        fh.write("".join(f"# {line}\n" for line in header) + schema.to_yaml(cfg))


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the calibration; returns the summary (also written as ``calibration.json``)."""
    args, overrides = parse(argv)
    try:
        base = schema.load(args.config, overrides)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    kind = committee.Confidence(args.confidence or base.confidence)
    aggregation = committee.Aggregation(args.aggregation or base.aggregation)
    keep = manifest_ids(args.manifest, args.where) if args.where else None
    families = dict(f.split("=", 1) for f in args.family)
    models = args.models.split(",") if args.models else None
    pool, info = load_pool(args.scores, models, families, keep)
    objective = cal.Objective(
        goal=args.objective, target_accuracy=resolve(args.target, pool, "target"),
        budget_gmacs=resolve(args.budget, pool, "budget"), max_worst_gmacs=args.max_worst_gmacs,
        max_past_first=args.max_past_first, margin_sigmas=args.margin_sigmas, reference_size=args.reference_size,
    )
    percentiles = tuple(float(q) for q in np.arange(0, 100 + 1e-9, args.percentile_step))
    search_kw = {"max_models": args.max_models, "kind": kind, "aggregation": aggregation,
                 "percentiles": percentiles, "backend": args.backend}
    only = [s.split(",") for s in args.only] if args.only else None
    cv_rows = []
    if args.folds > 1 and not only:
        chosen, cv_rows = cal.cross_validate(pool, objective, args.folds, **search_kw)
        if chosen is not None:
            only = [list(chosen)]
    result = cal.search(pool, objective, only=only, strategy=args.strategy, beam_width=args.beam_width, **search_kw)
    if result.best is None:
        raise SystemExit(f"no cascade meets the objective {objective} on {pool.size} records")
    full = cal.search(pool, objective, frontier=True, prune=False, **search_kw)
    best = cal.replay(pool, result.best.models, result.best.thresholds, kind, aggregation)
    rows = frontier_rows(pool, full.frontier, args.max_models, kind, aggregation)
    fs, out = fsspec.core.url_to_fs(args.output)
    fs.makedirs(out, exist_ok=True)
    with fs.open(f"{out}/frontier.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pylist(rows, schema=FRONTIER_SCHEMA), fh)
    with fs.open(f"{out}/frontier.md", "w") as fh:
        fh.write(markdown_table(rows))
    cfg = cascade_config(base, best, kind, aggregation)
    config_out = args.config_out or f"{args.output.rstrip('/')}/cascade.yaml"
    solitary = {k: pool.solitary_accuracy(k) for k in pool.keys}
    header = [f"Calibrated by pipelines.calibrate on {pool.size} records of {args.scores}"
              + (f" ({', '.join(args.where)})" if args.where else ""),
              (f"objective: {objective.goal.value}, target accuracy {objective.target_accuracy}, budget GMACs "
               f"{objective.budget_gmacs}, margin {objective.margin_sigmas} sigmas, CV folds {args.folds}"),
              f"on that set: accuracy {best.accuracy:.2%}, average GMACs {best.avg_gmacs:.3f}, exit ratios "
              + " / ".join(f"{r:.1%}" for r in best.exit_ratios)]
    write_config(config_out, cfg, header)
    summary = {
        "scores": args.scores, "records": pool.size, "dropped_records": info["dropped"], "where": args.where,
        "pool": {k: {"gmacs": float(g), "accuracy": solitary[k]} for k, g in zip(pool.keys, pool.gmacs)},
        "objective": {k: (v.value if hasattr(v, "value") else v) for k, v in objective.__dict__.items()},
        "confidence": kind.value, "aggregation": aggregation.value, "percentile_step": args.percentile_step,
        "folds": args.folds, "cv": [{k: v for k, v in r.items() if k != "_keys"} for r in cv_rows],
        "choice": best.as_row(), "config": config_out,
        "search": {"sequences": result.sequences, "grid_points": result.grid_points, "strategy": args.strategy},
    }
    common.write_json(args.output, "calibration.json", summary)
    if not args.no_plots:
        from pipelines import report

        report.calibration_report(pool, summary, rows, args.output, kind, aggregation)
    print(f"{pool.size} records, pool: " + ", ".join(f"{k} {solitary[k]:.2%} @ {g:.3f} GMACs"
                                                      for k, g in zip(pool.keys, pool.gmacs)))
    print(f"chosen ({best.kind}): {' -> '.join(best.models)} thresholds "
          f"{[round(t, 4) for t in best.thresholds]}: accuracy {best.accuracy:.2%}, average GMACs "
          f"{best.avg_gmacs:.3f}, worst case {best.worst_gmacs:.3f}, exit ratios "
          + " / ".join(f"{r:.1%}" for r in best.exit_ratios))
    print(f"config: {config_out}; frontier and report: {args.output}")
    return summary


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
