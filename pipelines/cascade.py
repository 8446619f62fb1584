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
import dataclasses
import datetime
import gc
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Optional, Sequence

import apache_beam as beam
import pyarrow.dataset as ds
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from configs import estimate, schema
from configs.plan import CascadePlan, TaskKind, build_plan
from configs.schema import Execution
from models import failures
from models.classifier import release_checked
from pipelines import common, runners
from transforms.fused import FusedCascade
from transforms.io import DEAD, ReadInputs, check_source, count_inputs, extra_fields
from transforms.outputs import ExitStats, WriteTable
from transforms.progress import NAMESPACE
from transforms.stage import CONTINUE, EXITED, THRESHOLD, CascadeStage, default_threads
from transforms.tables import ALL_TABLE_NAMES, DEAD_LETTER, EXIT_STATS, VIDEO_PREDICTIONS, Table
from transforms.tasks import ImageTask, task_for

DEFAULT_PROFILE = "lite_cascade"
DEMO_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif")
log = logging.getLogger("cascade")


def demo_photos() -> list[str]:
    """The photos that ship inside scikit-image (no download)."""
    import skimage

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    return [os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir)) if f.lower().endswith(DEMO_SUFFIXES)]


def demo_manifest(folder: str) -> str:
    """Write a manifest of the demo photos and return its path."""
    path = os.path.join(folder, "demo_manifest.csv")
    with open(path, "w") as fh:
        fh.write("uri\n" + "".join(f"{p}\n" for p in demo_photos()))
    return path


def demo_video_manifest(folder: str) -> str:
    """Encode a short pan-and-zoom video over each colour demo photo and write their manifest; returns its path."""
    from models.video import pan_zoom_videos

    path = os.path.join(folder, "demo_video_manifest.csv")
    with open(path, "w") as fh:
        fh.write("uri\n" + "".join(f"{uri}\n" for uri in pan_zoom_videos(demo_photos(), folder)))
    return path


def profiles_epilog() -> str:
    """The profiles in configs/, each with the first line of its comment, for --help."""
    lines = ["profiles (--config NAME; configs/NAME.yaml):"]
    for name in sorted(f[:-5] for f in os.listdir(schema.CONFIG_DIR) if f.endswith(".yaml")):
        with open(os.path.join(schema.CONFIG_DIR, f"{name}.yaml")) as fh:
            first = fh.readline().strip()
        about = re.split(r"\. | \(|: ", first.lstrip("# ").strip())[0] if first.startswith("#") else ""
        if len(about) > 80:
            about = about[:80].rsplit(" ", 1)[0] + " ..."
        lines.append(f"  {name:<28} {about}".rstrip())
    return "\n".join(lines)


def parse(argv: Optional[Sequence[str]]) -> tuple[schema.CascadeConfig, list[str], Optional[str], bool]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cascade", description=__doc__,
                                     epilog=profiles_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_PROFILE,
                        help=f"a profile name (listed below) or a YAML file (default: {DEFAULT_PROFILE})")
    parser.add_argument("--input", default=None,
                        help="a glob of image URLs, or a manifest .csv/.parquet (default: the embedded demo photos)")
    parser.add_argument("--output", default=None, help="output folder, a local path or URL (default: the config's)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the outputs of an earlier (or an interrupted) run in the output folder")
    parser.add_argument("--skip_done", action="store_true", default=None,
                        help="add this run to an output folder that holds earlier runs: skip the ids they have "
                             "(predictions and dead letters); for a growing dataset or a job resumed piece by piece")
    parser.add_argument("--retry_dead_letters", action="store_true", default=None,
                        help="with --skip_done: try again the ids earlier runs dead-lettered")
    parser.add_argument("--plan", action="store_true",
                        help="run nothing: count the inputs and print the stages, the exit ratios and GMACs the "
                             "config's calibration expects and the compute the run will take")
    args, overrides, beam_args = common.split_argv(parser, argv)
    try:
        cfg = schema.load(args.config, overrides, input=args.input, output=args.output, overwrite=args.overwrite,
                          skip_done=args.skip_done, retry_dead_letters=args.retry_dead_letters)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    return cfg, beam_args, args.config, args.plan


