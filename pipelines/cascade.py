"""The main job: a confidence-based cascade of image classifiers over many images, to Parquet.

    python -m pipelines.cascade --runner=DirectRunner                       # embedded demo
    python -m pipelines.cascade --config lite_cascade --input 'gs://b/*.jpg' --output gs://b/out \
        stages.0.threshold=0.7 --runner=DataflowRunner ...

Our flags: --config, --input, --output, --overwrite; ``key=value`` words are OmegaConf overrides;
everything else goes to Beam's PipelineOptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from configs import schema
from configs.plan import CascadePlan, TaskKind, build_plan
from configs.schema import Execution
from pipelines import common, runners
from transforms.fused import FusedCascade
from transforms.io import DEAD, ReadInputs, check_source
from transforms.outputs import ExitStats, WriteTable
from transforms.progress import NAMESPACE
from transforms.stage import CONTINUE, EXITED, THRESHOLD, CascadeStage, default_threads
from transforms.tables import ALL_TABLE_NAMES, DEAD_LETTER, EXIT_STATS, VIDEO_PREDICTIONS
from transforms.tasks import task_for

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


def parse(argv: Optional[Sequence[str]]) -> tuple[schema.CascadeConfig, list[str], Optional[str]]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cascade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_PROFILE, help="YAML file or profile name in configs/")
    parser.add_argument("--input", default=None, help="glob of image URLs, or a manifest .csv/.parquet")
    parser.add_argument("--output", default=None, help="output folder (local path or URL)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run's outputs")
    args, overrides, beam_args = common.split_argv(parser, argv)
    try:
        cfg = schema.load(args.config, overrides, input=args.input, output=args.output, overwrite=args.overwrite)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    return cfg, beam_args, args.config


def plan(cfg: schema.CascadeConfig, torch_threads: Optional[int] = None) -> CascadePlan:
    """The run's plan; every stage's model is built with its weights and run once first, so that a
    checkpoint that does not fit (shapes, class count) fails here, before any work, naming the stage."""
    try:
        return build_plan(cfg, torch_threads=torch_threads, check_models=True)
    except schema.ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None


def build(p: beam.Pipeline, cfg: schema.CascadeConfig, plan: CascadePlan) -> None:
    """Add the cascade to pipeline ``p``: read -> stage 1 -> ... -> stage n -> Parquet tables. The plan's
    task says what a record is (``transforms.tasks``); its execution mode whether the stages are one step
    (fused: each record decoded once) or a step each (staged)."""
    task = task_for(plan)
    decode = plan.settings.decode
    inputs = p | "ReadInputs" >> ReadInputs(cfg.input, decode.max_bytes, task.reader(plan),
                                            num_classes=plan.stages[0].spec.num_classes,
                                            timeout_s=decode.read_timeout_s)
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
    predictions | "WritePredictions" >> WriteTable(cfg.output, task.predictions, cfg.output_shards)
    task.extra_outputs(exits, plan, cfg.output, cfg.output_shards)
    (
        dead_letters
        | "DeadLetterRows" >> beam.Map(lambda d: d.as_row())
        | "WriteDeadLetters" >> WriteTable(cfg.output, DEAD_LETTER, cfg.output_shards)
    )
    (
        (predictions, dead_letters)
        | "ExitStats" >> ExitStats(plan.stages,
                                   (thresholds | "BudgetThresholds" >> beam.Flatten()) if thresholds else None)
        | "WriteExitStats" >> WriteTable(cfg.output, EXIT_STATS, 1)
    )


def summarize(cfg: schema.CascadeConfig, listed: Optional[int]) -> tuple[dict, list[str]]:
    """Counts and the human summary, read back from the tables written (footers and exit_stats only)."""
    stats = common.read_table(cfg.output, EXIT_STATS.name).to_pylist()
    predictions = common.count_rows(cfg.output, "predictions")
    dead = common.count_rows(cfg.output, DEAD_LETTER.name)
    run = stats[0]
    lines = [f"records: {predictions + dead} inputs -> {predictions} predictions + {dead} dead letters"]
    for s in stats:
        ratio = "n/a" if s["exit_ratio"] is None else f"{s['exit_ratio']:.1%}"
        lines.append(f"  stage {s['stage']} {s['model']}: {s['records_in']} in, {s['records_exited']} exited "
                     f"(exit ratio {ratio}), {s['records_failed']} failed")
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
    """inputs = predictions + dead letters, counted three ways; returns what is wrong, if anything."""
    total = counts["predictions"] + counts["dead_letters"]
    if (counts["predictions"], counts["dead_letters"]) != (
        counts["exit_stats_predictions"], counts["exit_stats_dead_letters"]
    ):
        return (f"tables disagree: predictions {counts['predictions']} vs {counts['exit_stats_predictions']} "
                f"tallied, dead letters {counts['dead_letters']} vs {counts['exit_stats_dead_letters']} tallied")
    if counts["inputs_listed"] is not None and counts["inputs_listed"] != total:
        return f"{counts['inputs_listed']} inputs listed but {total} = predictions + dead letters written"
    if counts.get("videos_sampled") is not None and counts["videos_sampled"] != counts["video_predictions"]:
        return f"{counts['videos_sampled']} videos sampled but {counts['video_predictions']} video predictions written"
    return None


def frame_summary(cfg: schema.CascadeConfig, counts: dict, videos_listed: Optional[int],
                  videos_sampled: Optional[int]) -> list[str]:
    """At frame granularity: the per-video table's counts (added to ``counts``) and summary lines."""
    rows = []
    if common.count_rows(cfg.output, VIDEO_PREDICTIONS.name):
        rows = common.read_table(cfg.output, VIDEO_PREDICTIONS.name).select(["label", "pred_class"]).to_pylist()
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
    cfg, beam_args, profile = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if not cfg.input:
            cfg = dataclasses.replace(cfg, input=demo_manifest(tmp) if cfg.video is None else demo_video_manifest(tmp))
            print(f"no --input given: running the embedded demo set ({cfg.input})")
        return _run(cfg, beam_args, profile, test_pipeline)


