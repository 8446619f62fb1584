"""The main job: a confidence-based cascade of image classifiers over many images, to Parquet.

  python -m pipelines.cascade --runner=DirectRunner                  # the embedded demo photos
  python -m pipelines.cascade --config lite_cascade --input 'gs://b/imgs/*.jpg' --output gs://b/out
      stages.0.threshold=0.7 --runner=DataflowRunner ...           (one command line)
  python -m pipelines.cascade --config lite_cascade --input manifest.csv --output out --plan

Our flags are listed below; words of the form key=value are config overrides (OmegaConf dotted keys,
e.g. stages.0.threshold=0.7); every other flag goes to Beam's pipeline options (--runner=...).
"""

from __future__ import annotations

if __name__ == "__main__":  # before Beam is imported: its import logs a warning that concerns no pipeline here
    from pipelines import quiet_beam_import

    quiet_beam_import()

import argparse
import datetime
import gc
import json
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam

from configs import schema
from configs.plan import TaskKind
from configs.schema import Execution
from pipelines import common, demo, job, plan_report, runners, summary
from transforms.io import DEAD, ReadInputs
from transforms.outputs import ExitStats, WriteTable
from transforms.stage import CONTINUE, EXITED, THRESHOLD, CascadeStage
from transforms.tables import DEAD_LETTER, EXIT_STATS, Table

DEFAULT_PROFILE = "lite_cascade"
GMACS_NOTE = "GMACs are multiply-adds x1e9 (the paper's 'FLOPS (B)'), measured by torch's FLOP counter / 2"


def parse(argv: Optional[Sequence[str]]) -> tuple[schema.CascadeConfig, list[str], Optional[str], bool]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cascade", description=__doc__,
                                     epilog=common.profiles_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_PROFILE,
                        help=f"a profile name (listed below) or a YAML file (default: {DEFAULT_PROFILE})")
    parser.add_argument("--input", default=None,
                        help="a glob of image URLs, or a manifest .csv/.parquet (default: the embedded demo photos)")
    parser.add_argument("--output", default=None, help="output folder, a local path or URL (default: the config's)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the outputs of earlier (or interrupted) runs in the output folder (only files "
                             "this project wrote are removed)")
    parser.add_argument("--skip_done", action="store_true", default=None,
                        help="add this run to an output folder that holds earlier runs: skip the ids they have "
                             "(predictions and dead letters); for a growing dataset or a job resumed piece by piece")
    parser.add_argument("--retry_dead_letters", action="store_true", default=None,
                        help="with --skip_done: try again the ids earlier runs dead-lettered")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="classify only the first N inputs in listing order (a trial on a subset)")
    parser.add_argument("--plan", action="store_true",
                        help="run nothing: count the inputs and print the stages, the exit ratios and GMACs the "
                             "config's calibration expects and the compute the run will take")
    args, overrides, beam_args = common.split_argv(parser, argv)
    try:
        cfg = schema.load(args.config, overrides, input=args.input, output=args.output, overwrite=args.overwrite,
                          skip_done=args.skip_done, retry_dead_letters=args.retry_dead_letters, limit=args.limit)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    return cfg, beam_args, args.config, args.plan


def table_metadata(run: job.Job) -> dict:
    """What every Parquet file of the run says about it (its key-value metadata)."""
    return {"cascade.run_id": run.run_id, "cascade.started_utc": run.started_utc, "cascade.profile": str(run.profile),
            "cascade.config": schema.to_yaml(run.cfg), "cascade.versions": json.dumps(job.versions(run.cfg)),
            "cascade.stages": json.dumps([stage.summary() for stage in run.plan.stages])}


