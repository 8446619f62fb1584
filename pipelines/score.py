"""Score a labelled held-out set with every model of a pool: the first step of calibration.

  python -m pipelines.score --models lite0@224,lite0@288,lite1@240,lite2@260
      --input held_out/labels.csv --output scores/ --runner=DirectRunner      (one command line)

Each pool entry is a registered model at one resolution (lite0@288 is Lite0 fed at 288 pixels). The
records go through the main job's own reader, preprocessing and RunInference model handler (full
batches), so the logits are those the cascade would see. Output, under --output: scores/*.parquet (one
row per record and pool entry: id, uri, label, model, gmacs, logits), dead_letter/*.parquet (stage =
1-based pool entry, 0 = reading), committed like a cascade run's (runs/<run_id>.json, then
manifest.json). Count invariant, per pool entry: inputs listed = scored rows + dead letters of reading +
of that entry.

Videos: with a config whose video.granularity is video (--config video_clips --models ...), a record is a
video and its logits are the mean over its views (clips x crops), exactly what the cascade's stages decide
on, so pipelines.calibrate chooses video thresholds the same way as image ones.

Flags: --models (comma-separated keys; or --config, a cascade YAML whose stages are the pool), --input,
--output, --overwrite, --batch_size; key=value words are OmegaConf overrides; the rest goes to Beam.
"""

from __future__ import annotations

if __name__ == "__main__":  # before Beam is imported: its import logs a warning that concerns no pipeline here
    from pipelines import quiet_beam_import

    quiet_beam_import()

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa

from configs import schema
from configs.plan import StagePlan, TaskKind, task_kind
from models import registry
from models.classifier import Failure
from pipelines import common, job, summary
from pipelines.folder import RunFolder
from transforms.io import DEAD, ReadInputs
from transforms.outputs import WriteTable
from transforms.records import DeadLetter
from transforms.tables import DEAD_LETTER, Table

SCORES = Table("scores", pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("model", pa.string(), nullable=False),  # pool entry key, e.g. lite0@288
        pa.field("gmacs", pa.float64(), nullable=False),  # multiply-adds x1e9 of one forward pass
        pa.field("logits", pa.list_(pa.float32()), nullable=False),
    ]
))
TABLES = (SCORES.name, DEAD_LETTER.name)


def pool_stages(keys: str, batch_size: int) -> list[dict]:
    """``lite0@224,lite2`` -> stage dicts of the cascade schema (a pool is validated like a cascade)."""
    stages = []
    for key in (k for k in keys.split(",") if k.strip()):
        try:
            name, resolution = registry.split_key(key)
        except ValueError as err:
            raise SystemExit(f"invalid pool: {err}") from None
        stages.append({"model": name, "resolution": resolution, "batch_size": batch_size})
    return stages


def parse(argv: Sequence[str] | None) -> tuple[schema.CascadeConfig, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated pool entries, e.g. lite0@224,lite1@240")
    parser.add_argument("--config", default=None, help="cascade YAML whose stages are the pool (thresholds unused)")
    parser.add_argument("--input", required=True, help="labelled manifest .csv/.parquet (uri/path, label)")
    parser.add_argument("--output", required=True, help="output folder (local path or URL)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run's outputs")
    parser.add_argument("--batch_size", type=int, default=32, help="images per inference batch (with --models)")
    args, overrides, beam_args = common.split_argv(parser, argv)
    if not args.models and not args.config:
        parser.error("give the pool: --models lite0@224,... or --config POOL.yaml")
    values = {"input": args.input, "output": args.output, "overwrite": args.overwrite}
    if args.models:
        values["stages"] = pool_stages(args.models, args.batch_size)
    try:
        cfg = schema.load(args.config, overrides, **values)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    if task_kind(cfg) is TaskKind.VIDEO_FRAMES:
        raise SystemExit("invalid config: video.granularity: scoring takes images, or videos at granularity video "
                         "(a video's logits are the mean over its views); to calibrate on frames, score them as images")
    keys = [spec.key for spec in schema.stage_specs(cfg)]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"invalid pool: an entry appears twice ({', '.join(keys)}); the same model at the same "
                         "resolution gives identical logits")
    return cfg, beam_args


def score_row(element, plan: StagePlan):
    """(record, PredictionResult) -> a scores row, or a dead letter if the model failed on the record."""
    record, result = element
    if isinstance(result.inference, Failure):
        failure = result.inference
        yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(record.id, record.uri, plan.number, failure.reason,
                                                        failure.category))
        return
    yield SCORES.row(id=record.id, uri=record.uri, label=record.label, model=plan.key, gmacs=plan.gmacs,
                     logits=result.inference.tolist())


