"""Choose a cascade (models and thresholds) from a scored set: the second step of calibration.

    python -m pipelines.calibrate --scores scores/ --output calibration/ \
        --objective max_accuracy --budget match:lite2@260 --margin_sigmas 1 --folds 5 \
        --config_out configs/my_calibrated.yaml

Reads the ``scores`` table of ``pipelines.score`` and splits its records by *group* (a ``--group`` column
of ``--manifest``; by default the source image, i.e. the file name, which every variant of an image keeps)
into a selection set and a held-out set (``--heldout`` share of the groups). ``models.calibration.search``
chooses on the selection set (the sequence by group-wise k-fold cross-validation, then its thresholds);
the choice is measured on the held-out set, and those figures are what the written config promises.
Writes:
- the cascade config (``--config_out``, default ``OUTPUT/cascade.yaml``): ``--config`` (a cascade YAML or
  profile, default lite_cascade) with its stages, confidence and aggregation replaced and a ``calibration:``
  block of held-out figures (accuracy, margin, GMACs, exit ratios...); dotted overrides apply to it;
  ``python -m pipelines.cascade --config THAT.yaml`` runs it unchanged;
- ``frontier.parquet`` and ``frontier.md``: solitary models, ensembles and the Pareto-frontier cascades of
  the selection set, each also measured on the held-out set;
- ``calibration.json`` (objective, choice, selection and held-out figures) and the plots and ``report.md``
  of ``pipelines.report``.

Targets (``--target``, least GMACs that reaches it): ``0.8`` (accuracy), ``match:lite2@260`` (that entry's
accuracy on the selection set), ``match:ensemble(lite0@224,lite1@240,lite2@260)`` (that ensemble's; the
cascade is made of its models unless ``--models`` says otherwise), ``agree:lite2@260:0.97`` or
``agree:ensemble(...):0.97`` (label-free: predictions equal the reference's on that share of the records;
no label is read). Budgets (``--objective max_accuracy``): ``--budget 0.86`` or ``--budget match:lite2@260``
(its GMACs), ``--max_past_first 0.15`` (share of records sent past stage 1). ``--where variant=clean`` keeps
the records whose manifest row (``--manifest``) has that value.
"""

from __future__ import annotations

if __name__ == "__main__":  # before Beam is imported: its import logs a warning that concerns no pipeline here
    from pipelines import quiet_beam_import

    quiet_beam_import()

import argparse
import dataclasses
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs import schema
from models import calibration as cal
from models import committee, registry
from pipelines import common
from pipelines.folder import RUNS, RunFolder, write_json
from pipelines.pool import frontier_rows, load_pool, markdown_table

FRONTIER_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # solitary, ensemble or cascade
        pa.field("models", pa.string(), nullable=False),  # pool entries in stage order, " -> "-joined
        pa.field("thresholds", pa.list_(pa.float64())),  # one per stage but the last
        pa.field("accuracy", pa.float64(), nullable=False),  # on the selection set (agreement for agree: targets)
        pa.field("avg_gmacs", pa.float64(), nullable=False),
        pa.field("worst_gmacs", pa.float64(), nullable=False),
        pa.field("exit_ratios", pa.list_(pa.float64())),  # share of all records exiting at each stage
        pa.field("on_frontier", pa.bool_(), nullable=False),  # not beaten on both accuracy and GMACs (selection)
        pa.field("heldout_accuracy", pa.float64()),  # the same thresholds on the held-out set; null without one
        pa.field("heldout_avg_gmacs", pa.float64()),
    ]
)
ENSEMBLE = re.compile(r"^ensemble\((?P<keys>[^()]+)\)$")


@dataclass(frozen=True)
class Target:
    """A parsed ``--target``: an accuracy, the accuracy of an entry or ensemble to match, or agreement with a
    reference (label-free)."""

    text: str
    value: float | None = None  # a fixed accuracy or agreement share
    match: tuple[str, ...] = ()  # match: the entry, or the ensemble's members
    agree: tuple[str, ...] = ()  # agree: the reference entry, or the ensemble's members

    @property
    def label_free(self) -> bool:
        return bool(self.agree)

    @property
    def ensemble(self) -> bool:
        """match:ensemble(...): the cascade is made of the ensemble's models (the paper's Section 4.2)."""
        return self.text.startswith("match:ensemble(")

    @property
    def members(self) -> tuple[str, ...]:
        return self.match or self.agree