def build(run: job.Job) -> None:
    """Add the cascade to the job's pipeline: read -> stage 1 -> ... -> stage n -> Parquet tables. The task says
    what a record is (``transforms.tasks``); the plan's execution mode whether the stages are one step (fused:
    each record decoded once) or a step each (staged)."""
    cfg, plan, task, metadata = run.cfg, run.plan, run.task, table_metadata(run)

    def sink(table: Table, shards: int = cfg.output_shards) -> WriteTable:
        return WriteTable(run.folder.table_prefix(table.name, plan.run_id), table, metadata, shards)

    decode = plan.settings.decode
    done = ()
    if cfg.skip_done:  # ids the committed runs have: read by the job, met in the grouping by id
        done = [url for name in [task.predictions.name] + ([] if cfg.retry_dead_letters else [DEAD_LETTER.name])
                for url in run.folder.file_urls(name)]
    inputs = run.pipeline | "ReadInputs" >> ReadInputs(cfg.input, decode.max_bytes, task.reader(plan),
                                                       num_classes=plan.stages[0].spec.num_classes,
                                                       timeout_s=decode.read_timeout_s, done=done,
                                                       read=cfg.read,
                                                       breaker=cfg.circuit_breaker, limit=cfg.limit)
    records = inputs["records"]
    exited, dead, thresholds = [], [inputs[DEAD]], []
    if plan.execution is Execution.FUSED:
        out = records | "Cascade" >> task.fused(plan)
        exited.append(out[EXITED])
        dead.append(out[DEAD])
    else:
        for stage in plan.stages:
            out = records | f"Stage{stage.number}" >> CascadeStage(stage, task)
            exited.append(out[EXITED])
            dead.append(out[DEAD])
            thresholds += [out[THRESHOLD]] if out[THRESHOLD] is not None else []
            records = out[CONTINUE]
    exits = exited | "MergeExits" >> beam.Flatten()
    predictions = exits | "PredictionRows" >> beam.Map(task.prediction_row, plan)
    dead_letters = dead | "MergeDeadLetters" >> beam.Flatten()
    predictions | "WritePredictions" >> sink(task.predictions)
    task.extra_outputs(exits, plan, sink)
    run_id = plan.run_id
    dead_letters | "DeadLetterRows" >> beam.Map(lambda d: d.as_row(run_id)) | "WriteDeadLetters" >> sink(DEAD_LETTER)
    (
        (predictions, dead_letters)
        | "ExitStats" >> ExitStats(plan.stages, plan.run_id,
                                   (thresholds | "BudgetThresholds" >> beam.Flatten()) if thresholds else None)
        | "WriteExitStats" >> sink(EXIT_STATS, 1)
    )


def run_record(run: job.Job, counts: summary.RunCounts, elapsed: float) -> dict:
    """The run record (``runs/<run_id>.json``, the commit; the copy in ``manifest.json``)."""
    return {
        "run_id": run.run_id, "started_utc": run.started_utc,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": schema.to_yaml(run.cfg), "profile": run.profile, "beam_args": run.beam_args,
        "versions": job.versions(run.cfg), "stages": [stage.summary() for stage in run.plan.stages],
        "tables": [t.name for t in (*run.task.tables, DEAD_LETTER, EXIT_STATS)], "counts": counts.as_dict(),
        "invariant_holds": counts.problem() is None, "wall_seconds": round(elapsed, 2), "gmacs_note": GMACS_NOTE,
    }


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    """Run the job; returns the run record (also written as ``runs/<run_id>.json`` and ``manifest.json``)."""
    common.setup_logging()
    cfg, beam_args, profile, plan_only = parse(argv)
    if plan_only:
        return plan_report.print_plan(cfg, profile)
    with demo.inputs(cfg, profile) as cfg, job.prepare(cfg, beam_args, profile, test_pipeline) as prepared:
        if prepared.dry_run:
            return dry_run(prepared)
        with prepared.hold():
            build(prepared)
            started = time.time()
            result = job.run(prepared)
            counts, lines = summary.count_run(result, prepared.folder, prepared.run_id, skip_done=cfg.skip_done,
                                              frames=prepared.plan.task is TaskKind.VIDEO_FRAMES, limit=cfg.limit,
                                              aggregation=schema.Aggregation(cfg.aggregation).value)
            summary.refuse_to_commit(counts, lines, prepared.folder, prepared.run_id, cfg.input, cfg.circuit_breaker)
            record = run_record(prepared, counts, time.time() - started)
            marker = prepared.folder.commit(record)
    print("\n".join(lines))
    print(f"outputs: {cfg.output}/{{{','.join(record['tables'])}}}/{record['run_id']}-*.parquet, committed as "
          f"{marker} (and manifest.json) ({record['wall_seconds']:.1f} s)")
    if counts.problem():
        raise SystemExit(f"COUNT INVARIANT VIOLATED: {counts.problem()}")
    print(counts.invariant_line())
    return record


def dry_run(prepared: job.Job) -> dict:
    """A Dataflow dry run: the whole job description built and validated, nothing submitted or written."""
    build(prepared)
    described = runners.dataflow_job(prepared.pipeline.run())
    print("\n".join(runners.summarize_dataflow_job(described)))
    return {"dry_run": True, "config": schema.to_yaml(prepared.cfg), "profile": prepared.profile,
            "beam_args": prepared.beam_args, "dataflow_job": described}


def main() -> None:
    # The objects made by importing torch and Beam live until the process ends: frozen, the cyclic garbage
    # collector stops walking them again and again while records flow, and once more when the interpreter
    # exits (about a second of each 2,000-record run here, benchmarks/README.md). Only the command line does
    # this: an embedding program's collector is its own business.
    gc.freeze()
    job.main(run, sys.argv[1:])
    gc.freeze()  # what the run left behind too: the process ends here


if __name__ == "__main__":
    main()
