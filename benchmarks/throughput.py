"""Throughput of the pipeline, side by side in one run: Beam cascade vs plain PyTorch loop vs Lite2 alone.

    python benchmarks/throughput.py [--records 2000] [--repeats 3] [--memory_base 62] [--device cpu]
                                    [--config lite_cascade]

Over the shared ImageNet sample repeated to ``--records`` records (distinct ids, same files), each of these
runs in a fresh process, ``--repeats`` times, in rotating order so that drifts of the machine's speed fall
on all three alike:

- ``pipeline_cascade``: ``python -m pipelines.cascade --config lite_cascade --runner=FnApiRunner``, the
  Lite0@224 -> Lite1@240 -> Lite2@260 cascade with the thresholds calibrated to match Lite2@260's accuracy
  on the clean sample at least cost (configs/lite_cascade.yaml, from pipelines.calibrate);
- ``plain_loop``: the same cascade with no Beam: the same reading, decode (a batch at a time, in the same
  threads), preprocessing, batch sizes, model code (``models.inference``) and committee maths, in a Python
  loop, writing the same predictions;
- ``pipeline_lite2``: the pipeline with Lite2@260 alone (the cascade's last stage, at its batch size).

Times are wall-clock seconds of the whole process (imports, model loading, reading, writing Parquet
included: what a user waits for). It prints the medians, checks that the plain loop and the pipeline
predicted the same classes at the same stages, prints the peak RSS of the pipeline cascade on 1x, 4x and
16x ``--memory_base`` records, and as its last two lines the ratios of the issue:
``beam_overhead_ratio`` (pipeline cascade / plain loop) and ``cascade_vs_solitary_ratio`` (pipeline
cascade / pipeline Lite2 alone). ``--device cuda`` runs the same comparison on a GPU machine (nvJPEG
decode, bf16) and also prints images/s end to end.
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
VARIANTS = ("pipeline_cascade", "plain_loop", "pipeline_lite2")


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


def command(variant: str, manifest: str, output: str, device: str, profile: str, lite2_yaml: str) -> list[str]:
    if variant == "plain_loop":
        return [sys.executable, os.path.abspath(__file__), "--_plain", manifest, "--_output", output,
                "--device", device, "--config", profile]
    config = profile if variant == "pipeline_cascade" else lite2_yaml
    overrides = device_overrides(device, stage_count(config))
    return [sys.executable, "-m", "pipelines.cascade", "--config", config, "--input", manifest, "--output", output,
            "--runner=FnApiRunner", *overrides]


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


def plain_loop(manifest: str, output: str, device: str, profile: str) -> None:
    """The cascade of ``profile`` as a plain PyTorch loop, no Beam: what the pipeline does."""
    import fsspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from configs import schema
    from models import committee, inference
    from models.preprocess import BadInput, decode_pool, load_images

    cfg = schema.load(profile, device_overrides(device, stage_count(profile)))
    specs = schema.stage_specs(cfg)
    dev = inference.resolve_device(cfg.device)
    threads = cfg.torch_threads or os.cpu_count() or 1
    pool = decode_pool(threads) if threads > 1 else None  # the pipeline's decoding threads
    with open(manifest) as fh:
        records = list(csv.DictReader(fh))
    for record in records:
        with fsspec.open(record["uri"], "rb") as data:
            record["data"] = data.read()
    rows, dead = [], 0
    for number, (stage, spec) in enumerate(zip(cfg.stages, specs), start=1):
        model = inference.load(spec, dev, channels_last=stage.channels_last, compile=stage.compile)
        last = number == len(specs)
        escalated = []
        for start in range(0, len(records), stage.batch_size):
            chunk = records[start:start + stage.batch_size]
            crops = load_images([r["data"] for r in chunk], spec.input, max_pixels=cfg.decode.max_pixels,
                                draft=cfg.decode.draft, pool=pool)
            batch = [(record, crop) for record, crop in zip(chunk, crops) if not isinstance(crop, BadInput)]
            dead += len(chunk) - len(batch)
            if not batch:
                continue
            logits = inference.forward(model, spec, [image for _, image in batch], channels_last=stage.channels_last,
                                       precision=stage.precision, device=dev)
            for (record, _), row in zip(batch, logits):
                scores = committee.member_scores(row, cfg.aggregation).astype(np.float64)
                record["sum"] = scores if "sum" not in record else record["sum"] + scores
                combined = committee.combine(record["sum"], number, cfg.aggregation)
                conf = float(committee.confidence(combined, cfg.confidence))
                if last or committee.exits(conf, stage.threshold):
                    rows.append({"id": record["id"], "pred_class": int(np.argmax(combined)), "exit_stage": number,
                                 "confidence": conf})
                else:
                    escalated.append(record)
        records = escalated
    os.makedirs(output, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(output, "predictions.parquet"))
    print(f"plain loop: {len(rows)} predictions, {dead} undecodable")


def agreement(pipeline_out: str, plain_out: str) -> str:
    """How many records got the same class at the same stage from the pipeline and from the plain loop."""
    import pyarrow.parquet as pq

    def table(path):
        return {r["id"]: (r["pred_class"], r["exit_stage"])
                for r in pq.read_table(path, columns=["id", "pred_class", "exit_stage"]).to_pylist()}

    beam_rows = table(os.path.join(pipeline_out, "predictions"))
    plain_rows = table(os.path.join(plain_out, "predictions.parquet"))
    same = sum(beam_rows.get(k) == v for k, v in plain_rows.items())
    exits = [sum(v[1] == s for v in beam_rows.values()) for s in range(1, max(v[1] for v in beam_rows.values()) + 1)]
    return (f"pipeline and plain loop agree on class and exit stage for {same} of {len(plain_rows)} records "
            f"(pipeline rows: {len(beam_rows)}; exits per stage {'/'.join(map(str, exits))})")


def gmacs(output: str) -> str:
    with open(os.path.join(output, "manifest.json")) as fh:
        stats = json.load(fh)["stages"]
    return ", ".join(f"{s['model']} {s['gmacs']:.3f}" for s in stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="records per timed run (the sample repeated)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument("--memory_base", type=int, default=62, help="records of the 1x memory run; 0 skips it")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--config", default=DEFAULT_PROFILE, help="the cascade: a profile name or YAML file")
    parser.add_argument("--sample", default=SAMPLE, help="folder with labels.csv and images/")
    parser.add_argument("--_plain", help=argparse.SUPPRESS)
    parser.add_argument("--_output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._plain:
        return plain_loop(args._plain, args._output, args.device, args.config)

    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, device {args.device}; "
          f"{args.records} records from {args.sample}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest, lite2_yaml = os.path.join(tmp, "manifest.csv"), os.path.join(tmp, "lite2.yaml")
        write_manifest(manifest, args.sample, args.records)
        solitary_profile(lite2_yaml, args.config)
        times = {v: [] for v in VARIANTS}
        for repeat in range(args.repeats):
            order = VARIANTS[repeat % 3:] + VARIANTS[:repeat % 3]
            for variant in order:
                out = os.path.join(tmp, f"{variant}-{repeat}")
                seconds, _ = timed(command(variant, manifest, out, args.device, args.config, lite2_yaml))
                times[variant].append(seconds)
                print(f"repeat {repeat + 1}: {variant:17s} {seconds:8.1f} s  {args.records / seconds:7.1f} records/s",
                      flush=True)
        print(agreement(os.path.join(tmp, "pipeline_cascade-0"), os.path.join(tmp, "plain_loop-0")))
        print(f"GMACs per record (multiply-adds x1e9) by stage: {gmacs(os.path.join(tmp, 'pipeline_cascade-0'))}")
        medians = {v: statistics.median(t) for v, t in times.items()}
        for variant, median in medians.items():
            print(f"median {variant:17s} {median:8.1f} s  {args.records / median:7.1f} records/s "
                  f"(runs: {', '.join(f'{t:.1f}' for t in times[variant])})")
        if args.memory_base:
            peaks = {}
            for factor in (1, 4, 16):
                n = args.memory_base * factor
                write_manifest(manifest, args.sample, n)
                _, peaks[factor] = timed(command("pipeline_cascade", manifest, os.path.join(tmp, f"mem{factor}"),
                                                 args.device, args.config, lite2_yaml))
                print(f"peak RSS pipeline cascade, {factor:2d}x = {n:5d} records: {peaks[factor]:7.0f} MB "
                      f"({peaks[factor] / peaks[1] - 1:+.1%} vs 1x)", flush=True)
    print(f"beam_overhead_ratio={medians['pipeline_cascade'] / medians['plain_loop']:.3f}")
    print(f"cascade_vs_solitary_ratio={medians['pipeline_cascade'] / medians['pipeline_lite2']:.3f}")


if __name__ == "__main__":
    main()
