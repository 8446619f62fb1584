"""A run's counts and its console summary, read back from what the run wrote.

``RunCounts`` is the one typed record of a run's counts: from the listing (Beam counters), the Parquet footers
and ``exit_stats``; it checks the count invariant (inputs = skipped + predictions + dead letters, counted three
ways) and goes into the run record as ``counts``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import apache_beam as beam
import pyarrow.dataset as ds

from models import failures
from models.calibration import shadow_agreement
from pipelines.folder import RunFolder
from transforms.progress import NAMESPACE
from transforms.tables import DEAD_LETTER, EXIT_STATS, PREDICTIONS, VIDEO_PREDICTIONS


def metric(result, name: str = "inputs_listed") -> Optional[int]:
    """A counter of the run (namespace ``cascade``), committed where the runner says, else attempted; None when
    the runner cannot query metrics."""
    try:
        wanted = beam.metrics.MetricsFilter().with_namespace(NAMESPACE).with_name(name)
        query = result.metrics().query(wanted)
    except (NotImplementedError, AttributeError):
        return None
    counters = query.get("counters", [])
    return sum(c.committed if c.committed is not None else c.attempted for c in counters) if counters else 0


@dataclass
class RunCounts:
    """Every count of one run. Optional ones are None where they do not apply (no --skip_done, not frames)."""

    inputs_listed: Optional[int]
    predictions: int
    dead_letters: int
    exit_stats_predictions: int
    exit_stats_dead_letters: int
    inputs_skipped: Optional[int] = None  # ids an earlier committed run has (--skip_done)
    videos_listed: Optional[int] = None  # frame granularity: videos listed, sampled, and per-video rows written
    videos_sampled: Optional[int] = None
    video_predictions: Optional[int] = None
    label_errors: Optional[int] = None  # predictions whose label could not be used (unlabelled; label_error set)
    limit: Optional[int] = None  # --limit N: only the first N listed inputs were classified
    inputs_beyond_limit: Optional[int] = None  # inputs read past the first N (each part of a manifest lists N)

    @property
    def written(self) -> int:
        return self.predictions + self.dead_letters

    def problem(self) -> Optional[str]:
        """What breaks the count invariant, if anything."""
        if (self.predictions, self.dead_letters) != (self.exit_stats_predictions, self.exit_stats_dead_letters):
            return (f"tables disagree: predictions {self.predictions} vs {self.exit_stats_predictions} tallied, "
                    f"dead letters {self.dead_letters} vs {self.exit_stats_dead_letters} tallied")
        total = (self.inputs_skipped or 0) + (self.inputs_beyond_limit or 0) + self.written
        if self.inputs_listed is not None and self.inputs_listed != total:
            return f"{self.inputs_listed} inputs listed but {total} = {self.terms()} written"
        if self.videos_sampled is not None and self.videos_sampled != self.video_predictions:
            return f"{self.videos_sampled} videos sampled but {self.video_predictions} video predictions written"
        return None

    def terms(self) -> str:
        return " + ".join(["skipped"] * (self.inputs_skipped is not None)
                          + ["beyond --limit"] * (self.limit is not None) + ["predictions + dead letters"])

    def invariant_line(self) -> str:
        total = (self.inputs_skipped or 0) + (self.inputs_beyond_limit or 0) + self.written
        return f"count invariant holds: inputs{' listed' if self.limit else ''} = {self.terms()} = {total}"

    def as_dict(self) -> dict:
        """The run record's ``counts``: the counts that apply to this run."""
        optional = {"inputs_skipped", "videos_listed", "videos_sampled", "video_predictions", "limit",
                    "inputs_beyond_limit", "label_errors"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in optional or v is not None}


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def stage_lines(stats: Sequence[dict]) -> list[str]:
    """One line per row of exit_stats: reading (stage 0), then each stage with its exit ratio."""
    lines = []
    for s in sorted(stats, key=lambda r: r["stage"]):
        if s["stage"] == 0:
            lines.append(f"  stage 0 (reading): {s['records_in']} listed, {s['records_failed']} failed before "
                         f"stage 1")
            continue
        classified = s["records_in"] - s["records_failed"]
        lines.append(f"  stage {s['stage']} {s['model']}: {s['records_in']} in, {s['records_failed']} failed, "
                     f"{s['records_exited']} exited: exit ratio {_pct(s['exit_ratio'])} of all predictions "
                     f"({_pct(s['exit_ratio_of_reached'])} of the {classified} it classified)")
    return lines


