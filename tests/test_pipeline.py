"""The cascade pipeline end to end on the real runner, real weights and the shared ImageNet sample."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from benchmarks.compare_runs import compare_table
from models import committee, inference, registry
from models.preprocess import decode_target, load_image
from pipelines import cascade
from pipelines.folder import RunFolder
from tests.conftest import write_manifest

KEYS = ["lite0@224", "lite1@240", "lite2@260"]


def run_cascade(out, source, *overrides):
    return cascade.run(["--config", "lite_cascade", "--input", source, "--output", str(out),
                        "--runner=FnApiRunner", *overrides])


def rows_by_uri(out, table="predictions"):
    return {r["uri"]: r for r in RunFolder(str(out)).read(table).to_pylist()}


def stage_rows(out):
    """exit_stats without its stage-0 (reading) row, by stage."""
    return sorted((r for r in RunFolder(str(out)).read("exit_stats").to_pylist() if r["stage"] >= 1),
                  key=lambda r: r["stage"])


@pytest.fixture(scope="module")
def subset_logits(sample_subset):
    """Per-model logits of the subset computed by a plain loop, outside Beam: the committee's input. Each
    image is decoded for the largest stage's size, as the pipeline decodes it once for all stages."""
    stack = []
    target = decode_target([registry.parse_key(key).input for key in KEYS])
    for key in KEYS:
        spec = registry.parse_key(key)
        model = inference.load(spec, "cpu")
        images = [load_image(open(r["uri"], "rb").read(), spec.input, target=target) for r in sample_subset]
        stack.append(np.concatenate([inference.forward(model, spec, images[i:i + 16])
                                     for i in range(0, len(images), 16)]))
    return np.stack(stack)


def gmacs_of_keys():
    return [registry.gmacs(registry.parse_key(k)) for k in KEYS]


@pytest.mark.parametrize("thresholds,aggregation", [((0.55, 0.75), "logits"), ((1.0, 1.0), "logits"),
                                                    ((0.55, 0.75), "last")],
                         ids=["calibrated-like", "ensemble", "last"])
def test_pipeline_decisions_equal_committee_maths(tmp_path, sample_subset, subset_logits, thresholds, aggregation):
    manifest = write_manifest(tmp_path / "m.csv", sample_subset)
    run_cascade(tmp_path / "out", manifest, f"stages.0.threshold={thresholds[0]}",
                f"stages.1.threshold={thresholds[1]}", "stages.0.batch_size=8", "stages.1.batch_size=8",
                f"aggregation={aggregation}")
    got = rows_by_uri(tmp_path / "out")
    ref = committee.cascade(subset_logits, thresholds, gmacs_of_keys(), aggregation=aggregation)
    assert len(got) == len(sample_subset)
    for i, row in enumerate(sample_subset):
        pred = got[row["uri"]]
        assert pred["exit_stage"] == ref.exit_stage[i], row["uri"]
        assert pred["pred_class"] == ref.pred[i], row["uri"]
        assert pred["confidence"] == pytest.approx(ref.confidence[i], abs=1e-4)
        assert pred["gmacs"] == pytest.approx(ref.gmacs[i])
        assert pred["label"] == row["label"]
        assert [a["stage"] for a in pred["stages"]] == list(range(1, pred["exit_stage"] + 1))
        for k, answer in enumerate(pred["stages"]):  # what routing saw at each stage: the committee of k+1 models
            committee_k = committee.cascade(subset_logits[: k + 1, i:i + 1], [1.0] * k, aggregation=aggregation)
            assert (answer["model"], answer["pred_class"]) == (KEYS[k], committee_k.pred[0])
        assert pred["top5"][0]["class"] == pred["pred_class"] and pred["top5"][0]["name"] == pred["pred_name"]
        assert pred["pred_name"] == registry.get("lite0").class_name(pred["pred_class"])
    if thresholds == (1.0, 1.0):  # all thresholds 1: every record reaches stage 3, the three-model ensemble
        assert {r["exit_stage"] for r in got.values()} == {3}
        ensemble = committee.ensemble(subset_logits).argmax(-1)
        assert [got[r["uri"]]["pred_class"] for r in sample_subset] == list(ensemble)
    stats = stage_rows(tmp_path / "out")
    assert [s["records_exited"] for s in stats] == [int((ref.exit_stage == k).sum()) for k in (1, 2, 3)]
    assert stats[0]["avg_gmacs"] == pytest.approx(ref.gmacs.mean())
    assert stats[0]["worst_case_gmacs"] == pytest.approx(sum(gmacs_of_keys()))
    labels = np.array([r["label"] for r in sample_subset])
    assert stats[0]["accuracy"] == pytest.approx((ref.pred == labels).mean())


