"""Shared fixtures: the shared ImageNet sample (skipped with a reason where absent) and manifests of it."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"


def sample_rows() -> list[dict]:
    with open(SAMPLE / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "labels.csv").exists():
        pytest.skip(f"the shared ImageNet sample is absent ({SAMPLE}); it lies beside the checkout in CI")
    return SAMPLE


def write_manifest(path: Path, rows: list[dict]) -> str:
    """A manifest CSV with columns uri,label (absolute uris)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        for row in rows:
            writer.writerow([row["uri"], "" if row.get("label") is None else row["label"]])
    return str(path)


@pytest.fixture(scope="session")
def sample_subset(sample_dir) -> list[dict]:
    """Every 16th image of the sample (31 images): uri and label."""
    rows = sample_rows()[::16]
    return [{"uri": os.path.join(sample_dir, r["path"]), "label": int(r["class_index"])} for r in rows]


def scripted(module, path: Path) -> str:
    """``module`` saved as a TorchScript file at ``path`` (a registered ``arch: torchscript`` model's weights)."""
    import torch

    torch.jit.script(module.eval()).save(str(path))
    return str(path)


def torchscript_config(name: str, weights: str, stages: str, num_classes: int = 10, resolution: int = 32) -> str:
    """A cascade YAML whose ``models`` block registers one TorchScript file as ``name``; ``stages`` is the YAML
    list of its stages (``"  - {model: NAME, batch_size: 8}\n"``)."""
    return (f"models:\n  {name}: {{arch: torchscript, weights: '{weights}', num_classes: {num_classes}, "
            f"resolution: {resolution}}}\nstages:\n{stages}")
