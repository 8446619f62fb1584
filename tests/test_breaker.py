"""The circuit breaker (issue 22, item 7): a stage whose records (nearly) all fail with one category stops the
job with one line naming the cause, and nothing is committed; single bad records still go to the dead letters."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scripted, torchscript_config, write_manifest

from models.failures import (
    SYSTEMIC_CAUSES,
    BreakerConfig,
    Category,
    CircuitBreaker,
    SystemicFailure,
    judge,
    systemic_cause,
)
from pipelines import cascade

# --- the rule, Beam-free --------------------------------------------------------------------------------------


def feed(breaker: CircuitBreaker, outcomes) -> None:
    for outcome in outcomes:
        breaker.observe(outcome, "why")


def test_a_window_of_one_category_trips_it_and_says_the_cause():
    breaker = CircuitBreaker("stage 1 (lite0@224)", BreakerConfig(window=10, share=1.0))
    feed(breaker, [Category.MODEL_ERROR] * 9)  # the window is not full yet
    with pytest.raises(SystemicFailure) as err:
        breaker.observe(Category.MODEL_ERROR, "model lite0@224 failed: RuntimeError: out of memory")
    assert str(err.value).startswith("systemic failure: stage 1 (lite0@224): 10 of the last 10 records failed "
                                     "with model_error (the model cannot run: out of memory")
    assert "last reason: model lite0@224 failed: RuntimeError: out of memory" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("outcomes", [
    [None] + [Category.NOT_FOUND] * 98 + [None] * 1,  # 98 of 100: below 0.99
    [Category.NOT_FOUND, Category.PERMISSION_DENIED] * 50,  # every record failed, but no one category has 99 %
    ([Category.DECODE_ERROR] * 98 + [None, None]) * 20,  # a long run, 98 % bad, never 99 in any window of 100
], ids=["98-percent", "two-categories", "long-run-98-percent"])
def test_single_bad_records_never_trip_it(outcomes):
    feed(CircuitBreaker("reading", BreakerConfig(window=100, share=0.99)), outcomes)


def test_it_trips_at_the_first_window_that_holds_the_share_of_one_category():
    breaker = CircuitBreaker("reading", BreakerConfig(window=100, share=0.99))
    feed(breaker, [None] * 500 + [Category.TIMEOUT] * 98)  # the failures begin mid-run
    with pytest.raises(SystemicFailure, match=r"99 of the last 100 records failed with timeout"):
        feed(breaker, [Category.TIMEOUT])


def test_window_0_turns_it_off():
    feed(CircuitBreaker("reading", BreakerConfig(window=0)), [Category.NOT_FOUND] * 10_000)
    assert judge("reading", 5, {"not_found": 5}, "", BreakerConfig(window=0)) is None


def test_the_rule_over_a_finished_stage():
    config = BreakerConfig(window=200, share=0.99)
    assert judge("reading the inputs", 3, {"not_found": 3}, "file not found", config).startswith(
        "systemic failure: reading the inputs: 3 of all 3 records failed with not_found (no input is found")
    assert judge("reading the inputs", 3, {"not_found": 2}, "", config) is None  # one record passed
    assert judge("stage 2 (lite2@260)", 1000, {"model_error": 990, "decode_error": 5}, "", config)
    assert judge("stage 2 (lite2@260)", 1000, {"model_error": 989}, "", config) is None


def test_its_line_is_found_in_a_runners_wrapped_error():
    inner = SystemicFailure("systemic failure: stage 1 (x@32): 4 of the last 4 records failed with model_error (...)")
    wrapped = RuntimeError(f"Traceback (most recent call last):\n  File ...\n{type(inner).__name__}: {inner} "
                           "[while running 'Cascade/Stages']\n")
    assert systemic_cause(wrapped) == str(inner)
    try:
        try:
            raise inner
        except SystemicFailure as e:
            raise RuntimeError("bundle failed") from e
    except RuntimeError as outer:
        assert systemic_cause(outer) == str(inner)
    assert systemic_cause(RuntimeError("disk full")) is None


def test_every_category_has_a_cause():
    assert set(Category) <= set(SYSTEMIC_CAUSES)


# --- real runs: the job stops, exits non-zero with the line, and commits nothing -------------------------------

class FailsOnPhotos(torch.nn.Module):
    """A tiny 10-class model that runs on the blank image of the check before work, then raises on every real
    photo, as a model that cannot run on the job's inputs does (out of memory, a wrong device)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.std() > 0.01):
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def failing_config(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("breaker")
    weights = scripted(FailsOnPhotos(), tmp / "fails.pt")
    path = tmp / "config.yaml"
    path.write_text(torchscript_config("fails", weights, "  - {model: fails, batch_size: 4}\n"))
    return str(path)


def unlabelled(rows: list[dict]) -> list[dict]:
    """ImageNet's labels are no classes of the 10-class test model."""
    return [{"uri": r["uri"]} for r in rows]


def run(config: str, manifest: str, out: Path, *overrides: str) -> dict:
    return cascade.run(["--config", config, "--input", manifest, "--output", str(out), "--runner=FnApiRunner",
                        "device=cpu", *overrides])


def assert_nothing_committed(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert glob.glob(str(out / "runs" / "*.json")) == []


@pytest.mark.parametrize("execution", ["fused", "staged"])
def test_a_model_failing_on_every_record_stops_the_job_inside_the_stage(tmp_path, sample_subset, failing_config,
                                                                       execution):
    manifest = write_manifest(tmp_path / "m.csv", unlabelled(sample_subset[:12]))
    with pytest.raises(SystemExit) as stop:
        run(failing_config, manifest, tmp_path / "out", f"execution={execution}", "circuit_breaker.window=4")
    assert str(stop.value.code).startswith("systemic failure: stage 1 (fails@32): 4 of the last 4 records failed "
                                           "with model_error (the model cannot run: out of memory")
    assert "last reason: model fails@32 failed: RuntimeError: DefaultCPUAllocator: not enough memory" in str(
        stop.value.code)
    assert_nothing_committed(tmp_path / "out")


def test_a_job_shorter_than_the_window_whose_every_record_fails_is_a_failed_job(tmp_path, sample_subset,
                                                                               failing_config):
    manifest = write_manifest(tmp_path / "m.csv", unlabelled(sample_subset[:5]))
    with pytest.raises(SystemExit) as stop:
        run(failing_config, manifest, tmp_path / "out")
    assert str(stop.value.code).startswith("systemic failure: stage 1 (fails@32): 5 of all 5 records failed with "
                                           "model_error")
    assert_nothing_committed(tmp_path / "out")


def test_storage_refusing_every_read_stops_the_job(tmp_path, failing_config):
    missing = [{"uri": str(tmp_path / "gone" / f"{i}.jpg")} for i in range(6)]
    with pytest.raises(SystemExit) as stop:
        run(failing_config, write_manifest(tmp_path / "m.csv", missing), tmp_path / "out")
    assert str(stop.value.code).startswith("systemic failure: reading the inputs: 6 of all 6 records failed with "
                                           "not_found (no input is found")
    assert_nothing_committed(tmp_path / "out")


def test_the_command_exits_non_zero_with_the_cause_as_its_last_line(tmp_path, sample_subset, failing_config):
    manifest = write_manifest(tmp_path / "m.csv", unlabelled(sample_subset[:8]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cascade", "--config", failing_config, "--input", manifest,
                           "--output", str(out), "--runner=FnApiRunner", "device=cpu", "circuit_breaker.window=4"],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("systemic failure: stage 1 (fails@32): 4 of the last 4 records failed with model_error")
    assert_nothing_committed(out)