def test_thresholds_zero_on_whole_sample_is_lite0_alone(tmp_path, sample_dir):
    """All 496 images; every record exits at stage 1, so accuracy is Lite0@224's (about 88-89 %)."""
    out = tmp_path / "out"
    manifest = run_cascade(out, str(sample_dir / "labels.csv"), "stages.0.threshold=0", "stages.1.threshold=0",
                           "stages.0.batch_size=64")
    stats = stage_rows(out)
    assert stats[0]["records_in"] == 496 and stats[0]["records_exited"] == 496 and stats[0]["exit_ratio"] == 1.0
    assert stats[1]["records_in"] == 0 and stats[2]["records_in"] == 0
    assert stats[0]["dead_letters"] == 0
    assert 0.87 <= stats[0]["accuracy"] <= 0.90
    assert stats[0]["avg_gmacs"] == pytest.approx(registry.gmacs(registry.get("lite0")))
    assert manifest["counts"]["inputs_listed"] == 496 and manifest["invariant_holds"]


def test_bad_inputs_become_dead_letters_and_good_ones_are_unchanged(tmp_path, sample_subset):
    good = sample_subset[:4]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    rows = good + [{"uri": str(tmp_path / "missing.jpg"), "label": 1},
                   {"uri": str(tmp_path / "empty.jpg"), "label": 2},
                   {"uri": str(tmp_path / "text.jpg"), "label": 3}]
    run_cascade(tmp_path / "clean", write_manifest(tmp_path / "good.csv", good), "stages.0.threshold=0")
    mixed = run_cascade(tmp_path / "mixed", write_manifest(tmp_path / "mixed.csv", rows), "stages.0.threshold=0")
    dead = rows_by_uri(tmp_path / "mixed", "dead_letter")
    assert dead[str(tmp_path / "missing.jpg")]["error"] == "file not found"
    assert dead[str(tmp_path / "missing.jpg")]["stage"] == 0
    assert "empty file" in dead[str(tmp_path / "empty.jpg")]["error"]
    assert "not an image" in dead[str(tmp_path / "text.jpg")]["error"]
    assert dead[str(tmp_path / "text.jpg")]["stage"] == 1
    preds_clean, preds_mixed = rows_by_uri(tmp_path / "clean"), rows_by_uri(tmp_path / "mixed")
    assert preds_mixed.keys() == preds_clean.keys() == {r["uri"] for r in good}
    for uri, row in preds_clean.items():
        assert preds_mixed[uri]["pred_class"] == row["pred_class"]
        assert preds_mixed[uri]["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
    assert mixed["counts"] == {"inputs_listed": 7, "predictions": 4, "dead_letters": 3,
                               "exit_stats_predictions": 4, "exit_stats_dead_letters": 3}


def test_embedded_demo_runs_with_no_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    manifest = cascade.run(["--runner=FnApiRunner"])
    printed = capsys.readouterr().out
    assert "embedded demo set" in printed and "count invariant holds" in printed
    assert "GMACs (multiply-adds x1e9)" in printed
    counts = manifest["counts"]
    assert counts["inputs_listed"] >= 20 and counts["predictions"] >= 20
    assert counts["predictions"] + counts["dead_letters"] == counts["inputs_listed"]
    with open(tmp_path / "out" / "cascade" / "manifest.json") as fh:
        written = json.load(fh)
    assert written["versions"]["apache-beam"] and "stages:" in written["config"]
    assert [s["model"] for s in written["stages"]] == KEYS


def test_existing_output_is_refused_without_overwrite(tmp_path, sample_subset):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "something.txt").write_text("an earlier file")
    manifest = write_manifest(tmp_path / "m.csv", sample_subset[:2])
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        run_cascade(out, manifest)
    run_cascade(out, manifest, "--overwrite", "stages.0.threshold=0")
    assert len(rows_by_uri(out)) == 2