def plan(cfg: schema.CascadeConfig, torch_threads: Optional[int] = None, keep_models: bool = False) -> CascadePlan:
    """The run's plan; every stage's model is built with its weights and run once first, so that a
    checkpoint that does not fit (shapes, class count) fails here, before any work, naming the stage.
    ``keep_models``: the workers are threads of this process, which take the checked models as they are."""
    try:
        return build_plan(cfg, torch_threads=torch_threads, check_models=True, keep_models=keep_models)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None


def run_task(cfg: schema.CascadeConfig, plan: CascadePlan, read_header: bool = True) -> ImageTask:
    """The plan's task, its predictions carrying the manifest's own columns (read from its header, unless
    ``read_header`` is false: a Dataflow dry run, whose inputs need not be readable from here); a column
    whose name clashes with one of ours is refused here, before any work."""
    try:
        return task_for(plan, extra_fields(cfg.input) if read_header else ())
    except (OSError, ValueError) as err:
        raise SystemExit(f"invalid input: {err}") from None


def table_metadata(cfg: schema.CascadeConfig, plan: CascadePlan, started: str, profile: Optional[str]) -> dict:
    """What every Parquet file of the run says about it (its key-value metadata)."""
    return {"cascade.run_id": plan.run_id, "cascade.started_utc": started, "cascade.profile": str(profile),
            "cascade.config": schema.to_yaml(cfg), "cascade.versions": json.dumps(run_versions(cfg)),
            "cascade.stages": json.dumps([stage.summary() for stage in plan.stages])}


def run_versions(cfg: schema.CascadeConfig) -> dict:
    return common.versions("apache-beam", "torch", "torchvision", "pyarrow", "numpy", "pillow", "omegaconf",
                           "cascade-inference", *(("av",) if cfg.video else ()))


def _hours(hours: float) -> str:
    """A duration for a person: hours, or minutes / seconds when short."""
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def _machine_line(name: str, machine: estimate.Machine, est: estimate.Estimate, gpu_decode: bool) -> list[str]:
    cascade, alone = est.cascade_compute(machine, gpu_decode), est.last_alone_compute(machine, gpu_decode)
    if cascade is None or alone is None:
        missing = sorted(set(est.keys) - set(machine.model_images_per_s))
        return [f"  {name}: no throughput figure for {', '.join(missing) or 'the inputs (no count)'}"]

    def cost(c: estimate.Compute) -> str:
        if machine.kind == "cpu":
            return (f"{_hours(c.hours)} of one such machine = {c.hours:,.4g} machine-hours ({c.core_hours:,.4g} "
                    f"core-hours); {1 / c.seconds_per_record:,.1f} records/s")
        return (f"{_hours(c.hours)} of one GPU worker = {c.hours:,.4g} GPU-hours; "
                f"{1 / c.seconds_per_record:,.0f} records/s")

    used = [f"{k} {machine.model_images_per_s[k]:,.1f} images/s" for k in dict.fromkeys(est.keys)]
    used.append(f"decoding {machine.decode_images_per_s_per_core:,.0f} images/s per core x {machine.cores}")
    if machine.kind == "gpu" and gpu_decode and machine.gpu_decode_images_per_s:
        used.append(f"nvJPEG {machine.gpu_decode_images_per_s:,.0f} images/s")
    if machine.overhead_s_per_record:
        used.append(f"pipeline overhead {1000 * machine.overhead_s_per_record:.1f} ms per record")
    return [
        f"  {name} ({machine.machine}; figures of {machine.date}):",
        f"    cascade: {cost(cascade)}, bound by {cascade.bound}",
        f"    {est.keys[-1]} alone: {cost(alone)}: the cascade takes {cascade.hours / alone.hours:.0%} of its time",
        "    figures used: " + "; ".join(used),
        "    sources: " + "; ".join(f"{k}: {v}" for k, v in machine.sources.items()),
    ]