def parse_committee(text: str) -> tuple[str, ...]:
    """``lite2@260`` -> one entry; ``ensemble(a,b,c)`` -> its members."""
    found = ENSEMBLE.match(text.strip())
    keys = tuple(k.strip() for k in (found.group("keys") if found else text).split(",") if k.strip())
    if not keys or (not found and len(keys) != 1):
        raise ValueError(f"{text!r}: give one pool entry or ensemble(ENTRY,ENTRY,...)")
    return keys


def parse_target(text: str | None) -> Target | None:
    if text is None:
        return None
    try:
        if text.startswith("match:"):
            return Target(text, match=parse_committee(text[len("match:"):]))
        if text.startswith("agree:"):
            reference, _, share = text[len("agree:"):].rpartition(":")
            return Target(text, value=float(share), agree=parse_committee(reference))
        return Target(text, value=float(text))
    except ValueError as err:
        raise SystemExit(f"--target {text}: {err}; use A, match:ENTRY, match:ensemble(...), agree:REFERENCE:SHARE "
                         "(REFERENCE an entry or ensemble(...))") from None


def parse(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(prog="python -m pipelines.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", help="output folder of pipelines.score")
    source.add_argument("--from_run", default=None,
                        help="output folder of pipelines.cascade runs with a shadow sample: recalibrate the "
                             "thresholds of their cascade on their shadow records (no scoring job)")
    parser.add_argument("--output", required=True, help="folder for the frontier, summary and plots")
    parser.add_argument("--config_out", default=None, help="cascade YAML to write (default OUTPUT/cascade.yaml)")
    parser.add_argument("--config", default="lite_cascade", help="cascade YAML/profile the output inherits from")
    parser.add_argument("--objective", choices=[g.value for g in cal.Goal], default=None,
                        help="default: min_cost with --target, else max_accuracy")
    parser.add_argument("--target", default=None,
                        help="min_cost: accuracy A, match:ENTRY, match:ensemble(E1,E2,..), agree:REFERENCE:SHARE")
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
    parser.add_argument("--aggregation", default=None,
                        help="logits, probs or last (default: the --config's; for agree: targets, the --config's "
                             "and last are both searched and the cheaper is kept)")
    parser.add_argument("--percentile_step", type=float, default=2.0, help="threshold candidates every P percent")
    parser.add_argument("--margin_sigmas", type=float, default=1.0,
                        help="safety margin of the choice on the selection set, in standard errors")
    parser.add_argument("--reference_size", type=int, default=None, help="size of the set that margin protects")
    parser.add_argument("--folds", type=int, default=5, help="choose the sequence by group-wise k-fold CV (0: off)")
    parser.add_argument("--heldout", type=float, default=0.5,
                        help="share of the groups held out to measure the choice on (0: none, no promise)")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the group-wise split and CV folds")
    parser.add_argument("--group", default="group",
                        help="--manifest column naming each record's group; default: the source image (file name)")
    parser.add_argument("--promise_sigmas", type=float, default=2.0,
                        help="the config's margins, in standard errors of held-out vs a new set's figure")
    parser.add_argument("--reference_groups", type=int, default=None,
                        help="groups of the new set the promise is for (default: as many as held out)")
    parser.add_argument("--strategy", choices=["exhaustive", "beam"], default="exhaustive",
                        help="exhaustive: every sequence of up to --max_models entries; beam: extend the best "
                             "--beam_width prefixes only (large pools)")
    parser.add_argument("--beam_width", type=int, default=8, help="prefixes kept per depth with --strategy beam")
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy",
                        help="numpy (exact reference) or torch (multi-threaded or CUDA, float64 confidences)")
    parser.add_argument("--manifest", default=None, help="manifest with extra columns (--where, --group)")
    parser.add_argument("--where", action="append", default=[], help="COLUMN=VALUE filter on --manifest rows")
    parser.add_argument("--data", default=None, help="a line saying what the scored records are (for the config)")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    args, overrides, rest = common.split_argv(parser, argv)
    if rest:
        parser.error(f"unknown arguments: {' '.join(rest)}")
    if args.where and not args.manifest:
        parser.error("--where needs --manifest")
    if not 0 <= args.heldout < 1:
        parser.error("--heldout: a share in [0, 1)")
    return args, overrides


def manifest_rows(manifest: str) -> dict[str, dict]:
    """Manifest rows by record id, as ReadInputs lists them (rows it cannot list are left out)."""
    from transforms.manifests import manifest_entries
    from transforms.records import Record

    return {entry.id: row for row, entry in manifest_entries(manifest) if isinstance(entry, Record)}


