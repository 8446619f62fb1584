"""Throughput of the pipeline, side by side in one run: the fused cascade vs the staged cascade vs the same
cascade as a plain loop vs Lite2 alone vs the fused cascade in one process.

    python benchmarks/throughput.py [--records 2000] [--repeats 3] [--workers CORES] [--memory_base 62]
                                    [--device cpu] [--config lite_cascade] [--variants a,b,...]

Over the shared ImageNet sample repeated to ``--records`` records (distinct ids, same files), each of these
runs in a fresh process, ``--repeats`` times, in rotating order so that drifts of the machine's speed fall
on all of them alike:

- ``pipeline_cascade``: ``python -m pipelines.cascade --config lite_cascade --runner=FnApiRunner
  --direct_running_mode=in_memory --direct_num_workers=W`` (W = ``--workers``, the machine's cores by
  default; one process, W worker threads sharing each model, one torch thread each: what ``run_local.sh``
  runs), in the default execution mode (fused: decode once); the
  Lite0@224 -> Lite1@240 -> Lite2@260 cascade with the thresholds calibrated to match Lite2@260's accuracy
  on the clean sample at least cost (configs/lite_cascade.yaml, from pipelines.calibrate);
- ``pipeline_staged``: the same with ``execution=staged`` (a step per stage, re-decoding escalated records);
- ``plain_loop``: the same cascade with no Beam, in W processes that each take every W-th record and run
  the fused algorithm in a Python loop: decode once (for the largest stage's size), per-stage buffers of
  full batches, the same model code (``models.inference``) and committee maths, writing the predictions;
- ``pipeline_lite2``: the pipeline with Lite2@260 alone (the cascade's last stage, at its batch size), W
  worker threads;
- ``pipeline_processes``: ``pipeline_cascade`` with W worker processes (``--direct_running_mode=
  multi_processing``), each loading the models;
- ``pipeline_1proc``: ``pipeline_cascade`` with one worker (``--runner=FnApiRunner``, torch on every core):
  what multiple workers gain;
- ``old_cascade`` and ``old_lite2``: ``pipeline_cascade`` and ``pipeline_lite2`` on the old path
  (``backend=torch decode.fast=false``: torch and Pillow, where the others run the default path: ONNX Runtime
  on the CPU, JPEGs decoded by libjpeg-turbo); ``--no_old`` leaves them out. ``cpu_speedup`` is
  ``old_cascade``'s time over ``pipeline_cascade``'s (the cascade's records/s on the default path over the
  old path's), ``lite2_speedup`` the same for Lite2 alone; the agreement lines say how many records got
  the same class at the same stage on both paths.

The plain loop and ``models_alone`` load the models as the pipeline does (``Classifier.load``: the same
backend), so ``beam_overhead_ratio`` compares Beam with a loop on the same path.

Times are wall-clock seconds of the whole process (imports, model loading, reading, writing Parquet
included: what a user waits for). It prints the medians, checks that the plain loop and the pipelines
predicted the same classes at the same stages, prints the peak RSS of the pipeline cascade on 1x, 4x and
16x ``--memory_base`` records, and as its last lines the ratios of the issue: ``beam_overhead_ratio``
(pipeline cascade / plain loop), ``cascade_vs_solitary_ratio`` (pipeline cascade / Lite2 alone) and
``gmacs_ratio`` (the cascade's average GMACs per record / Lite2's, from the same run's exit_stats), after
``staged_vs_fused_ratio``, ``processes_vs_threads_ratio`` and ``one_process_vs_workers_ratio``, and two
that say where ``cascade_vs_solitary_ratio`` comes from:

- ``per_record_ratio``: the cascade's cost per record beyond start-up over Lite2's, from runs of
  ``--startup_records`` (16) records of both in the same rotation: (time at ``--records`` - time at 16) /
  (``--records`` - 16). What a job of millions of records pays per record, start-up amortised;
- ``models_alone_ratio``: the forward passes alone (``models_alone``, a fresh process: each stage's model
  on random crops in batches of its size, W threads at once), weighted by how many records reached each
  stage in the cascade's run, over Lite2's on every record: the ratio if reading, decoding, Beam and
  start-up cost nothing. Where it is above ``gmacs_ratio``, the models themselves do not cost what their
  GMACs say on this machine.
``--device cuda`` runs the same comparison on a GPU machine (nvJPEG decode, bf16, batches of 256) and also
prints records/s end to end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenet-sample")
DEFAULT_PROFILE = "lite_cascade"
VARIANTS = ("pipeline_cascade", "pipeline_staged", "plain_loop", "pipeline_lite2", "pipeline_processes",
            "pipeline_1proc", "old_cascade", "old_lite2")
# the old path: forward passes in torch, JPEGs decoded by Pillow (the default: ONNX Runtime on the CPU, libjpeg-turbo)
OLD_PATH = ("backend=torch", "decode.fast=false")


def write_manifest(path: str, sample: str, records: int) -> None:
    """The sample's images repeated to ``records`` rows, each with its own id (ids must be unique)."""
    with open(os.path.join(sample, "labels.csv")) as fh:
        rows = list(csv.DictReader(fh))
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "uri", "label"])
        for i in range(records):
            row = rows[i % len(rows)]
            out.writerow([f"r{i:07d}", os.path.join(sample, row["path"]), row["class_index"]])


