"""The embedded demo: the photos that ship inside scikit-image (no download), listed as a manifest, or encoded
into short videos for the video profiles. A run without ``--input`` runs on them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from typing import Iterator

from configs import schema

DEMO_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tif")
PROFILE = "demo"  # the first run's profile (configs/demo.yaml)
WHY = ("profile demo: a compute budget, not calibrated thresholds (tuned on ImageNet photos, they would send most "
       "of these odd pictures to Lite2): stage 1 sends its least confident half on, and every picture also goes "
       "through Lite2 (shadow: 1), so that this run measures its agreement with Lite2 alone")


def photos() -> list[str]:
    """The photos that ship inside scikit-image (no download)."""
    import skimage

    data_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    return [os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir)) if f.lower().endswith(DEMO_SUFFIXES)]


def demo_manifest(folder: str) -> str:
    """Write a manifest of the demo photos and return its path."""
    path = os.path.join(folder, "demo_manifest.csv")
    with open(path, "w") as fh:
        fh.write("uri\n" + "".join(f"{p}\n" for p in photos()))
    return path


def demo_video_manifest(folder: str) -> str:
    """Encode a short pan-and-zoom video over each colour demo photo and write their manifest; returns its path."""
    from models.video import pan_zoom_videos

    path = os.path.join(folder, "demo_video_manifest.csv")
    with open(path, "w") as fh:
        fh.write("uri\n" + "".join(f"{uri}\n" for uri in pan_zoom_videos(photos(), folder)))
    return path


@contextlib.contextmanager
def inputs(cfg: schema.CascadeConfig, profile: str | None = None) -> Iterator[schema.CascadeConfig]:
    """The config as given, or, without ``--input``, with the demo's manifest as its input for the time of the
    run (the manifest and any demo videos live in a temporary folder); the demo profile says why it is the one."""
    if cfg.input:
        yield cfg
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest = demo_manifest(tmp) if cfg.video is None else demo_video_manifest(tmp)
        print(f"no --input given: running the embedded demo set ({manifest})")
        if profile == PROFILE:
            print(WHY)
        yield dataclasses.replace(cfg, input=manifest)