def manifest_ids(manifest: str, where: Sequence[str]) -> set[str]:
    """Ids of the manifest rows matching every COLUMN=VALUE filter."""
    tests = [w.split("=", 1) for w in where]
    return {rid for rid, row in manifest_rows(manifest).items() if all(str(row.get(c)) == v for c, v in tests)}


def source_of(uri: str) -> str:
    """The default group of a record: its file name without extension, which every variant of one source image
    keeps (``clean/x.jpg``, ``noise/x.jpg``: the layout of make_variants.py)."""
    return os.path.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[0]


def record_groups(ids: Sequence[str], uris: Sequence[str], rows: dict[str, dict] | None, column: str) -> np.ndarray:
    """Group number of each record: the manifest's ``column`` where it has one, else the source image."""
    names = [str(rows[i][column]) if rows and i in rows and rows[i].get(column) not in (None, "") else source_of(u)
             for i, u in zip(ids, uris)]
    return np.unique(names, return_inverse=True)[1]


def committee_accuracy(pool: cal.Pool, keys: Sequence[str], aggregation) -> float:
    """Accuracy of an entry, or of the ensemble of several, on the labelled records of ``pool``."""
    labelled = pool.labels >= 0
    return float((cal.predictions(pool, keys, aggregation)[labelled] == pool.labels[labelled]).mean())


def resolve_budget(value: str | None, pool: cal.Pool) -> float | None:
    """A number, or ``match:ENTRY``: that entry's GMACs."""
    if value is None:
        return None
    if value.startswith("match:"):
        return float(pool.gmacs[pool.index(value[len("match:"):])])
    return float(value)


def cascade_config(base: schema.CascadeConfig, choice: cal.Choice, kind, aggregation,
                   calibration: schema.CalibrationInfo | None = None) -> schema.CascadeConfig:
    """``base`` with the chosen stages (batch sizes and settings of base's first stage), confidence,
    aggregation and calibration block; validated like any config."""
    template = base.stages[0]
    stages = []
    for i, key in enumerate(choice.models):
        name, resolution = registry.split_key(key)
        threshold = choice.thresholds[i] if i < len(choice.thresholds) else 1.0
        stages.append(schema.StageConfig(model=name, resolution=resolution,
                                         batch_size=template.batch_size, threshold=float(threshold),
                                         precision=template.precision, channels_last=template.channels_last,
                                         compile=template.compile))
    cfg = schema.CascadeConfig(**{**base.__dict__, "stages": stages, "confidence": committee.Confidence(kind),
                                  "aggregation": committee.Aggregation(aggregation), "overwrite": False,
                                  "calibration": calibration})
    schema.validate(cfg)
    if calibration is not None:  # the figures describe this cascade and no other (--plan, the run report)
        calibration.cascade = schema.signature(cfg)
    return cfg


def calibration_info(target: str, data: str, held: cal.Measured, sigmas: float,
                     reference_groups: int | None, agree: Sequence[str]) -> schema.CalibrationInfo:
    """The config's ``calibration:`` block from the held-out measurement (figures rounded to 4 digits; exit
    ratios exact, so that they sum to 1)."""
    def r(x):
        return None if x is None else round(float(x), 4)

    return schema.CalibrationInfo(
        target=target, data=data, heldout_records=held.records, heldout_groups=held.groups,
        heldout_accuracy=r(held.accuracy), margin=r(held.margin("accuracy", sigmas, reference_groups)),
        heldout_gmacs=r(held.avg_gmacs), gmacs_margin=r(held.margin("avg_gmacs", sigmas, reference_groups)),
        expected_exit_ratios=list(held.exit_ratios), expected_escalated=list(held.escalated),
        agreement_reference=committee_name(agree) if agree else None, heldout_agreement=r(held.agreement),
        agreement_margin=r(held.margin("agreement", sigmas, reference_groups)) if agree else None,
    )


def describe(objective: cal.Objective) -> str:
    """An objective in words."""
    if objective.goal is cal.Goal.MIN_COST:
        parts = [f"the least average GMACs at accuracy >= {objective.target_accuracy:.2%}"]
    else:
        parts = ["the best accuracy"] + ([f"within {objective.budget_gmacs:.3f} average GMACs"]
                                         if objective.budget_gmacs is not None else [])
    if objective.max_worst_gmacs is not None:
        parts.append(f"worst case <= {objective.max_worst_gmacs:.3f} GMACs")
    if objective.max_past_first is not None:
        parts.append(f"at most {objective.max_past_first:.0%} of the records past stage 1")
    if objective.margin_sigmas:
        parts.append(f"with a margin of {objective.margin_sigmas:g} standard errors")
    return ", ".join(parts)


