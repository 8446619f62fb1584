"""Labelled pan-and-zoom videos over every other image of an ImageNet-style labelled folder, for calibrating
video thresholds (docs/CALIBRATION.md, "Video thresholds"):

    python scripts/make_sample_videos.py ../shared/data/imagenet-sample ../data/videos

Writes one 3-second mp4 (10 fps, 320x240) per colour image of at least 128 pixels and OUT/labels.csv
(uri relative to OUT, label). Deterministic: same input, same output.
"""

from __future__ import annotations

import csv
import os
import sys

from models.video import pan_zoom_videos


def main(sample: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(sample, "labels.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))[::2]
    with open(os.path.join(out, "labels.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        for row in rows:
            for path in pan_zoom_videos([os.path.join(sample, row["path"])], out):
                writer.writerow([os.path.basename(path), row["class_index"]])


if __name__ == "__main__":
    main(*sys.argv[1:3])
