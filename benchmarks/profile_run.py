"""Where the time of a pipeline run goes, per stage: decode + crop, model, and the rest (Beam, I/O, start-up).

    python benchmarks/profile_run.py [--records 496] [--config lite_cascade] [--top 12]

Runs ``pipelines.cascade`` in this process on FnApiRunner under cProfile, over the shared ImageNet sample
repeated to ``--records`` records. The calls to ``load_image`` (decode and crop, staged mode) or to
``decode_images`` (a batch decoded once, fused mode: key 0) and ``crop`` (summed over the decoding threads,
so more than the wall time they take when they run in parallel) and to ``inference.forward``
(the model) are timed, keyed by the stage's resolution, which tells the stages of the Lite cascade apart;
then the functions with the most own time are listed. To profile an older commit, run
this file with that commit's checkout first on PYTHONPATH (it uses only interfaces older commits have).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import tempfile
import time

from throughput import SAMPLE, write_manifest  # this file's folder is first on sys.path


def timed(fn, key, totals):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = totals[key(*args, **kwargs)]
            entry[0] += time.perf_counter() - started
            entry[1] += 1

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=496)
    parser.add_argument("--config", default="lite_cascade")
    parser.add_argument("--top", type=int, default=12, help="functions listed by own time")
    args = parser.parse_args()

    from models import classifier, inference, preprocess
    from pipelines import cascade
    from transforms import stage

    decode, model = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
    for module in (preprocess, stage):  # older commits decoded in transforms.stage, with its own reference
        if hasattr(module, "load_image"):
            module.load_image = timed(module.load_image, lambda data, cfg, **_: cfg.resolution, decode)
    if hasattr(classifier, "decode_images"):  # the fused mode: decoded once (key 0), then cropped per stage
        classifier.decode_images = timed(classifier.decode_images, lambda datas, **_: 0, decode)
        classifier.crop = timed(classifier.crop, lambda pixels, cfg: cfg.resolution, decode)
    inference.forward = timed(inference.forward, lambda module, spec, *a, **k: spec.input.resolution, model)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "manifest.csv")
        write_manifest(manifest, SAMPLE, args.records)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        cascade.run(["--config", args.config, "--input", manifest, "--output", os.path.join(tmp, "out"),
                     "--runner=FnApiRunner", "device=cpu"])
        profiler.disable()
        wall = time.perf_counter() - started
    print(f"\nwall {wall:.1f} s for {args.records} records ({args.config}, FnApiRunner, in-process, cProfile on)")
    spent = 0.0
    for resolution in sorted(set(decode) | set(model)):
        (d, n), (m, b) = decode[resolution], model[resolution]
        spent += d + m
        what = "decode once (batches)" if resolution == 0 else f"stage @{resolution}: decode+crop"
        print(f"  {what} {d:6.1f} s ({n} calls, {1e3 * d / max(n, 1):.1f} ms each), model {m:6.1f} s ({b} batches)")
    print(f"  rest (start-up, model loading, Beam, reading, Parquet): {wall - spent:.1f} s")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