class ScoreEntry(beam.PTransform):
    """Records -> {scores rows of one pool entry, dead letters}: the cascade stage's preprocessing and
    inference without routing, through the run's task (an image's logits; a video's, the mean over its
    views, as the cascade decides on it)."""

    def __init__(self, plan: StagePlan, task):
        super().__init__()
        self.plan = plan
        self.task = task

    def expand(self, records):
        inferred, failed = self.task.classify(records, self.plan)
        rows = inferred | "Rows" >> beam.FlatMap(score_row, self.plan).with_outputs(DEAD, main=SCORES.name)
        dead = (*failed, rows[DEAD]) | "Failures" >> beam.Flatten()
        return {SCORES.name: rows[SCORES.name], DEAD: dead}


def build(run: job.Job) -> list[tuple[str, float]]:
    """Add the scoring job to the job's pipeline; returns (key, gmacs per record) of each pool entry."""
    cfg, plan, task, run_id = run.cfg, run.plan, run.task, run.run_id
    inputs = run.pipeline | "ReadInputs" >> ReadInputs(cfg.input, cfg.decode.max_bytes, task.reader(plan),
                                                       timeout_s=cfg.decode.read_timeout_s, read=cfg.read,
                                                       breaker=cfg.circuit_breaker)
    scored, dead = [], [inputs[DEAD]]
    for stage in plan.stages:
        out = inputs["records"] | f"Score_{stage.key}" >> ScoreEntry(stage, task)
        scored.append(out[SCORES.name])
        dead.append(out[DEAD])
    metadata = {"cascade.run_id": run_id, "cascade.config": schema.to_yaml(cfg)}
    scored | "MergeScores" >> beam.Flatten() | "WriteScores" >> WriteTable(
        run.folder.table_prefix(SCORES.name, run_id), SCORES, metadata, cfg.output_shards)
    (
        dead
        | "MergeDeadLetters" >> beam.Flatten()
        | "DeadLetterRows" >> beam.Map(lambda d: d.as_row(run_id))
        | "WriteDeadLetters" >> WriteTable(run.folder.table_prefix(DEAD_LETTER.name, run_id), DEAD_LETTER, metadata,
                                           cfg.output_shards)
    )
    return [(stage.key, stage.gmacs) for stage in plan.stages]


def check_counts(folder: RunFolder, pool: list[tuple[str, float]], listed: int | None,
                 run_id: str) -> tuple[dict, str | None]:
    """Per pool entry: scored rows + dead letters (its own and reading's) must equal the inputs listed."""
    scores = folder.read(SCORES.name, [run_id]).select(["model"]).column("model").to_pylist()
    try:
        stages = folder.read(DEAD_LETTER.name, [run_id]).column("stage").to_pylist()
    except FileNotFoundError:
        stages = []
    counts = {"inputs_listed": listed, "read_dead_letters": stages.count(0), "entries": {}}
    problems = []
    for number, (key, _) in enumerate(pool, start=1):
        entry = {"scored": scores.count(key), "dead_letters": stages.count(number)}
        counts["entries"][key] = entry
        total = entry["scored"] + entry["dead_letters"] + counts["read_dead_letters"]
        if listed is not None and total != listed:
            problems.append(f"{key}: {listed} inputs listed but {total} = scored + dead letters")
    return counts, "; ".join(problems) or None


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Run the scoring job; returns its run record (``runs/<run_id>.json``, copied to ``manifest.json``)."""
    common.setup_logging()
    cfg, beam_args = parse(argv)
    # the same steps as the cascade's, in the same order: every check (models built and run once included)
    # before the folder is touched, then the folder held for the run's life
    with job.prepare(cfg, beam_args, test_pipeline=test_pipeline, tables=TABLES, manifest_columns=False) as run:
        with run.hold():
            pool = build(run)
            started = time.time()
            result = job.run(run)
            counts, problem = check_counts(run.folder, pool, summary.metric(result), run.run_id)
            record = {
                "run_id": run.run_id,
                "config": schema.to_yaml(dataclasses.replace(cfg, overwrite=False)),
                "pool": [{"model": key, "gmacs": g} for key, g in pool],
                "beam_args": list(beam_args),
                "versions": common.versions("apache-beam", "torch", "torchvision", "pyarrow", "numpy", "pillow"),
                "counts": counts,
                "invariant_holds": problem is None,
                "wall_seconds": round(time.time() - started, 2),
            }
            run.folder.commit(record)
    for key, entry in counts["entries"].items():
        print(f"{key}: {entry['scored']} scored, {entry['dead_letters']} dead letters")
    print(f"outputs: {cfg.output}/{{{SCORES.name},dead_letter}}/*.parquet and {cfg.output}/manifest.json "
          f"({record['wall_seconds']:.1f} s)")
    if problem:
        raise SystemExit(f"COUNT INVARIANT VIOLATED: {problem}")
    return record


def main() -> None:
    job.main(run, sys.argv[1:])


if __name__ == "__main__":
    main()