def _run(cfg, beam_args, profile, test_pipeline) -> dict:
    options = PipelineOptions(beam_args)
    problems = runners.dataflow_problems(options)
    if problems:
        raise SystemExit("invalid pipeline options:\n  " + "\n  ".join(problems))
    dry_run = runners.is_dry_run(options)
    p = test_pipeline or beam.Pipeline(options=options)  # Beam validates the options here, before any work
    if not dry_run:
        try:
            check_source(cfg.input)
        except ValueError as err:
            raise SystemExit(f"invalid input: {err}") from None
    common.check_output_name(cfg.output)
    threads = None
    direct = options.view_as(DirectOptions)
    if not cfg.torch_threads and direct.direct_running_mode == "multi_processing":
        threads = default_threads(direct.direct_num_workers or os.cpu_count() or 1)
    run_plan = plan(cfg, threads)  # models too are validated before the output folder is touched (--overwrite)
    if dry_run:
        return _execute(p, cfg, run_plan, beam_args, profile, dry_run, None)
    run_id = common.prepare_output(cfg.output, cfg.overwrite, ALL_TABLE_NAMES)
    try:
        return _execute(p, cfg, run_plan, beam_args, profile, dry_run, run_id)
    finally:
        common.release_output(cfg.output, run_id)


def _execute(p, cfg, run_plan, beam_args, profile, dry_run, run_id) -> dict:
    build(p, cfg, run_plan)
    started = time.time()
    result = p.run()
    if dry_run:
        job = runners.dataflow_job(result)
        print("\n".join(runners.summarize_dataflow_job(job)))
        return {"dry_run": True, "config": schema.to_yaml(cfg), "profile": profile, "beam_args": list(beam_args),
                "dataflow_job": job}
    result.wait_until_finish()
    elapsed = time.time() - started
    listed = listed_inputs(result)
    frames = run_plan.task is TaskKind.VIDEO_FRAMES
    if frames:  # the records are frames: a video becomes as many records as frames sampled from it
        videos_listed, videos_sampled = listed, listed_inputs(result, "videos_sampled")
        if listed is not None:
            listed += listed_inputs(result, "frames_sampled") - videos_sampled
    counts, lines = summarize(cfg, listed)
    if not listed and not counts["predictions"] + counts["dead_letters"]:
        raise SystemExit(f"no inputs: {cfg.input} listed nothing (a glob that matches no file, or a manifest "
                         "without rows); the run is not marked complete")
    if frames:
        lines += frame_summary(cfg, counts, videos_listed, videos_sampled)
    problem = check_invariant(counts)
    manifest = {
        "config": schema.to_yaml(cfg),
        "profile": profile,
        "run_id": run_id,
        "beam_args": list(beam_args),
        "versions": common.versions("apache-beam", "torch", "torchvision", "pyarrow", "numpy", "pillow",
                                    "omegaconf", "cascade-inference", *(("av",) if cfg.video else ())),
        "stages": [stage.summary() for stage in run_plan.stages],
        "counts": counts,
        "invariant_holds": problem is None,
        "wall_seconds": round(elapsed, 2),
        "gmacs_note": "GMACs are multiply-adds x1e9 (the paper's 'FLOPS (B)'), measured by torch's FLOP counter / 2",
    }
    try:
        common.write_json(cfg.output, common.MANIFEST, manifest)
    except OSError as err:
        raise SystemExit(f"output: could not write {cfg.output}/{common.MANIFEST} ({type(err).__name__}: {err}); "
                         "the tables are written but the run is not marked complete") from None
    print("\n".join(lines))
    print(f"outputs: {cfg.output}/{{predictions,exit_stats,dead_letter}}/*.parquet and {cfg.output}/manifest.json "
          f"({elapsed:.1f} s)")
    if problem:
        raise SystemExit(f"COUNT INVARIANT VIOLATED: {problem}")
    total = counts["predictions"] + counts["dead_letters"]
    print(f"count invariant holds: inputs = predictions + dead letters = {total}")
    return manifest


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