def count_run(result, folder: RunFolder, run_id: str, *, frames: bool, skip_done: bool, limit: int = 0,
              aggregation: str = "logits") -> tuple[RunCounts, list[str]]:
    """The run's counts and its summary lines, from the Beam counters and the run's own tables (footers and
    exit_stats only). At frame granularity a video is as many records as frames sampled from it."""
    listed = metric(result)
    videos_listed = videos_sampled = None
    if frames:
        videos_listed, videos_sampled = listed, metric(result, "videos_sampled")
        if listed is not None:
            listed += metric(result, "frames_sampled") - videos_sampled
    stats = folder.read(EXIT_STATS.name, [run_id]).to_pylist()
    run = stats[0]
    counts = RunCounts(inputs_listed=listed, predictions=folder.count_rows(PREDICTIONS.name, [run_id]),
                       dead_letters=folder.count_rows(DEAD_LETTER.name, [run_id]),
                       exit_stats_predictions=run["predictions"], exit_stats_dead_letters=run["dead_letters"],
                       inputs_skipped=metric(result, "inputs_skipped") if skip_done else None,
                       limit=limit or None,
                       inputs_beyond_limit=metric(result, "inputs_beyond_limit") if limit else None)
    lines = [] if counts.inputs_skipped is None else [
        f"skipped: {counts.inputs_skipped} inputs whose ids earlier runs of {folder.url} have"]
    if limit:
        lines.append(f"limited (--limit {limit}): only the first {limit} inputs in listing order were taken"
                     + (f"; {counts.inputs_beyond_limit} more read past them were left out"
                        if counts.inputs_beyond_limit else ""))
    lines += [f"records: {counts.written} inputs -> {counts.predictions} predictions + {counts.dead_letters} dead "
              "letters", *stage_lines(stats)]
    if run["avg_gmacs"] is not None:
        share = f" ({run['avg_gmacs'] / run['last_model_gmacs']:.0%} of it)" if run["last_model_gmacs"] else ""
        lines.append(f"GMACs (multiply-adds x1e9) per record: average {run['avg_gmacs']:.3f}, worst case "
                     f"{run['worst_case_gmacs']:.3f}; last model alone {run['last_model_gmacs']:.3f}{share}")
    if run["accuracy"] is not None:
        lines.append(f"accuracy on labelled records: {run['accuracy']:.2%}")
    lines += shadow_lines(stats, aggregation)
    counts.label_errors = sum(s.get("label_errors") or 0 for s in stats) or None
    if counts.label_errors:
        lines.append(f"labels: {counts.label_errors} predictions are unlabelled because their label could not be used "
                     "(the label_error column says why)")
    if frames:
        rows = []
        if folder.count_rows(VIDEO_PREDICTIONS.name, [run_id]):
            rows = folder.read(VIDEO_PREDICTIONS.name, [run_id]).select(["label", "pred_class"]).to_pylist()
        counts.videos_listed, counts.videos_sampled, counts.video_predictions = videos_listed, videos_sampled, len(rows)
        lines.append(f"videos: {videos_listed} listed, {videos_sampled} sampled into {listed} frame records (read "
                     f"failures included) -> {len(rows)} rows in {VIDEO_PREDICTIONS.name}")
        labelled = [r for r in rows if r["label"] is not None]
        if labelled:
            correct = sum(r["label"] == r["pred_class"] for r in labelled)
            lines.append(f"video accuracy (mean of frame logits) on labelled videos: {correct / len(labelled):.2%}")
    return counts, lines


def refuse_to_commit(counts: RunCounts, lines: Sequence[str], folder: RunFolder, run_id: str, source: str,
                     breaker) -> None:
    """Stop, before the commit, a run that is a failure whatever its tables hold: one that listed nothing, or
    one a stage of which (nearly) every record failed the same way (the circuit breaker's rule, over the whole
    finished run: ``systemic_failure``)."""
    if not counts.inputs_listed and not counts.written and not counts.inputs_skipped:
        raise SystemExit(f"no inputs: {source} listed nothing (a glob that matches no file, or a manifest without "
                         "rows); the run is not committed")
    stop = None if counts.problem() else systemic_failure(folder, run_id, breaker)
    if stop:
        print("\n".join(lines))
        raise SystemExit(stop)


def systemic_failure(folder: RunFolder, run_id: str, breaker) -> Optional[str]:
    """The circuit breaker's rule (``models.failures.judge``) over each stage of the finished run, from its
    exit_stats and dead_letter tables: the message when one category failed (nearly) every record of a stage."""
    if not folder.count_rows(DEAD_LETTER.name, [run_id]):
        return None
    dead = folder.dataset(DEAD_LETTER.name, [run_id])
    tally = dead.to_table(columns=["stage", "category"]).group_by(["stage", "category"]).aggregate([([], "count_all")])
    for s in folder.read(EXIT_STATS.name, [run_id]).to_pylist():
        counts = {row["category"]: row["count_all"] for row in tally.to_pylist() if row["stage"] == s["stage"]}
        what = "reading the inputs" if s["stage"] == 0 else f"stage {s['stage']} ({s['model']})"
        if failures.judge(what, s["records_in"], counts, "", breaker):
            category = max(counts, key=counts.get)
            last = dead.to_table(columns=["error"], filter=(ds.field("stage") == s["stage"])
                                 & (ds.field("category") == category)).column("error")[-1].as_py()
            return failures.judge(what, s["records_in"], counts, last, breaker)
    return None


def shadow_lines(stats: Sequence[dict], aggregation: str) -> list[str]:
    """The shadow sample's figures, when the run had one: how often the cascade's answers equal what its last
    stage answers (the last model alone with ``aggregation: last``, else the committee), measured in the run."""
    shadow = shadow_agreement(stats, aggregation)
    if shadow is None:
        return []
    n, agreed = shadow.complete, shadow.agreed
    if not n:
        return [f"shadow sample: {shadow.records} records, none went through every stage"]
    alone = " alone" if "(" not in shadow.reference else ""
    return [f"agreement with {shadow.reference}{alone}, measured in this run on its shadow sample ({n} records that "
            f"also went through every stage): {agreed} of {n} answers equal, {shadow.agreement:.1%} (95 % interval "
            f"{shadow.low:.1%}-{shadow.high:.1%}); the shadow's extra cost, {stats[0]['avg_shadow_gmacs'] or 0:.3f} "
            "GMACs per record, is not in the average above"]
