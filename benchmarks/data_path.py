"""The framework alone at scale: list, dedupe, read, route and write 10^4, 10^5 and 10^6 records through
``pipelines.cascade`` with a trivial model, and how time and memory grow with the number of rows.

    python benchmarks/data_path.py [--rows 10000,100000,1000000] [--images 2000] [--workers 1]
                                   [--files 8] [--execution fused]

A trivial registered TorchScript model (a per-channel mean and a 3 x 10 matrix: a few multiply-adds per
image) runs as a two-stage self-cascade (tiny@16 -> tiny@24, threshold 0.5, which the tiny model never
reaches: every record escalates, so both stages and the buffer between them work on every record; one
torch thread: the model is a few multiply-adds, and idle threads spinning on busy cores cost milliseconds),
over a manifest of N rows (``--files`` Parquet files, read as one glob) pointing at ``--images`` small
JPEGs (48 x 40 pixels), each row with its own id. Each N runs in a fresh process on FnApiRunner (in
that process, or with ``--workers`` worker processes); its wall time and its peak RSS are measured: the
larger of the whole process tree's, sampled every 0.1 s, and the kernel's high-water mark of the main
process (exact, short peaks included; the whole job with the default ``--workers 1``). The last lines:

- ``framework_us_per_record``: the marginal wall time per record between the two largest runs, in
  microseconds (start-up excluded), on this machine with its ``--workers`` processes;
- ``time_ratio_1e6_vs_1e5``: wall time at the largest N / at the one before (linear: 10; goal <= 12);
- ``rss_ratio_1e6_vs_1e4``: peak RSS at the largest N / at the smallest (flat: 1; goal <= 1.3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10


def tiny_model(path: str) -> None:
    """A TorchScript model of a few multiply-adds per image: the mean of each channel times a 3 x 10 matrix."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(-1, 1, 3 * CLASSES).reshape(3, CLASSES))

        def forward(self, x):
            return x.mean(dim=(2, 3)) @ self.weight

    torch.jit.save(torch.jit.script(Tiny().eval()), path)


def images(folder: str, count: int) -> list[str]:
    """``count`` small JPEGs of different colours; returns their names relative to ``folder``."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        name = f"img/{i:05d}.jpg"
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, name), quality=80)
        names.append(name)
    return names


def manifests(folder: str, names: list[str], rows: int, files: int) -> str:
    """``rows`` rows over ``files`` Parquet files (row groups of 50,000), ids unique; returns their glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    per_file = -(-rows // files)
    for f in range(files):
        start, stop = f * per_file, min(rows, (f + 1) * per_file)
        ids = [f"r{i:08d}" for i in range(start, stop)]
        uris = [f"../{names[i % len(names)]}" for i in range(start, stop)]
        labels = [i % CLASSES for i in range(start, stop)]
        table = pa.table({"id": ids, "uri": uris, "label": pa.array(labels, pa.int32())})
        pq.write_table(table, os.path.join(folder, f"part-{f:03d}.parquet"), row_group_size=50_000)
    return os.path.join(folder, "*.parquet") if files > 1 else os.path.join(folder, "part-000.parquet")


def config(path: str, weights: str, execution: str) -> None:
    with open(path, "w") as fh:
        fh.write(f"models:\n  tiny: {{arch: torchscript, weights: '{weights}', resolution: 16, num_classes: {CLASSES}, "
                 "mean: [127, 127, 127], std: [64, 64, 64]}\n"
                 "stages:\n  - {model: tiny, resolution: 16, batch_size: 64, threshold: 0.5}\n"
                 "  - {model: tiny, resolution: 24, batch_size: 64}\n"
                 f"execution: {execution}\ndevice: cpu\ntorch_threads: 1\n")


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS in MB, peak RSS of the process tree sampled every 0.1 s in MB, output tail) of
    ``cmd`` in a fresh process. The peak RSS is the larger of the sampled tree's and the kernel's exact
    high-water mark of the main process (``ru_maxrss``): sampling alone misses short peaks, such as the
    libraries' pages touched while the process exits (up to 100 MB here, caught or not by chance)."""
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    sampled = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sampled = max(sampled, tree_rss(proc.pid))
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    out = log.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return elapsed, max(sampled, usage.ru_maxrss * 1024) / 2**20, sampled / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000", help="manifest sizes, ascending")
    parser.add_argument("--images", type=int, default=2000, help="distinct image files the rows point at")
    parser.add_argument("--files", type=int, default=8, help="manifest files per run (one glob)")
    parser.add_argument("--workers", type=int, default=1, help="FnApiRunner worker processes (1: in-process)")
    parser.add_argument("--execution", default="fused", help="fused or staged")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; {args.workers} worker processes; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights, cfg = os.path.join(tmp, "tiny.pt"), os.path.join(tmp, "tiny.yaml")
        tiny_model(weights)
        config(cfg, weights, args.execution)
        names = images(tmp, args.images)
        for n in sizes:
            source = manifests(os.path.join(tmp, f"m{n}"), names, n, args.files)
            runner = ["--runner=FnApiRunner"]
            if args.workers > 1:
                runner += ["--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"]
            cmd = [sys.executable, "-m", "pipelines.cascade", "--config", cfg, "--input", source, "--output",
                   os.path.join(tmp, f"out{n}"), *runner]
            seconds, rss, sampled, out = measured(cmd)
            results[n] = (seconds, rss)
            holds = "count invariant holds" in out
            print(f"{n:>9,d} rows: {seconds:7.1f} s  {n / seconds:8.0f} records/s  peak RSS {rss:6.0f} MB "
                  f"(sampled {sampled:5.0f} MB)  (invariant {'holds' if holds else 'NOT CHECKED'})", flush=True)
    small, mid, large = sizes[0], sizes[-2], sizes[-1]
    marginal = (results[large][0] - results[mid][0]) / (large - mid)
    print(f"framework_us_per_record={marginal * 1e6:.0f}")
    print(f"time_ratio_1e6_vs_1e5={results[large][0] / results[mid][0]:.2f}")
    print(f"rss_ratio_1e6_vs_1e4={results[large][1] / results[small][1]:.2f}")


if __name__ == "__main__":
    main()