def device_overrides(device: str, stages: int) -> list[str]:
    """CPU: the profile as it is. GPU: bf16 autocast and batches of 256, the settings that fill an H100."""
    if device == "cpu":
        return ["device=cpu"]
    gpu = ("precision=bf16", "batch_size=256")
    return [f"device={device}"] + [f"stages.{i}.{setting}" for i in range(stages) for setting in gpu]


def stage_count(profile: str) -> int:
    from configs import schema

    return len(schema.load(profile).stages)


def solitary_profile(path: str, profile: str) -> None:
    """The cascade's last stage alone (Lite2@260 for the Lite cascades), with the same batch size."""
    from configs import schema

    last = schema.load(profile).stages[-1]
    with open(path, "w") as fh:
        fh.write(f"stages:\n  - {{model: {last.model}, resolution: {last.resolution}, "
                 f"batch_size: {last.batch_size}}}\n")


def command(variant: str, manifest: str, output: str, device: str, profile: str, lite2_yaml: str,
            workers: int) -> list[str]:
    if variant == "plain_loop":
        return [sys.executable, os.path.abspath(__file__), "--_plain", manifest, "--_output", output,
                "--device", device, "--config", profile, "--workers", str(workers)]
    config = lite2_yaml if variant in ("pipeline_lite2", "old_lite2") else profile
    overrides = device_overrides(device, stage_count(config))
    if variant.startswith("old_"):
        overrides += OLD_PATH
    if variant == "pipeline_staged":
        overrides.append("execution=staged")
    runner = ["--runner=FnApiRunner"]
    if variant != "pipeline_1proc" and workers > 1:
        mode = "multi_processing" if variant == "pipeline_processes" else "in_memory"
        runner += [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
    return [sys.executable, "-m", "pipelines.cascade", "--config", config, "--input", manifest, "--output", output,
            *runner, *overrides]


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a fresh process: (wall seconds, peak RSS in MB of it and the processes it waited for)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024


def plain_loop(manifest: str, output: str, device: str, profile: str, workers: int) -> None:
    """The cascade of ``profile`` as a plain loop, no Beam, in ``workers`` processes (this one starts them)."""
    if workers > 1:
        me = [sys.executable, os.path.abspath(__file__), "--_plain", manifest, "--_output", output, "--device",
              device, "--config", profile, "--workers", "1"]
        shards = [subprocess.Popen(me + ["--_shard", f"{i}/{workers}"], cwd=ROOT) for i in range(workers)]
        if any(proc.wait() for proc in shards):
            raise SystemExit("a plain loop shard failed")
        return
    plain_shard(manifest, output, device, profile, 0, 1)


def plain_shard(manifest: str, output: str, device: str, profile: str, shard: int, shards: int) -> None:
    """Records ``shard``, ``shard + shards``, ... of the manifest through the fused algorithm: stage 1 in full
    batches, each record decoded once for the largest stage's size, escalations waiting decoded in per-stage
    buffers until they fill a batch, flushed at the end."""
    import fsspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from configs import plan, schema
    from models import committee
    from models.preprocess import BadInput, crop, decode_images, decode_pool, decode_target

    cfg = schema.load(profile, device_overrides(device, stage_count(profile)))
    specs = schema.stage_specs(cfg)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // shards)
    torch.set_num_threads(threads)
    pool = decode_pool(threads) if threads > 1 else None  # the pipeline's decoding threads
    target = decode_target([spec.input for spec in specs]) if cfg.decode.draft else None
    # the models as the pipeline loads them, on the same backend (models.classifier.LoadedModel)
    models = [stage.classifier().load() for stage in plan.build_plan(cfg, torch_threads=threads).stages]
    with open(manifest) as fh:
        records = list(csv.DictReader(fh))[shard::shards]
    rows, dead = [], 0
    buffers: list[list] = [[] for _ in specs]

    def run(k: int, batch: list) -> None:
        nonlocal dead
        stage, spec, last = cfg.stages[k], specs[k], k == len(specs) - 1
        if k == 0:
            for record in batch:
                with fsspec.open(record["uri"], "rb") as data:
                    record["data"] = data.read()
            images = decode_images([r.pop("data") for r in batch], target=target, max_pixels=cfg.decode.max_pixels,
                                   pool=pool, fast=cfg.decode.fast)
            dead += sum(isinstance(im, BadInput) for im in images)
            batch = [(r, im) for r, im in zip(batch, images) if not isinstance(im, BadInput)]
        if not batch:
            return
        crops = list(pool.map(lambda item: crop(item[1], spec.input), batch) if pool else
                     (crop(im, spec.input) for _, im in batch))
        logits = models[k](crops)
        for (record, image), row in zip(batch, logits):
            scores = committee.member_scores(row, cfg.aggregation).astype(np.float64)
            record["sum"] = scores if "sum" not in record else record["sum"] + scores
            combined = committee.combine(record["sum"], k + 1, cfg.aggregation)
            conf = float(committee.confidence(combined, cfg.confidence))
            if last or committee.exits(conf, stage.threshold):
                rows.append({"id": record["id"], "pred_class": int(np.argmax(combined)), "exit_stage": k + 1,
                             "confidence": conf})
            else:
                buffers[k + 1].append((record, image))

    def drain(flush: bool) -> None:
        for k, stage in enumerate(cfg.stages):
            while len(buffers[k]) >= stage.batch_size or (flush and buffers[k]):
                batch = buffers[k][:stage.batch_size]
                del buffers[k][:stage.batch_size]
                run(k, batch)

    for record in records:
        buffers[0].append(record)
        drain(flush=False)
    drain(flush=True)
    folder = os.path.join(output, "predictions")
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"part-{shard}.parquet"))
    print(f"plain loop shard {shard}/{shards}: {len(rows)} predictions, {dead} undecodable")