def test_a_timm_architecture_with_local_weights_runs_end_to_end(tmp_path, sample_subset):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=1000).state_dict(), tmp_path / "w.pt")
    (tmp_path / "timm.yaml").write_text(
        f"models:\n  r10t: {{arch: 'timm:resnet10t', weights: '{tmp_path}/w.pt'}}\n"
        "stages:\n  - {model: lite0, resolution: 128, batch_size: 4, threshold: 0.5}\n"
        "  - {model: r10t, resolution: 96, batch_size: 4}\n")
    manifest = write_manifest(tmp_path / "m.csv", sample_subset[:8])
    result = cascade.run(["--config", str(tmp_path / "timm.yaml"), "--input", manifest, "--output",
                          str(tmp_path / "out"), "--runner=FnApiRunner"])
    assert result["invariant_holds"] and result["counts"]["predictions"] == 8
    assert [s["model"] for s in result["stages"]] == ["lite0@128", "r10t@96"]
    stats = stage_rows(tmp_path / "out")
    assert stats[1]["records_in"] == 8 - stats[0]["records_exited"]


def test_fused_and_staged_execution_write_identical_rows(tmp_path, sample_subset):
    """Same records, same decisions, same tables: the fused step (decode once, per-stage buffers flushed at
    the end of the bundle) against a step per stage (re-decode, re-batch through a shuffle). Batches of 4
    so that later stages run both full and flushed partial batches; one undecodable file and one missing."""
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    rows = sample_subset[:14] + [{"uri": str(tmp_path / "text.jpg"), "label": 3},
                                 {"uri": str(tmp_path / "missing.jpg"), "label": 4}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    settings = ["stages.0.threshold=0.9", "stages.1.threshold=0.95"] + [f"stages.{i}.batch_size={b}"
                                                                       for i, b in enumerate((4, 3, 2))]
    runs = {mode: run_cascade(tmp_path / mode, manifest, f"execution={mode}", *settings)
            for mode in ("fused", "staged")}
    assert all(run["invariant_holds"] for run in runs.values())
    stats = RunFolder(str(tmp_path / "fused")).read("exit_stats").to_pylist()
    assert stats[1]["records_in"] >= 3 and stats[2]["records_in"] >= 2  # escalations reached every stage
    for table in ("predictions", "exit_stats", "dead_letter"):
        assert compare_table(str(tmp_path / "fused"), str(tmp_path / "staged"), table) == [], table


def test_a_run_in_two_incremental_pieces_writes_the_rows_of_one_run(tmp_path, sample_subset):
    """--skip_done: a second run into the folder of a first skips the ids the first has (predictions and dead
    letters, through the grouping by id) and adds the others; the union equals one run over everything, no id
    twice, and each run's invariant counts its skipped inputs. --retry_dead_letters tries a dead letter again."""
    rows = sample_subset[:10]
    missing = {"uri": str(tmp_path / "later.jpg"), "label": 1}  # absent in the first piece, present later
    first = write_manifest(tmp_path / "first.csv", rows[:6] + [missing])
    write_manifest(tmp_path / "all-1.csv", rows[:5])
    write_manifest(tmp_path / "all-2.csv", rows[5:] + [missing])
    everything = str(tmp_path / "all-*.csv")  # a glob of manifests, read in parts
    fast = ["stages.0.threshold=0"]
    run_cascade(tmp_path / "one", everything, *fast)  # the reference: one run (the missing file stays missing)
    run_cascade(tmp_path / "pieces", first, *fast)
    second = run_cascade(tmp_path / "pieces", everything, "--skip_done", *fast)
    assert second["counts"]["inputs_skipped"] == 7 and second["counts"]["predictions"] == 4
    assert second["counts"]["inputs_listed"] == 11 and second["invariant_holds"]
    for table in ("predictions", "dead_letter"):
        pieces = RunFolder(str(tmp_path / "pieces")).read(table).to_pylist()
        assert len({r["id"] for r in pieces}) == len(pieces)  # no id twice across the runs
        assert compare_table(str(tmp_path / "one"), str(tmp_path / "pieces"), table) == [], table
    (tmp_path / "later.jpg").write_bytes(open(rows[0]["uri"], "rb").read())
    third = run_cascade(tmp_path / "pieces", everything, "--skip_done", "--retry_dead_letters", *fast)
    assert third["counts"]["inputs_skipped"] == 10 and third["counts"]["predictions"] == 1


def test_a_shadow_sample_keeps_the_cascades_decisions_and_records_every_stage(tmp_path, sample_subset):
    """aggregation last with shadow 0.5, fused and staged: the shadow rows (those the id hash picks) went through
    every stage and say so in ``stages``, the other rows list exactly the stages they went through, and every row
    keeps the decision of the same run without a shadow; exit_stats tallies the shadow apart from avg_gmacs."""
    from transforms.records import in_shadow

    manifest = write_manifest(tmp_path / "m.csv", sample_subset[:14])
    settings = ["aggregation=last", "stages.0.threshold=0.6", "stages.1.threshold=0.8"] + [
        f"stages.{i}.batch_size={b}" for i, b in enumerate((4, 3, 2))]
    run_cascade(tmp_path / "plain", manifest, *settings)
    for mode in ("fused", "staged"):
        assert run_cascade(tmp_path / mode, manifest, f"execution={mode}", "shadow=0.5", *settings)["invariant_holds"]
    for table in ("predictions", "exit_stats"):
        assert compare_table(str(tmp_path / "fused"), str(tmp_path / "staged"), table) == [], table
    plain, shadowed = rows_by_uri(tmp_path / "plain"), rows_by_uri(tmp_path / "fused")
    assert plain.keys() == shadowed.keys()
    for uri, row in shadowed.items():
        alone = plain[uri]
        decision = ("exit_stage", "pred_class", "confidence", "gmacs", "top5")
        assert {k: row[k] for k in decision} == {k: alone[k] for k in decision}, uri
        assert row["shadow"] == in_shadow(row["id"], 0.5) and not alone["shadow"]
        assert [s["stage"] for s in alone["stages"]] == list(range(1, alone["exit_stage"] + 1))
        assert row["stages"] == (alone["stages"] if not row["shadow"] else row["stages"])
        if row["shadow"]:
            assert [s["model"] for s in row["stages"]] == KEYS
            assert row["stages"][:row["exit_stage"]] == alone["stages"]
        here = row["stages"][row["exit_stage"] - 1]
        assert here["pred_class"] == row["pred_class"]
        assert here["confidence"] == pytest.approx(row["confidence"], rel=1e-6)  # stored in float32
    shadow_rows = [r for r in shadowed.values() if r["shadow"]]
    early = [r for r in shadow_rows if r["exit_stage"] < 3]
    assert shadow_rows and early  # the sample holds shadow records the cascade exits early
    stats, alone_stats = stage_rows(tmp_path / "fused"), stage_rows(tmp_path / "plain")
    gm = np.cumsum(gmacs_of_keys())
    assert stats[0]["avg_gmacs"] == alone_stats[0]["avg_gmacs"]
    assert stats[0]["shadow_records"] == len(shadow_rows) and alone_stats[0]["shadow_records"] == 0
    assert stats[0]["avg_shadow_gmacs"] == pytest.approx(
        sum(gm[2] - gm[r["exit_stage"] - 1] for r in shadow_rows) / len(shadowed))
    for s in stats:
        mine = [r for r in shadow_rows if r["exit_stage"] == s["stage"]]
        agreed = sum(r["pred_class"] == r["stages"][-1]["pred_class"] for r in mine)
        assert (s["shadow_exited"], s["shadow_agreed"]) == (len(mine), agreed)
        if mine:
            assert s["shadow_agreement"] == agreed / len(mine)
            assert s["shadow_agreement_low"] <= s["shadow_agreement"] <= s["shadow_agreement_high"]


def test_a_budget_stage_with_aggregation_last_and_a_shadow_keeps_its_decisions(tmp_path, sample_subset):
    """escalate (staged): the shadow's passengers are no part of a later stage's budget, so the budget's
    thresholds and every row's decision equal those of the run without a shadow."""
    manifest = write_manifest(tmp_path / "m.csv", sample_subset[:12])
    settings = ["aggregation=last", "stages.0.escalate=0.5", "stages.1.escalate=0.5", "stages.0.batch_size=4",
                "stages.1.batch_size=4", "stages.2.batch_size=4"]
    run_cascade(tmp_path / "plain", manifest, *settings)
    assert run_cascade(tmp_path / "shadow", manifest, "shadow=0.5", *settings)["invariant_holds"]
    plain, shadowed = rows_by_uri(tmp_path / "plain"), rows_by_uri(tmp_path / "shadow")
    for uri, row in shadowed.items():
        assert (row["exit_stage"], row["pred_class"], row["gmacs"]) == (
            plain[uri]["exit_stage"], plain[uri]["pred_class"], plain[uri]["gmacs"]), uri
    assert [s["threshold"] for s in stage_rows(tmp_path / "shadow")] == [
        s["threshold"] for s in stage_rows(tmp_path / "plain")]


def test_limit_classifies_the_first_n_listed_inputs_and_says_so(tmp_path, sample_dir, capsys):
    record = cascade.run(["--runner=FnApiRunner", "--input", str(sample_dir / "labels.csv"), "--output",
                          str(tmp_path / "out"), "--limit", "5", "stages=[{model: lite0, batch_size: 4}]"])
    assert record["counts"]["limit"] == 5 and record["counts"]["inputs_listed"] == 5
    assert record["counts"]["predictions"] + record["counts"]["dead_letters"] == 5 and record["invariant_holds"]
    assert "limit: 5" in record["config"]
    first = [line.split(",")[0] for line in (sample_dir / "labels.csv").read_text().splitlines()[1:6]]
    uris = sorted(RunFolder(str(tmp_path / "out")).read("predictions").column("uri").to_pylist())
    assert uris == sorted(str(sample_dir / f) for f in first)
    assert "limited (--limit 5): only the first 5 inputs in listing order were taken" in capsys.readouterr().out


def test_the_first_run_costs_less_than_the_last_model_and_measures_its_agreement_with_it(tmp_path, capsys):
    """run_local.sh's first run (the demo profile on the embedded pictures): a cost below Lite2 alone, and its
    agreement with Lite2 alone measured in that very run (every picture also went through Lite2)."""
    record = cascade.run(["--runner=FnApiRunner", "--config", "demo", "--output", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "profile demo: a compute budget" in out
    cost = re.search(r"per record: average ([\d.]+), worst case [\d.]+; last model alone ([\d.]+) \((\d+)% of it\)",
                     out)
    assert cost and float(cost[1]) < float(cost[2]) and int(cost[3]) < 100, out
    agree = re.search(r"agreement with lite2@260 alone, measured in this run on its shadow sample \((\d+) records "
                      r"that also went through every stage\): (\d+) of (\d+) answers equal", out)
    assert agree and int(agree[1]) == record["counts"]["predictions"] == int(agree[3]), out
    rows = RunFolder(str(tmp_path / "demo")).read("predictions").to_pylist()
    same = sum(r["pred_class"] == r["stages"][-1]["pred_class"] for r in rows)  # Lite2's own answer, every row
    assert all(r["shadow"] and len(r["stages"]) == 2 for r in rows) and same == int(agree[2])