def plan_lines(cfg: schema.CascadeConfig, profile: Optional[str], records: Optional[int], counted: str,
               figures: dict[str, estimate.Machine]) -> tuple[estimate.Estimate, list[str]]:
    """The --plan report: inputs, stages, expected exit ratios and GMACs, compute against the last model."""
    try:
        run_plan = build_plan(cfg)  # no model is loaded: GMACs come from the registry's cache
        cal = cfg.calibration
        est = estimate.estimate(run_plan, None if cal is None else cal.expected_exit_ratios, records)
    except (schema.ConfigError, ValueError) as err:
        raise SystemExit(f"invalid config: {err}") from None
    lines = [f"plan of {profile} over {cfg.input or 'the embedded demo photos'}: "
             + (f"{records:,} inputs ({counted})" if records is not None else "inputs not counted"),
             "", "| stage | model | threshold | GMACs | cumulative GMACs | expected exit ratio | expected reach |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    reach = est.reach or [None] * len(est.keys)
    ratios = est.expected_exit_ratios or [None] * len(est.keys)
    for i, (key, t, g, c, ratio, r) in enumerate(zip(est.keys, est.thresholds, est.stage_gmacs,
                                                    est.cumulative_gmacs, ratios, reach), start=1):
        lines.append(f"| {i} | {key} | {'-' if t is None else f'{t:.4f}'} | {g:.3f} | {c:.3f} | "
                     f"{'?' if ratio is None else f'{ratio:.1%}'} | {'?' if r is None else f'{r:.1%}'} |")
    lines.append("")
    if cal is None or est.expected_exit_ratios is None:
        lines.append("the config has no calibration block (calibration.expected_exit_ratios): the exit ratios and "
                     "the average cost are unknown until it runs; compute below is the worst case, every record "
                     "through every stage (docs/CALIBRATION.md makes a calibrated config)")
    else:
        lines.append(f"calibration: {cal.target or 'target not recorded'} on {cal.data or 'data not recorded'}"
                     + (f", {cal.heldout_records} held-out records" if cal.heldout_records else "")
                     + (f"; held-out accuracy {cal.heldout_accuracy:.2%}" if cal.heldout_accuracy is not None else "")
                     + (f" (margin {cal.margin:.2%})" if cal.margin is not None else "")
                     + (f"; held-out average GMACs {cal.heldout_gmacs:.3f}" if cal.heldout_gmacs is not None else ""))
    avg = "unknown" if est.avg_gmacs is None else f"expected average {est.avg_gmacs:.3f}"
    lines.append(f"GMACs (multiply-adds x1e9) per record: {avg}, worst case {est.worst_gmacs:.3f}; "
                 f"{est.keys[-1]} alone {est.last_model_gmacs:.3f}"
                 + ("" if est.avg_gmacs is None else f" (the cascade: {est.avg_gmacs / est.last_model_gmacs:.0%} "
                    "of it)"))
    lines += ["", f"compute for the {'expected' if est.reach else 'worst'} case, at throughputs measured by "
                  f"benchmarks/ ({os.path.relpath(estimate.FIGURES, os.getcwd()) if figures else 'no figures'}); "
                  f"the config's device is {cfg.device}:"]
    if not figures:
        lines.append("  no throughput figures (benchmarks/throughput_figures.json is absent)")
    for name, machine in figures.items():
        lines += _machine_line(name, machine, est, cfg.decode.gpu)
    return est, lines


def print_plan(cfg: schema.CascadeConfig, profile: Optional[str]) -> dict:
    """--plan: nothing runs and no model is loaded; prints the plan and returns it as a dict."""
    if cfg.input:
        try:
            records, counted = count_inputs(cfg.input)
        except (OSError, ValueError) as err:
            raise SystemExit(f"invalid input: {err}") from None
    else:
        records, counted = len(demo_photos()), "photos inside scikit-image"
    est, lines = plan_lines(cfg, profile, records, counted, estimate.load_figures())
    lines.append("(nothing was run and no model was loaded)")
    print("\n".join(lines))
    return {"plan": True, "records": records, "stages": list(est.keys), "expected_exit_ratios":
            est.expected_exit_ratios, "avg_gmacs": est.avg_gmacs, "worst_gmacs": est.worst_gmacs,
            "last_model_gmacs": est.last_model_gmacs}


def build(p: beam.Pipeline, cfg: schema.CascadeConfig, plan: CascadePlan, task: Optional[ImageTask] = None,
          metadata: Optional[dict] = None) -> None:
    """Add the cascade to pipeline ``p``: read -> stage 1 -> ... -> stage n -> Parquet tables. The task says
    what a record is (``transforms.tasks``); the plan's execution mode whether the stages are one step (fused:
    each record decoded once) or a step each (staged); ``metadata`` goes into every file written."""
    task = task or run_task(cfg, plan)

    def sink(table: Table, shards: int = cfg.output_shards) -> WriteTable:
        return WriteTable(cfg.output, table, plan.run_id, metadata, shards)

    decode = plan.settings.decode
    done = ()
    if cfg.skip_done:  # ids the committed runs have: read by the job, met in the grouping by id
        done = common.done_files(cfg.output, [task.predictions.name]
                                 + ([] if cfg.retry_dead_letters else [DEAD_LETTER.name]))
    inputs = p | "ReadInputs" >> ReadInputs(cfg.input, decode.max_bytes, task.reader(plan),
                                            num_classes=plan.stages[0].spec.num_classes,
                                            timeout_s=decode.read_timeout_s, done=done)
    records = inputs["records"]
    exited, dead, thresholds = [], [inputs[DEAD]], []
    if plan.execution is Execution.FUSED:
        out = records | "Cascade" >> FusedCascade(plan)
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
    (
        dead_letters
        | "DeadLetterRows" >> beam.Map(lambda d: d.as_row(run_id))
        | "WriteDeadLetters" >> sink(DEAD_LETTER)
    )
    (
        (predictions, dead_letters)
        | "ExitStats" >> ExitStats(plan.stages, plan.run_id,
                                   (thresholds | "BudgetThresholds" >> beam.Flatten()) if thresholds else None)
        | "WriteExitStats" >> sink(EXIT_STATS, 1)
    )


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


def summarize(cfg: schema.CascadeConfig, listed: Optional[int], run_id: str) -> tuple[dict, list[str]]:
    """Counts and the human summary, read back from the run's tables (footers and exit_stats only)."""
    stats = common.read_table(cfg.output, EXIT_STATS.name, [run_id]).to_pylist()
    predictions = common.count_rows(cfg.output, "predictions", [run_id])
    dead = common.count_rows(cfg.output, DEAD_LETTER.name, [run_id])
    run = stats[0]
    lines = [f"records: {predictions + dead} inputs -> {predictions} predictions + {dead} dead letters",
             *stage_lines(stats)]
    if run["avg_gmacs"] is not None:
        share = f" ({run['avg_gmacs'] / run['last_model_gmacs']:.0%} of it)" if run["last_model_gmacs"] else ""
        lines.append(f"GMACs (multiply-adds x1e9) per record: average {run['avg_gmacs']:.3f}, worst case "
                     f"{run['worst_case_gmacs']:.3f}; last model alone {run['last_model_gmacs']:.3f}{share}")
    if run["accuracy"] is not None:
        lines.append(f"accuracy on labelled records: {run['accuracy']:.2%}")
    counts = {"inputs_listed": listed, "predictions": predictions, "dead_letters": dead,
              "exit_stats_predictions": run["predictions"], "exit_stats_dead_letters": run["dead_letters"]}
    return counts, lines


def check_invariant(counts: dict) -> Optional[str]:
    """inputs = skipped + predictions + dead letters (skipped: with --skip_done), counted three ways; returns
    what is wrong, if anything."""
    total = (counts.get("inputs_skipped") or 0) + counts["predictions"] + counts["dead_letters"]
    if (counts["predictions"], counts["dead_letters"]) != (
        counts["exit_stats_predictions"], counts["exit_stats_dead_letters"]
    ):
        return (f"tables disagree: predictions {counts['predictions']} vs {counts['exit_stats_predictions']} "
                f"tallied, dead letters {counts['dead_letters']} vs {counts['exit_stats_dead_letters']} tallied")
    if counts["inputs_listed"] is not None and counts["inputs_listed"] != total:
        what = "skipped + predictions + dead letters" if "inputs_skipped" in counts else "predictions + dead letters"
        return f"{counts['inputs_listed']} inputs listed but {total} = {what} written"
    if counts.get("videos_sampled") is not None and counts["videos_sampled"] != counts["video_predictions"]:
        return f"{counts['videos_sampled']} videos sampled but {counts['video_predictions']} video predictions written"
    return None


def systemic_failure(cfg: schema.CascadeConfig, run_id: str) -> Optional[str]:
    """The circuit breaker's rule (``models.failures.judge``) over each stage of the finished run, from its
    exit_stats and dead_letter tables: the message when one category failed (nearly) every record of a stage."""
    if not common.count_rows(cfg.output, DEAD_LETTER.name, [run_id]):
        return None
    dead = common.table_dataset(cfg.output, DEAD_LETTER.name, [run_id])
    tally = dead.to_table(columns=["stage", "category"]).group_by(["stage", "category"]).aggregate([([], "count_all")])
    for s in common.read_table(cfg.output, EXIT_STATS.name, [run_id]).to_pylist():
        counts = {row["category"]: row["count_all"] for row in tally.to_pylist() if row["stage"] == s["stage"]}
        what = "reading the inputs" if s["stage"] == 0 else f"stage {s['stage']} ({s['model']})"
        if failures.judge(what, s["records_in"], counts, "", cfg.circuit_breaker):
            category = max(counts, key=counts.get)
            last = dead.to_table(columns=["error"], filter=(ds.field("stage") == s["stage"])
                                 & (ds.field("category") == category)).column("error")[-1].as_py()
            return failures.judge(what, s["records_in"], counts, last, cfg.circuit_breaker)
    return None


def frame_summary(cfg: schema.CascadeConfig, counts: dict, videos_listed: Optional[int],
                  videos_sampled: Optional[int], run_id: str) -> list[str]:
    """At frame granularity: the per-video table's counts (added to ``counts``) and summary lines."""
    rows = []
    if common.count_rows(cfg.output, VIDEO_PREDICTIONS.name, [run_id]):
        rows = common.read_table(cfg.output, VIDEO_PREDICTIONS.name, [run_id]).select(
            ["label", "pred_class"]).to_pylist()
    counts.update(videos_listed=videos_listed, videos_sampled=videos_sampled, video_predictions=len(rows))
    lines = [(f"videos: {videos_listed} listed, {videos_sampled} sampled into {counts['inputs_listed']} frame "
              f"records (read failures included) -> {len(rows)} rows in {VIDEO_PREDICTIONS.name}")]
    labelled = [r for r in rows if r["label"] is not None]
    if labelled:
        correct = sum(r["label"] == r["pred_class"] for r in labelled)
        lines.append(f"video accuracy (mean of frame logits) on labelled videos: {correct / len(labelled):.2%}")
    return lines


def listed_inputs(result, name: str = "inputs_listed") -> Optional[int]:
    try:
        wanted = beam.metrics.MetricsFilter().with_namespace(NAMESPACE).with_name(name)
        query = result.metrics().query(wanted)
    except (NotImplementedError, AttributeError):
        return None
    counters = query.get("counters", [])
    if not counters:
        return 0
    return sum(c.committed if c.committed is not None else c.attempted for c in counters)


def run(argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> dict:
    """Run the job; returns the run manifest (also written as ``manifest.json`` in the output folder)."""
    common.setup_logging()
    cfg, beam_args, profile, plan_only = parse(argv)
    if plan_only:
        return print_plan(cfg, profile)
    with tempfile.TemporaryDirectory() as tmp:
        if not cfg.input:
            cfg = dataclasses.replace(cfg, input=demo_manifest(tmp) if cfg.video is None else demo_video_manifest(tmp))
            print(f"no --input given: running the embedded demo set ({cfg.input})")
        return _run(cfg, beam_args, profile, test_pipeline)


def _run(cfg, beam_args, profile, test_pipeline) -> dict:
    options = PipelineOptions(beam_args)
    runners.refuse(runners.dataflow_problems(options) + runners.local_problems(options))
    dry_run = runners.is_dry_run(options)
    p = test_pipeline or beam.Pipeline(options=options)  # Beam validates the options here, before any work
    if not dry_run:
        try:
            check_source(cfg.input)
        except ValueError as err:
            raise SystemExit(f"invalid input: {err}") from None
    common.check_output_name(cfg.output)
    threads, workers = None, runners.worker_count(options)
    if not cfg.torch_threads and (workers > 1 or options.view_as(DirectOptions).direct_running_mode
                                  == "multi_processing"):
        threads = default_threads(workers)  # per worker, process or thread
    now = datetime.datetime.now(datetime.timezone.utc)
    started_utc = now.isoformat(timespec="seconds")
    # models too are validated before the output folder is touched (--overwrite)
    try:
        run_plan = dataclasses.replace(plan(cfg, threads, runners.in_process(options)), run_id=common.new_run_id(now))
        task = run_task(cfg, run_plan, not dry_run)  # a manifest column clashing with ours is refused before work
        if dry_run:
            return _execute(p, cfg, run_plan, task, beam_args, profile, dry_run, started_utc)
        common.prepare_output(cfg.output, cfg.overwrite, ALL_TABLE_NAMES, run_plan.run_id,
                              keep_committed=cfg.skip_done)
        try:
            return _execute(p, cfg, run_plan, task, beam_args, profile, dry_run, started_utc)
        finally:
            common.release_output(cfg.output, run_plan.run_id)
    finally:
        release_checked()  # the checked models no worker took


def _execute(p, cfg, run_plan, task, beam_args, profile, dry_run, started_utc) -> dict:
    build(p, cfg, run_plan, task, table_metadata(cfg, run_plan, started_utc, profile))
    started = time.time()
    try:
        result = p.run()
        if not dry_run:
            result.wait_until_finish()
    except Exception as err:  # a stage's circuit breaker stopped the job: its one line, not the runner's traceback
        cause = failures.systemic_cause(err)
        if cause is None:
            raise
        raise SystemExit(cause) from None
    if dry_run:
        job = runners.dataflow_job(result)
        print("\n".join(runners.summarize_dataflow_job(job)))
        return {"dry_run": True, "config": schema.to_yaml(cfg), "profile": profile, "beam_args": list(beam_args),
                "dataflow_job": job}
    elapsed = time.time() - started
    listed = listed_inputs(result)
    frames = run_plan.task is TaskKind.VIDEO_FRAMES
    if frames:  # the records are frames: a video becomes as many records as frames sampled from it
        videos_listed, videos_sampled = listed, listed_inputs(result, "videos_sampled")
        if listed is not None:
            listed += listed_inputs(result, "frames_sampled") - videos_sampled
    counts, lines = summarize(cfg, listed, run_plan.run_id)
    if cfg.skip_done:
        counts["inputs_skipped"] = listed_inputs(result, "inputs_skipped")
        lines.insert(0, f"skipped: {counts['inputs_skipped']} inputs whose ids earlier runs of {cfg.output} have")
    if not listed and not counts["predictions"] + counts["dead_letters"] and not counts.get("inputs_skipped"):
        raise SystemExit(f"no inputs: {cfg.input} listed nothing (a glob that matches no file, or a manifest "
                         "without rows); the run is not marked complete")
    if frames:
        lines += frame_summary(cfg, counts, videos_listed, videos_sampled, run_plan.run_id)
    problem = check_invariant(counts)
    stop = None if problem else systemic_failure(cfg, run_plan.run_id)
    if stop:  # before the commit: a run whose records (nearly) all failed one way is a failed run
        print("\n".join(lines))
        raise SystemExit(stop)
    manifest = {
        "run_id": run_plan.run_id,
        "started_utc": started_utc,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": schema.to_yaml(cfg),
        "profile": profile,
        "beam_args": list(beam_args),
        "versions": run_versions(cfg),
        "stages": [stage.summary() for stage in run_plan.stages],
        "tables": [t.name for t in (*task.tables, DEAD_LETTER, EXIT_STATS)],
        "counts": counts,
        "invariant_holds": problem is None,
        "wall_seconds": round(elapsed, 2),
        "gmacs_note": "GMACs are multiply-adds x1e9 (the paper's 'FLOPS (B)'), measured by torch's FLOP counter / 2",
    }
    try:  # last: the run is committed once runs/<run_id>.json exists
        common.commit_run(cfg.output, manifest)
    except OSError as err:
        raise SystemExit(f"output: could not write {cfg.output}/{common.RUNS}/{run_plan.run_id}.json "
                         f"({type(err).__name__}: {err}); the tables are written but the run is not "
                         "committed") from None
    print("\n".join(lines))
    print(f"outputs: {cfg.output}/{{{','.join(manifest['tables'])}}}/{run_plan.run_id}-*.parquet, committed as "
          f"{cfg.output}/{common.RUNS}/{run_plan.run_id}.json (and manifest.json) ({elapsed:.1f} s)")
    if problem:
        raise SystemExit(f"COUNT INVARIANT VIOLATED: {problem}")
    total = counts["predictions"] + counts["dead_letters"]
    if cfg.skip_done:
        total += counts["inputs_skipped"] or 0
        print(f"count invariant holds: inputs = skipped + predictions + dead letters = {total}")
    else:
        print(f"count invariant holds: inputs = predictions + dead letters = {total}")
    return manifest


def main() -> None:
    # The objects made by importing torch and Beam live until the process ends: frozen, the cyclic garbage
    # collector stops walking them again and again while records flow, and once more when the interpreter
    # exits (about a second of each 2,000-record run here, benchmarks/README.md). Only the command line does
    # this: an embedding program's collector is its own business.
    gc.freeze()
    run(sys.argv[1:])
    gc.freeze()  # what the run left behind too: the process ends here


if __name__ == "__main__":
    main()
