"""The default CPU path's decisions against the old path's, record for record.

    python -m benchmarks.path_decisions --labels LABELS_CSV [--configs lite_cascade,imagenet_sample_calibrated]

Runs the pipeline on the records of ``LABELS_CSV`` (the shared sample's labels.csv, or the labels.csv that
../shared/data/make_variants.py writes) twice per profile: on the default path (``backend`` auto: ONNX
Runtime on the CPU; ``decode.fast``: libjpeg-turbo) and on the old one (``backend=torch decode.fast=false``:
torch and Pillow), and prints, per profile, how many records got another class or exit stage, the accuracy
and exit ratios of both runs, and the profile's held-out promise (``calibration.heldout_accuracy - margin``)
where it has one.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_PATH = ["backend=torch", "decode.fast=false"]


def manifest(labels: str, path: str) -> int:
    """A manifest (id, uri, label) of ``labels`` (columns path or uri, and class_index or label)."""
    base = os.path.dirname(os.path.abspath(labels))
    with open(labels, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "uri", "label"])
        for i, row in enumerate(rows):
            uri = row.get("uri") or os.path.join(base, row["path"])
            out.writerow([f"r{i:06d}", uri, row.get("label", row.get("class_index"))])
    return len(rows)


def run(config: str, source: str, output: str, overrides: list[str]) -> dict:
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "pipelines.cascade", "--config", config, "--input", source, "--output", output,
           "--runner=FnApiRunner", "--direct_running_mode=in_memory", f"--direct_num_workers={os.cpu_count() or 1}",
           "device=cpu", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    table = pq.read_table(os.path.join(output, "predictions"), columns=["id", "pred_class", "exit_stage", "label"])
    return {r["id"]: r for r in table.to_pylist()}


def summary(rows: dict, stages: int) -> str:
    labelled = [r for r in rows.values() if r["label"] is not None]
    accuracy = sum(r["pred_class"] == r["label"] for r in labelled) / max(1, len(labelled))
    exits = [sum(r["exit_stage"] == s for r in rows.values()) / max(1, len(rows)) for s in range(1, stages + 1)]
    return f"accuracy {accuracy:.4f}, exit ratios {'/'.join(f'{e:.3f}' for e in exits)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="labels.csv of the sample or of its variants")
    parser.add_argument("--configs", default="lite_cascade,imagenet_sample_calibrated")
    args = parser.parse_args()
    from configs import schema

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "manifest.csv")
        n = manifest(args.labels, source)
        print(f"{n} records from {args.labels}")
        for config in args.configs.split(","):
            cfg = schema.load(config)
            new = run(config, source, os.path.join(tmp, f"{config}-default"), [])
            old = run(config, source, os.path.join(tmp, f"{config}-old"), OLD_PATH)
            differ = [k for k in old if (new[k]["pred_class"], new[k]["exit_stage"]) !=
                      (old[k]["pred_class"], old[k]["exit_stage"])]
            print(f"{config}: {len(differ)} of {len(old)} records differ in class or exit stage "
                  f"(default path vs old path){': ' + ', '.join(differ[:10]) if differ else ''}")
            print(f"  default path: {summary(new, len(cfg.stages))}")
            print(f"  old path:     {summary(old, len(cfg.stages))}")
            cal = cfg.calibration
            if cal is not None and cal.heldout_accuracy is not None:
                print(f"  held-out promise: accuracy >= {cal.heldout_accuracy - (cal.margin or 0):.4f} "
                      f"({cal.heldout_accuracy:.4f} - margin {cal.margin or 0:.4f}); exit ratios "
                      f"{'/'.join(f'{e:.3f}' for e in cal.expected_exit_ratios or [])}")


if __name__ == "__main__":
    main()
