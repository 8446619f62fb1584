"""The cost model of docs/SCALING.md, checked against a finished run on this machine, then applied to N records.

    python -m benchmarks.scaling --run out/cascade --images 64      # check against a run's tables
    python -m benchmarks.scaling --records 100000000                # only the Dataflow table
    python -m benchmarks.scaling --measure_figures --images 64       # this machine's rates, for --plan

Check: from the run's exit_stats (how many records reached each stage) and the decode and model rates
measured here for each stage, predict the run's wall time (one process: decode and model take turns)
and print it next to the measured one. Table: workers and GPU-hours for N records from the design's
H100 figures, for the cascade of the run (or the calibration example) and for the solitary last model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from configs import estimate

# Design figures, the "gpu" machine of benchmarks/throughput_figures.json (docs/SCALING.md): one H100, bare
# PyTorch, batch 256, bf16 + channels_last; PIL decode and resize per CPU core; nvJPEG decode on the GPU.
_H100 = estimate.load_figures()["gpu"]
H100_MODEL_RATE = {key.split("@")[0]: rate for key, rate in _H100.model_images_per_s.items()}
CPU_DECODE_RATE = _H100.decode_images_per_s_per_core
GPU_DECODE_RATE = _H100.gpu_decode_images_per_s
EXAMPLE_REACH = (1.0, 0.32, 0.059)  # lite0 -> lite1 -> lite2 exits 68 % / 26.1 % / 5.9 % of records


@dataclass(frozen=True)
class Worker:
    vcpus: int
    gpu_decode: bool = False


def per_record_seconds(reach: Sequence[float], model_rates: Sequence[float]) -> tuple[float, float]:
    """(GPU model seconds, decodes) per input record: stage k runs on the fraction reach[k] that gets there,
    and re-decodes the carried bytes at its own resolution."""
    return sum(r / m for r, m in zip(reach, model_rates)), sum(reach)


def worker_rate(reach: Sequence[float], model_rates: Sequence[float], worker: Worker,
                decode_once: bool = False) -> tuple[float, str]:
    """Records per second of one worker (one GPU) and what bounds it; ``decode_once``: what the cascade
    would do if it decoded each record once (at the largest stage's size) instead of once per stage."""
    gpu_s, decodes = per_record_seconds(reach, model_rates)
    decodes = 1.0 if decode_once else decodes
    if worker.gpu_decode:
        return 1.0 / (gpu_s + decodes / GPU_DECODE_RATE), "GPU (decode + models)"
    cpu = worker.vcpus * CPU_DECODE_RATE / decodes
    return (cpu, "CPU decode") if cpu < 1.0 / gpu_s else (1.0 / gpu_s, "GPU models")


def plan(records: float, hours: float, reach, model_rates, worker: Worker, decode_once: bool = False) -> dict:
    rate, bound = worker_rate(reach, model_rates, worker, decode_once)
    worker_hours = records / rate / 3600
    return {"rate": rate, "bound": bound, "gpu_hours": worker_hours, "workers": math.ceil(worker_hours / hours)}


def measure_stage(model: str, resolution: int, batch_size: int, images: list[bytes],
                  threads: int) -> tuple[float, float]:
    """(decodes per second, model images per second) of one stage, in this process."""
    import numpy as np
    import torch

    from models import registry
    from models.classifier import Classifier
    from models.preprocess import load_image

    spec = registry.get(model, resolution)
    started = time.perf_counter()
    crops = [load_image(b, spec.input) for b in images]
    decode_rate = len(images) / (time.perf_counter() - started)
    torch.set_num_threads(threads)
    loaded = Classifier(spec, device="cpu", threads=threads).load()  # the default backend (ONNX Runtime on the CPU)
    batches = [np.stack(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
    loaded(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        loaded(batch)
    return decode_rate, sum(len(b) for b in batches) / (time.perf_counter() - started)


def check_run(output: str, n_images: int, threads: int) -> list[float]:
    """Predict a finished in-process run's wall time from rates measured here; print both."""
    import fsspec
    from omegaconf import OmegaConf

    from pipelines.folder import RunFolder
    from transforms.manifests import list_source

    stats = sorted((r for r in RunFolder(output).read("exit_stats").to_pylist() if r["stage"] >= 1),
                   key=lambda r: r["stage"])
    manifest = RunFolder(output).record()
    config = OmegaConf.create(manifest["config"])
    total = stats[0]["records_in"]
    reach = [s["records_in"] / total for s in stats]
    records = [r for r in list_source(config.input) if hasattr(r, "label")][:n_images]
    images = [fsspec.open(r.uri, "rb").open().read() for r in records]
    print(f"run {output}: {total} records; reach per stage {[round(r, 3) for r in reach]}")
    seconds = 0.0
    for stage, r in zip(config.stages, reach):
        decode, model = measure_stage(stage.model, stage.resolution, stage.batch_size, images, threads)
        seconds += total * r * (1 / decode + 1 / model)
        print(f"  {stage.model}@{stage.resolution}: decode {decode:.1f} img/s, model {model:.1f} img/s "
              f"(batch {stage.batch_size}, {threads} threads, {len(images)} images)")
    print(f"predicted wall time {seconds:.0f} s (+ start-up) vs measured {manifest['wall_seconds']:.0f} s")
    return reach


def measure_figures(config: str, n_images: int, threads: int, sample: str, path: str) -> dict:
    """Measure the decode and model rates of each stage of ``config`` here, and write them as the ``cpu``
    machine of the figures file that ``pipelines.cascade --plan`` prices runs with."""
    import datetime
    import glob
    import os
    import platform

    import torch

    from configs import schema

    cfg = schema.load(config)
    files = sorted(glob.glob(os.path.join(sample, "**", "*.JPEG"), recursive=True))[:n_images]
    images = [open(f, "rb").read() for f in files]
    rates, decode = {}, []
    for stage, spec in zip(cfg.stages, schema.stage_specs(cfg)):
        d, m = measure_stage(stage.model, spec.input.resolution, stage.batch_size, images, threads)
        rates[spec.key] = round(m, 1)
        decode.append(d)
    with open(path) as fh:
        figures = json.load(fh)
    figures["machines"]["cpu"] = {
        "kind": "cpu",
        "machine": f"{' '.join(filter(None, (f'{os.cpu_count()}-core', platform.machine(), platform.processor())))}, "
                   f"torch {torch.__version__}, one process, {threads} threads, fp32, the config's batch sizes, the "
                   "default path (models in ONNX Runtime where they run there, JPEGs decoded by libjpeg-turbo)",
        "date": datetime.date.today().isoformat(),
        "cores": threads,
        "model_images_per_s": rates,
        "decode_images_per_s_per_core": round(sum(decode) / len(decode), 1),
        "overhead_s_per_record": figures["machines"].get("cpu", {}).get("overhead_s_per_record", 0.0),
        "sources": {"model_images_per_s": f"python -m benchmarks.scaling --measure_figures --config {config} "
                                          f"--images {len(images)} --threads {threads}",
                    "decode_images_per_s_per_core": "the same run (one thread)",
                    "overhead_s_per_record": "kept from the earlier figures (benchmarks/README.md)"},
    }
    with open(path, "w") as fh:
        json.dump(figures, fh, indent=2)
        fh.write("\n")
    print(f"wrote the cpu figures into {path}: {rates}")
    return figures


def print_table(records: float, hours: float, reach: Sequence[float]) -> None:
    models = ("lite0", "lite1", "lite2")[: len(reach)]
    cascade_rates = [H100_MODEL_RATE[m] for m in models]
    print(f"\n{records:,.0f} records in {hours:g} h, H100 design figures; cascade reach {[round(r, 3) for r in reach]}")
    print("| worker | pipeline | records/s per worker | bound | GPU-hours | workers |")
    print("|---|---|---:|---|---:|---:|")
    for worker in (Worker(16), Worker(26), Worker(16, gpu_decode=True)):
        label = f"1 GPU + {worker.vcpus} vCPU" + (", nvJPEG" if worker.gpu_decode else ", PIL decode")
        for name, r, rates, once in (("cascade", reach, cascade_rates, False),
                                     ("cascade, decoded once", reach, cascade_rates, True),
                                     (f"{models[-1]} alone", [1.0], [cascade_rates[-1]], False)):
            p = plan(records, hours, r, rates, worker, once)
            print(f"| {label} | {name} | {p['rate']:,.0f} | {p['bound']} | {p['gpu_hours']:.1f} | {p['workers']} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="output folder of a finished in-process run to check the model against")
    parser.add_argument("--images", type=int, default=64, help="images to measure the per-stage rates on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the run's)")
    parser.add_argument("--records", type=float, default=1e8)
    parser.add_argument("--hours", type=float, default=8.0, help="wall-clock budget for the table's worker counts")
    parser.add_argument("--measure_figures", action="store_true",
                        help="measure each stage's rates here and write them into --figures (for cascade --plan)")
    parser.add_argument("--config", default="lite_cascade", help="with --measure_figures: the stages to measure")
    parser.add_argument("--sample", default="../shared/data/imagenet-sample", help="folder of JPEGs to measure on")
    parser.add_argument("--figures", default=None, help="figures file (default: benchmarks/throughput_figures.json)")
    args = parser.parse_args(argv)
    if args.measure_figures:
        from configs import estimate

        measure_figures(args.config, args.images, args.threads, args.sample, args.figures or estimate.FIGURES)
        return
    reach = check_run(args.run, args.images, args.threads) if args.run else None
    print_table(args.records, args.hours, tuple(reach) if reach else EXAMPLE_REACH)


if __name__ == "__main__":
    main()
