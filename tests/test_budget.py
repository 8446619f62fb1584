"""A compute budget at run time: a stage given the share of records to escalate (``stages.N.escalate``)
routes by the run's quantile of its confidences, so the cost is fixed whatever the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from configs import schema
from pipelines import cascade
from pipelines.folder import RunFolder
from tests.conftest import scripted, torchscript_config, write_manifest
from transforms.stage import budget_threshold


class Tiny(torch.nn.Module):
    """10 classes from the channel means of the input: different images, different confidences."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)) * 6.0)


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """2,000 small distinct images and a two-stage config of a tiny TorchScript model at two resolutions."""
    folder = tmp_path_factory.mktemp("budget")
    weights = scripted(Tiny(), folder / "tiny.pt")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2000):
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"uri": str(folder / f"{i}.png")})
    stages = "  - {model: tiny, batch_size: 64, escalate: 0.15}\n  - {model: tiny, resolution: 48, batch_size: 64}\n"
    # a budget needs every confidence of the run first: the execution mode, left unset, is staged
    (folder / "config.yaml").write_text(torchscript_config("tiny", weights, stages))
    return folder, write_manifest(folder / "m.csv", rows)


def test_a_budget_stage_escalates_its_share_within_one_point(tiny_inputs, tmp_path):
    folder, manifest = tiny_inputs
    result = cascade.run(["--config", str(folder / "config.yaml"), "--input", manifest,
                          "--output", str(tmp_path / "out"), "--runner=FnApiRunner"])
    assert result["invariant_holds"] and result["counts"]["predictions"] == 2000
    stats = {s["stage"]: s for s in RunFolder(str(tmp_path / "out")).read("exit_stats").to_pylist()}  # 0: reading
    escalated = stats[2]["records_in"] / stats[1]["records_in"]
    assert abs(escalated - 0.15) <= 0.01, escalated
    used = stats[1]["threshold"]
    assert 0 < used < 1  # the threshold computed over the run, recorded
    predictions = RunFolder(str(tmp_path / "out")).read("predictions").to_pylist()
    stage1 = [p for p in predictions if p["exit_stage"] == 1]
    assert min(p["confidence"] for p in stage1) >= used


def test_budget_threshold_takes_the_quantile_of_the_share_to_escalate():
    quantiles = list(np.linspace(0.2, 0.9, 1001))
    assert budget_threshold(quantiles, 0.15) == pytest.approx(0.2 + 0.7 * 0.15)
    assert budget_threshold(quantiles, 0.0) == 0.2  # everything exits
    assert budget_threshold(quantiles, 1.0) == 1.0  # nothing exits
    assert budget_threshold([], 0.3) == 1.0  # no record reached the stage


@pytest.mark.parametrize("overrides, message", [
    (["stages.0.escalate=1.5"], r"stages\.0\.escalate: must be in \[0, 1\]"),
    (["stages.2.escalate=0.1"], r"stages\.2\.escalate: the last stage escalates nothing"),
    (["stages.0.escalate=0.1", "execution=fused"], r"^execution: fused routes each batch .* execution: staged"),
])
def test_budget_settings_are_checked_up_front(overrides, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.load("lite_cascade", overrides)


def test_a_budget_replaces_a_calibrated_threshold_with_a_warning(caplog):
    cfg = schema.load("lite_cascade", ["stages.0.escalate=0.15"])  # stage 1 has a calibrated threshold
    assert cfg.stages[0].escalate == 0.15 and schema.execution_of(cfg) is schema.Execution.STAGED
    assert "stages.0.threshold=0.486" in caplog.text and "is replaced by stages.0.escalate=0.15" in caplog.text