def models_alone(device: str, profile: str, workers: int, rounds: int = 3, batches: int = 6) -> dict[str, float]:
    """Each stage's forward pass alone, ms per image: ``workers`` threads (one torch thread each, as in the
    pipelines) each run ``batches`` batches of the stage's size on random crops, ``rounds`` times in turn
    with the other stages (median); no reading, decoding, Beam or start-up. Run in a fresh process."""
    import threading

    import numpy as np
    import torch

    from configs import plan, schema

    cfg = schema.load(profile, device_overrides(device, stage_count(profile)))
    specs = schema.stage_specs(cfg)
    torch.set_num_threads(cfg.torch_threads or 1)
    models = [stage.classifier().load() for stage in plan.build_plan(cfg, torch_threads=1).stages]
    rng = np.random.default_rng(0)
    crops = [[rng.integers(0, 256, (spec.input.resolution,) * 2 + (3,), dtype=np.uint8)
              for _ in range(stage.batch_size)] for stage, spec in zip(cfg.stages, specs)]
    times: dict[str, list[float]] = {spec.key: [] for spec in specs}

    def work(k: int) -> None:
        for _ in range(batches):
            models[k](crops[k])

    for k in range(len(specs)):
        work(k)  # warm
    for _ in range(rounds):
        for k, spec in enumerate(specs):
            threads = [threading.Thread(target=work, args=(k,)) for _ in range(workers)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            per_image = (time.perf_counter() - started) / (workers * batches * cfg.stages[k].batch_size)
            times[spec.key].append(per_image * 1e3 * workers)  # core-ms (per worker) per image
    return {key: statistics.median(v) for key, v in times.items()}


def table(output: str) -> dict:
    import pyarrow.parquet as pq

    return {r["id"]: (r["pred_class"], r["exit_stage"])
            for r in pq.read_table(os.path.join(output, "predictions"), columns=["id", "pred_class", "exit_stage"])
            .to_pylist()}


def agreement(outputs: dict[str, str]) -> list[str]:
    """How many records got the same class at the same stage from the pipeline cascade and the others."""
    ref = table(outputs["pipeline_cascade"])
    exits = [sum(v[1] == s for v in ref.values()) for s in range(1, max(v[1] for v in ref.values()) + 1)]
    lines = [f"pipeline_cascade: {len(ref)} rows; exits per stage {'/'.join(map(str, exits))}"]
    for variant, output in outputs.items():
        if variant in ("pipeline_cascade", "pipeline_lite2", "old_lite2"):
            continue
        other = table(output)
        same = sum(ref.get(k) == v for k, v in other.items())
        lines.append(f"{variant} agrees with pipeline_cascade on class and exit stage for {same} of {len(other)} "
                     f"records")
    return lines


def gmacs(output: str) -> tuple[str, float]:
    """The stages' GMACs, and the run's average GMACs per prediction / its last model's."""
    import pyarrow.parquet as pq

    with open(os.path.join(output, "manifest.json")) as fh:
        stats = json.load(fh)["stages"]
    run = pq.read_table(os.path.join(output, "exit_stats")).to_pylist()[0]
    return (", ".join(f"{s['model']} {s['gmacs']:.3f}" for s in stats),
            run["avg_gmacs"] / run["last_model_gmacs"])


def models_line(output: str, args: argparse.Namespace) -> float:
    """The cascade's models alone against Lite2's (``models_alone`` in a fresh process), weighted by how
    many records reached each stage in ``output``: the ratio with nothing but the forward passes."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_models", "--device", args.device,
                           "--config", args.config, "--workers", str(args.workers)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    per_image = json.loads(proc.stdout.strip().splitlines()[-1])
    stages = list(table(output).values())
    reached = [sum(stage >= k for _, stage in stages) for k in range(1, len(per_image) + 1)]
    last = list(per_image.values())[-1]
    print("models alone, ms per image per worker (forward passes of the stage's batch size on random crops, "
          f"{args.workers} workers at once): " + ", ".join(f"{k} {v:.1f}" for k, v in per_image.items())
          + f"; records reaching each stage {'/'.join(map(str, reached))}")
    return sum(n * t for n, t in zip(reached, per_image.values())) / (len(stages) * last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="records per timed run (the sample repeated)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the pipelines")
    parser.add_argument("--memory_base", type=int, default=62, help="records of the 1x memory run; 0 skips it")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--config", default=DEFAULT_PROFILE, help="the cascade: a profile name or YAML file")
    parser.add_argument("--sample", default=SAMPLE, help="folder with labels.csv and images/")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which of them to run (pipeline_cascade "
                        "always runs; the ratios need plain_loop and pipeline_lite2)")
    parser.add_argument("--startup_records", type=int, default=16, help="records of the start-up runs of the "
                        "cascade and Lite2 alone (each repeat), for their cost per record beyond start-up; 0 skips")
    parser.add_argument("--no_old", action="store_true", help="skip the old path's runs (old_cascade, old_lite2: "
                        f"{' '.join(OLD_PATH)}), and with them cpu_speedup")
    parser.add_argument("--_models", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_plain", help=argparse.SUPPRESS)
    parser.add_argument("--_output", help=argparse.SUPPRESS)
    parser.add_argument("--_shard", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._shard:
        shard, shards = map(int, args._shard.split("/"))
        return plain_shard(args._plain, args._output, args.device, args.config, shard, shards)
    if args._plain:
        return plain_loop(args._plain, args._output, args.device, args.config, args.workers)
    if args._models:
        return print(json.dumps(models_alone(args.device, args.config, args.workers)))

    variants = ["pipeline_cascade"] + [v for v in args.variants.split(",") if v in VARIANTS and v != "pipeline_cascade"]
    if args.no_old:
        variants = [v for v in variants if not v.startswith("old_")]
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, device {args.device}; "
          f"{args.records} records from {args.sample}; {args.workers} worker processes; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest, lite2_yaml = os.path.join(tmp, "manifest.csv"), os.path.join(tmp, "lite2.yaml")
        write_manifest(manifest, args.sample, args.records)
        solitary_profile(lite2_yaml, args.config)
        small = os.path.join(tmp, "startup.csv")
        write_manifest(small, args.sample, args.startup_records)
        startup = (["pipeline_cascade", "pipeline_lite2"]  # only compared with each other: both or neither
                   if args.startup_records and "pipeline_lite2" in variants else [])
        runs = [(v, manifest, args.records) for v in variants] + [(v, small, args.startup_records) for v in startup]
        times = {(v, n): [] for v, _, n in runs}
        for repeat in range(args.repeats):
            shift = repeat % len(runs)
            for variant, source, n in runs[shift:] + runs[:shift]:
                out = os.path.join(tmp, f"{variant}-{n}-{repeat}")
                seconds, _ = timed(command(variant, source, out, args.device, args.config, lite2_yaml, args.workers))
                times[variant, n].append(seconds)
                print(f"repeat {repeat + 1}: {variant:17s} {n:6d} records {seconds:8.1f} s  {n / seconds:7.1f} "
                      "records/s", flush=True)
        outputs = {v: os.path.join(tmp, f"{v}-{args.records}-0") for v in variants}
        print("\n".join(agreement(outputs)))
        stage_gmacs, gmacs_ratio = gmacs(outputs["pipeline_cascade"])
        print(f"GMACs per record (multiply-adds x1e9) by stage: {stage_gmacs}")
        all_medians = {key: statistics.median(t) for key, t in times.items()}
        for (variant, n), median in all_medians.items():
            print(f"median {variant:17s} {n:6d} records {median:8.1f} s  {n / median:7.1f} records/s "
                  f"(runs: {', '.join(f'{t:.1f}' for t in times[variant, n])})")
        medians = {v: all_medians[v, args.records] for v in variants}
        alone = models_line(outputs["pipeline_cascade"], args) if "pipeline_lite2" in variants else None
        if args.memory_base:
            peaks = {}
            for factor in (1, 4, 16):
                n = args.memory_base * factor
                write_manifest(manifest, args.sample, n)
                _, peaks[factor] = timed(command("pipeline_cascade", manifest, os.path.join(tmp, f"mem{factor}"),
                                                 args.device, args.config, lite2_yaml, args.workers))
                print(f"peak RSS pipeline cascade (largest process), {factor:2d}x = {n:5d} records: "
                      f"{peaks[factor]:7.0f} MB ({peaks[factor] / peaks[1] - 1:+.1%} vs 1x)", flush=True)
    cascade = medians["pipeline_cascade"]
    if "pipeline_staged" in medians:
        print(f"staged_vs_fused_ratio={medians['pipeline_staged'] / cascade:.3f}")
    if "pipeline_processes" in medians:
        print(f"processes_vs_threads_ratio={medians['pipeline_processes'] / cascade:.3f}")
    if "pipeline_1proc" in medians:
        print(f"one_process_vs_workers_ratio={medians['pipeline_1proc'] / cascade:.3f}")
    if "old_cascade" in medians:
        print(f"cpu_speedup={medians['old_cascade'] / cascade:.3f}")
    if "old_lite2" in medians and "pipeline_lite2" in medians:
        print(f"lite2_speedup={medians['old_lite2'] / medians['pipeline_lite2']:.3f}")
        print(f"old_path_cascade_vs_solitary_ratio={medians['old_cascade'] / medians['old_lite2']:.3f}")
    if "plain_loop" in medians:
        print(f"beam_overhead_ratio={cascade / medians['plain_loop']:.3f}")
    if "pipeline_lite2" in medians:
        if startup:
            beyond = {v: (medians[v] - all_medians[v, args.startup_records]) / (args.records - args.startup_records)
                      for v in startup}
            first = {v: all_medians[v, args.startup_records] for v in startup}
            print(f"start-up ({args.startup_records} records): cascade {first[startup[0]]:.1f} s, Lite2 alone "
                  f"{first[startup[1]]:.1f} s; beyond it, per record: "
                  f"cascade {beyond[startup[0]] * 1e3:.1f} ms, Lite2 alone {beyond[startup[1]] * 1e3:.1f} ms")
            print(f"per_record_ratio={beyond[startup[0]] / beyond[startup[1]]:.3f}")
        print(f"models_alone_ratio={alone:.3f}")
        print(f"cascade_vs_solitary_ratio={cascade / medians['pipeline_lite2']:.3f}")
    print(f"gmacs_ratio={gmacs_ratio:.3f}")


if __name__ == "__main__":
    main()