def no_choice(objective: cal.Objective, records: int, frontier: list[dict], output: str) -> str:
    """Why nothing was chosen, what is reachable, and what to change."""
    best = max(frontier, key=lambda r: (r["accuracy"], -r["avg_gmacs"]))
    cheapest = min(frontier, key=lambda r: (r["avg_gmacs"], -r["accuracy"]))
    return (f"no cascade meets the objective on the {records} selection records: {describe(objective)}.\n"
            f"  reachable: the best accuracy is {best['accuracy']:.2%} ({best['models']}, {best['avg_gmacs']:.3f} "
            f"GMACs); the cheapest entry costs {cheapest['avg_gmacs']:.3f} GMACs ({cheapest['models']}, "
            f"{cheapest['accuracy']:.2%}).\n"
            f"  the whole frontier: {output.rstrip('/')}/frontier.md. Lower --target, raise --budget, or lower "
            "--margin_sigmas; no config was written.")


def committee_name(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else f"ensemble({','.join(keys)})"


def write_config(path: str, cfg: schema.CascadeConfig, header: list[str]) -> None:
    with fsspec.open(path, "w") as fh:
        lines = [part for line in header for part in textwrap.wrap(line, 110)]
        fh.write("".join(f"# {line}\n" for line in lines) + schema.to_yaml(cfg))


def _measured_row(m: cal.Measured | None) -> dict | None:
    return None if m is None else {k: (list(v) if isinstance(v, tuple) else v) for k, v in m.__dict__.items()}


def _figures(m: cal.Measured) -> str:
    parts = [] if m.accuracy is None else [f"accuracy {m.accuracy:.2%} (se {m.accuracy_se:.2%})"]
    if m.agreement is not None:
        parts.append(f"agreement {m.agreement:.2%} (se {m.agreement_se:.2%})")
    return ", ".join(parts + [f"average GMACs {m.avg_gmacs:.3f} (se {m.gmacs_se:.3f})",
                              "exit ratios " + " / ".join(f"{x:.1%}" for x in m.exit_ratios)])


SHADOW_COLUMNS = ("id", "uri", "label", "shadow", "stages")
RUN_BATCH_ROWS = 65_536  # prediction rows read at a time: a folder of 10^8 rows is read for its shadow rows only


def run_answers(folder: str, group: str) -> tuple[cal.Answers, schema.CascadeConfig, str, dict]:
    """The shadow records of the committed runs in ``folder`` whose cascade is that of the latest committed run:
    (their answers, that run's config, its YAML, counts). Refuses, naming the folder, one without committed
    runs, whose runs wrote no ``shadow`` column, or without a shadow record that went through every stage."""
    run_folder = RunFolder(folder)
    runs = run_folder.committed_runs()
    if not runs:
        raise SystemExit(f"--from_run {folder}: no committed run of pipelines.cascade there "
                         f"({RUNS}/<run_id>.json); give the output folder of a finished run")
    manifest = run_folder.record(runs[-1])
    text = manifest["config"]
    try:
        cfg = schema.from_yaml(text)
    except schema.ConfigError as err:
        raise SystemExit(f"--from_run {folder}: the config of run {runs[-1]} no longer loads: {err}") from None
    keys = tuple(spec.key for spec in schema.stage_specs(cfg))
    gmacs = np.array([float(stage["gmacs"]) for stage in manifest["plan"]["stages"]]) if "plan" in manifest and \
        "stages" in manifest["plan"] else np.array([registry.gmacs(spec) for spec in schema.stage_specs(cfg)])
    try:
        schema_names = run_folder.dataset("predictions").schema.names
    except FileNotFoundError:
        raise SystemExit(f"--from_run {folder}: its committed runs wrote no predictions") from None
    missing = [c for c in SHADOW_COLUMNS if c not in schema_names]
    if missing:
        raise SystemExit(f"--from_run {folder}: its predictions have no column(s) {', '.join(missing)}: written "
                         "before shadow samples existed; rerun with shadow: 0.01 (or more)")
    columns = list(SHADOW_COLUMNS) + ([group] if group in schema_names else [])
    ids, uris, labels, groups, pred, conf = [], [], [], [], [], []
    counts = {"rows": 0, "shadow": 0, "other_cascade": 0, "incomplete": 0}
    for batch in run_folder.batches("predictions", columns, RUN_BATCH_ROWS):
        counts["rows"] += batch.num_rows
        for row in batch.filter(batch.column("shadow")).to_pylist():
            counts["shadow"] += 1
            answers = row["stages"]
            if tuple(a["model"] for a in answers) != keys[: len(answers)]:
                counts["other_cascade"] += 1
                continue
            if len(answers) != len(keys):
                counts["incomplete"] += 1
                continue
            ids.append(row["id"])
            uris.append(row["uri"])
            labels.append(-1 if row["label"] is None else row["label"])
            groups.append(row.get(group))
            pred.append([a["pred_class"] for a in answers])
            conf.append([a["confidence"] for a in answers])
    if not ids:
        raise SystemExit(f"--from_run {folder}: no shadow record of the cascade {' -> '.join(keys)} went through "
                         f"every stage ({counts['rows']} prediction rows, {counts['shadow']} shadow); run it with "
                         "shadow: 0.01 (or more)")
    rows = {i: {group: g} for i, g in zip(ids, groups) if g not in (None, "")}
    answers = cal.Answers(keys, gmacs, np.asarray(pred, dtype=np.int64).T, np.asarray(conf, dtype=np.float64).T,
                          np.asarray(labels, dtype=np.int64), record_groups(ids, uris, rows, group))
    return answers, cfg, text, counts


def from_run(args, base: schema.CascadeConfig) -> dict:
    """``--from_run``: the thresholds of a run's own cascade (and its prefixes) chosen on its shadow records,
    held out by group as with ``--scores``; label-free against the last stage's answer, or against labels."""
    answers, run_cfg, _, counts = run_answers(args.from_run, args.group)
    kind, aggregation = committee.Confidence(run_cfg.confidence), committee.Aggregation(run_cfg.aggregation)
    for flag, given, used in (("--confidence", args.confidence, kind),
                              ("--aggregation", args.aggregation, aggregation)):
        if given is not None and given.lower() != used.value:
            raise SystemExit(f"{flag} {given}: the run's answers were made with {used.value}; drop {flag}")
    for flag in ("models", "only", "where", "manifest"):
        if getattr(args, flag):
            raise SystemExit(f"--{flag}: --from_run searches the run's own cascade on its shadow records; drop it")
    reference_name = cal.reference_of(answers.keys, aggregation)
    target = parse_target(args.target)
    last = answers.pred[-1]
    if target and target.members and committee_name(target.members) != reference_name:
        raise SystemExit(f"--target {args.target}: the shadow records hold the answers of {reference_name} (the run's "
                         f"last stage, aggregation {aggregation.value}); give agree:{reference_name}:SHARE, "
                         f"match:{reference_name} or an accuracy")
    label_free = bool(target and target.label_free)
    truth = last if label_free else answers.labels
    if not label_free:
        labelled = np.flatnonzero(answers.labels >= 0)
        if not len(labelled):
            raise SystemExit(f"--from_run {args.from_run}: no shadow record has a label; calibrate label-free with "
                             f"--target agree:{reference_name}:SHARE")
        answers, truth = answers.subset(labelled), truth[labelled]
    n = answers.size
    if n < cal.MIN_SHADOW_RECORDS:
        print(f"WARNING: {n} shadow records: below {cal.MIN_SHADOW_RECORDS}, thresholds chosen on them are too "
              "noisy to trust (docs/CALIBRATION.md, 'How many shadow records'); run with a larger shadow share")
    if args.heldout > 0:
        sel_rows, held_rows = cal.split_by_group(answers.group_of_each(), args.heldout, args.split_seed)
    else:
        sel_rows, held_rows = np.arange(n), np.zeros(0, dtype=int)
    sel = answers.subset(sel_rows)
    goal = cal.Goal(args.objective or (cal.Goal.MIN_COST if target else cal.Goal.MAX_ACCURACY))
    if target is None or target.value is not None:
        target_value = None if target is None else target.value
    else:  # match: the last stage's accuracy on the selection records
        target_value = float((sel.pred[-1] == truth[sel_rows]).mean())
    budget = None
    if args.budget:
        entry = args.budget[len("match:"):] if args.budget.startswith("match:") else None
        if entry is not None and entry not in answers.keys:
            raise SystemExit(f"--budget {args.budget}: not a stage of the run ({', '.join(answers.keys)})")
        budget = float(answers.gmacs[answers.keys.index(entry)]) if entry else float(args.budget)
    objective = cal.Objective(
        goal=goal, target_accuracy=target_value, budget_gmacs=budget,
        max_worst_gmacs=args.max_worst_gmacs, max_past_first=args.max_past_first,
        margin_sigmas=args.margin_sigmas, reference_size=args.reference_size)
    percentiles = tuple(float(q) for q in np.arange(0, 100 + 1e-9, args.percentile_step))
    result = cal.search_answers(sel, truth[sel_rows], objective, percentiles)
    if result.best is None:
        raise SystemExit(f"no thresholds of {' -> '.join(answers.keys)} (or of a prefix) meet the objective on the "
                         f"{sel.size} selection shadow records: {describe(objective)}. Lower --target or "
                         "--margin_sigmas; no config was written.")
    best = result.best
    thresholds = tuple(cal.below_float32(t) for t in best.thresholds)  # the same exits for float64 confidences

    def measured(rows_: np.ndarray) -> cal.Measured:
        return cal.measure_answers(answers.subset(rows_), thresholds, last[rows_] if label_free else None)

    on_selection = measured(sel_rows)
    on_heldout = measured(held_rows) if len(held_rows) else None
    target_text = args.target or (f"{goal.value} within {args.budget} GMACs" if args.budget else goal.value)
    data = args.data or (f"{n} shadow records of the runs in {args.from_run} ({counts['shadow']} shadow rows of "
                         f"{counts['rows']} predictions)")
    block = (calibration_info(target_text, data, on_heldout, args.promise_sigmas, args.reference_groups,
                              (reference_name,) if label_free else ()) if on_heldout else None)
    cfg = cascade_config(run_cfg, cal.Choice(best.models, thresholds, best.accuracy, best.avg_gmacs, best.worst_gmacs,
                                             best.exit_ratios), kind, aggregation, block)
    for i, stage in enumerate(cfg.stages):  # each stage keeps the run's settings (batch size, precision...)
        own = run_cfg.stages[i]
        cfg.stages[i] = dataclasses.replace(own, threshold=stage.threshold, escalate=None)
    config_out = args.config_out or f"{args.output.rstrip('/')}/cascade.yaml"
    write_config(config_out, cfg, [
        f"Recalibrated by pipelines.calibrate --from_run {args.from_run} for {target_text}: chosen on {sel.size} "
        f"shadow records, measured on the other {len(held_rows)}; see calibration:",
        f"objective {goal.value}, target {objective.target_accuracy}, selection margin {objective.margin_sigmas} "
        "sigmas"])
    summary = {
        "from_run": args.from_run, "shadow": counts, "records": n, "selection_records": int(len(sel_rows)),
        "heldout_records": int(len(held_rows)), "cascade": list(answers.keys),
        "metric": f"agreement with {reference_name}" if label_free else "accuracy", "target": target_text,
        "objective": {k: (v.value if hasattr(v, "value") else v) for k, v in objective.__dict__.items()},
        "confidence": kind.value, "aggregation": aggregation.value, "choice": best.as_row(),
        "per_prefix": {" -> ".join(k): c.as_row() for k, c in result.per_sequence.items()},
        "selection": _measured_row(on_selection), "heldout": _measured_row(on_heldout),
        "calibration": None if block is None else dataclasses.asdict(block), "config": config_out,
        "trusted": n >= cal.MIN_SHADOW_RECORDS,
    }
    write_json(args.output, "calibration.json", summary)
    print(f"{n} shadow records of {' -> '.join(answers.keys)} ({counts['shadow']} shadow rows of {counts['rows']} "
          f"predictions): {sel.size} selection / {len(held_rows)} held out")
    print(f"chosen: {' -> '.join(best.models)} thresholds {[round(t, 4) for t in thresholds]}")
    print(f"  on the selection set: {_figures(on_selection)}")
    if on_heldout:
        print(f"  on the held-out set:  {_figures(on_heldout)}")
    print(f"config: {config_out}; summary: {args.output}")
    return summary


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the calibration; returns the summary (also written as ``calibration.json``)."""
    args, overrides = parse(argv)
    try:
        base = schema.load(args.config, overrides)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    if args.from_run:
        return from_run(args, base)
    kind = committee.Confidence(args.confidence or base.confidence)
    aggregation = committee.Aggregation(args.aggregation or base.aggregation)
    target = parse_target(args.target)
    if target and target.ensemble and aggregation is committee.Aggregation.LAST:
        raise SystemExit(f"--aggregation last: {args.target} asks for a cascade that reproduces the ensemble's "
                         "committee, which aggregation last has none of; use logits or probs")
    # label-free against a reference: the committees of --config's aggregation and the reference's own answer
    # at each stage (last) are both searched, and the cheaper one that meets the target is kept
    aggregations = [aggregation]
    if target and target.label_free and args.aggregation is None and aggregation is not committee.Aggregation.LAST:
        aggregations.append(committee.Aggregation.LAST)
    committee_aggregation = (committee.Aggregation.LOGITS if aggregation is committee.Aggregation.LAST
                             else aggregation)  # how an ensemble reference or target is combined
    goal = cal.Goal(args.objective or (cal.Goal.MIN_COST if target else cal.Goal.MAX_ACCURACY))
    rows = manifest_rows(args.manifest) if args.manifest else None
    keep = manifest_ids(args.manifest, args.where) if args.where else None
    families = dict(f.split("=", 1) for f in args.family)
    candidates = args.models.split(",") if args.models else (list(target.match) if target and target.ensemble else None)
    loaded = None if candidates is None else list(dict.fromkeys(candidates + list(target.members if target else ())))
    pool, info = load_pool(args.scores, loaded, families, keep)
    pool = replace(pool, groups=record_groups(info["ids"], info["uris"], rows, args.group))
    truth = pool.labels
    if not (target and target.label_free):  # labels decide: keep the labelled records
        labelled = np.flatnonzero(truth >= 0)
        if not len(labelled):
            raise SystemExit("no scored record has a label; calibrate label-free with --target agree:REFERENCE:SHARE")
        pool, truth = pool.subset(labelled), truth[labelled]
    if args.heldout > 0:
        sel_rows, held_rows = cal.split_by_group(pool.groups, args.heldout, args.split_seed)
    else:
        sel_rows, held_rows = np.arange(pool.size), np.zeros(0, dtype=int)
    reference = cal.predictions(pool, target.agree, committee_aggregation) if target and target.label_free else None
    scored = replace(pool, labels=truth if reference is None else reference)  # what "correct" means in the search
    search_pool = scored.select(candidates) if candidates else scored
    sel = search_pool.subset(sel_rows)
    held = search_pool.subset(held_rows) if len(held_rows) else None
    if target is None or target.value is not None:
        target_value = None if target is None else target.value
    else:
        target_value = committee_accuracy(scored.subset(sel_rows), target.match, committee_aggregation)
    objective = cal.Objective(
        goal=goal, target_accuracy=target_value, budget_gmacs=resolve_budget(args.budget, search_pool),
        max_worst_gmacs=args.max_worst_gmacs, max_past_first=args.max_past_first,
        margin_sigmas=args.margin_sigmas, reference_size=args.reference_size,
    )
    percentiles = tuple(float(q) for q in np.arange(0, 100 + 1e-9, args.percentile_step))
    searched = {}
    for agg in aggregations:
        search_kw = {"max_models": args.max_models, "kind": kind, "aggregation": agg,
                     "percentiles": percentiles, "backend": args.backend}
        only = [s.split(",") for s in args.only] if args.only else None
        cv_rows = []
        if args.folds > 1 and not only:
            chosen, cv_rows = cal.cross_validate(sel, objective, args.folds, seed=args.split_seed, **search_kw)
            if chosen is not None:
                only = [list(chosen)]
        result = cal.search(sel, objective, only=only, strategy=args.strategy, beam_width=args.beam_width,
                            **search_kw)
        best = None if result.best is None else cal.trimmed(sel, result.best, kind, agg)
        searched[agg] = (best, result, cv_rows, search_kw)
    found = [agg for agg in aggregations if searched[agg][0] is not None]
    if len(aggregations) > 1:
        print("aggregations searched: " + "; ".join(
            f"{agg.value}: " + ("nothing meets the target" if searched[agg][0] is None else
                                f"{' -> '.join(searched[agg][0].models)} at {searched[agg][0].avg_gmacs:.3f} GMACs")
            for agg in aggregations))
    aggregation = min(found, key=lambda agg: searched[agg][0].avg_gmacs - 1e-9 * (agg is aggregations[0])
                      ) if found else aggregations[0]  # on a tie, the config's own
    best, result, cv_rows, search_kw = searched[aggregation]
    full = cal.search(sel, objective, frontier=True, prune=False, **search_kw)
    frontier = frontier_rows(sel, full.frontier, args.max_models, kind, aggregation, held)
    fs, out = fsspec.core.url_to_fs(args.output)
    fs.makedirs(out, exist_ok=True)
    with fs.open(f"{out}/frontier.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pylist(frontier, schema=FRONTIER_SCHEMA), fh)
    with fs.open(f"{out}/frontier.md", "w") as fh:
        fh.write(markdown_table(frontier))
    if best is None:
        raise SystemExit(no_choice(objective, sel.size, frontier, args.output))

    def measured(rows_: np.ndarray) -> cal.Measured:
        part = replace(pool, labels=truth).subset(rows_)
        return cal.measure(part, best.models, best.thresholds, kind, aggregation,
                           None if reference is None else reference[rows_])

    on_selection = measured(sel_rows)
    on_heldout = measured(held_rows) if held is not None else None
    target_text = args.target or (f"{goal.value} within {args.budget} GMACs" if args.budget else goal.value)
    data = args.data or f"{pool.size} scored records" + (f" ({', '.join(args.where)})" if args.where else "")
    block = (calibration_info(target_text, data, on_heldout, args.promise_sigmas, args.reference_groups,
                              target.agree if target else ()) if on_heldout else None)
    cfg = cascade_config(base, best, kind, aggregation, block)
    config_out = args.config_out or f"{args.output.rstrip('/')}/cascade.yaml"
    header = [f"Calibrated by pipelines.calibrate for {target_text}: chosen on {sel.size} records "
              f"({len(np.unique(sel.groups))} source images) of {data}, measured on the other {len(held_rows)} "
              f"records ({0 if held is None else len(np.unique(held.groups))} source images); see calibration:",
              f"objective {goal.value}, target {objective.target_accuracy}, budget GMACs {objective.budget_gmacs}, "
              f"selection margin {objective.margin_sigmas} sigmas, group-wise CV folds {args.folds}"]
    write_config(config_out, cfg, header)
    pool_table = {}
    for k in search_pool.keys:
        solo = {"gmacs": float(search_pool.gmacs[search_pool.index(k)])}
        for name, rows_ in (("selection", sel_rows), ("heldout", held_rows)):
            if len(rows_):
                m = cal.measure(replace(pool, labels=truth).subset(rows_), [k], [], kind, aggregation,
                                None if reference is None else reference[rows_])
                solo[name] = {"accuracy": m.accuracy, "agreement": m.agreement}
        pool_table[k] = solo
    summary = {
        "scores": args.scores, "records": pool.size, "dropped_records": info["dropped"], "where": args.where,
        "selection_records": int(len(sel_rows)), "heldout_records": int(len(held_rows)),
        "selection_groups": int(len(np.unique(sel.groups))),
        "heldout_groups": 0 if held is None else int(len(np.unique(held.groups))),
        "metric": "accuracy" if reference is None else f"agreement with {committee_name(target.agree)}",
        "target": target_text, "pool": pool_table,
        "objective": {k: (v.value if hasattr(v, "value") else v) for k, v in objective.__dict__.items()},
        "confidence": kind.value, "aggregation": aggregation.value, "percentile_step": args.percentile_step,
        "aggregations_searched": {agg.value: None if searched[agg][0] is None else searched[agg][0].as_row()
                                  for agg in aggregations},
        "folds": args.folds, "cv": [{k: v for k, v in r.items() if k != "_keys"} for r in cv_rows],
        "choice": best.as_row(), "selection": _measured_row(on_selection), "heldout": _measured_row(on_heldout),
        "calibration": None if block is None else dataclasses.asdict(block), "config": config_out,
        "search": {"sequences": result.sequences, "grid_points": result.grid_points, "strategy": args.strategy},
    }
    write_json(args.output, "calibration.json", summary)
    if not args.no_plots:
        from pipelines import report

        report.calibration_report(sel, summary, frontier, args.output, kind, aggregation)
    print(f"{sel.size} selection / {len(held_rows)} held-out records; pool: " + ", ".join(
        f"{k} @ {v['gmacs']:.3f} GMACs" for k, v in pool_table.items()))
    print(f"chosen ({best.kind}): {' -> '.join(best.models)} thresholds {[round(t, 4) for t in best.thresholds]}")
    print(f"  on the selection set: {_figures(on_selection)}")
    if on_heldout:
        print(f"  on the held-out set:  {_figures(on_heldout)}")
        print(f"  promise ({args.promise_sigmas} sigmas): accuracy >= "
              + ("-" if block.heldout_accuracy is None else f"{block.heldout_accuracy - block.margin:.2%}")
              + f", average GMACs <= {block.heldout_gmacs + block.gmacs_margin:.3f}"
              + ("" if block.heldout_agreement is None else
                 f", agreement >= {block.heldout_agreement - block.agreement_margin:.2%}"))
    print(f"config: {config_out}; frontier and report: {args.output}")
    return summary


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
