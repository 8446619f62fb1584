"""The calibration flow: search vs brute force, pruning, replay through committee maths, the config and
report written by pipelines.calibrate, and one tiny real scoring run of pipelines.score."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import schema
from models import calibration as cal
from models import committee
from pipelines import calibrate, score
from pipelines.folder import RunFolder
from pipelines.pool import load_pool

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"
COARSE = tuple(range(0, 101, 10))
KEYS = ("lite0@224", "lite0@288", "lite1@240", "lite2@260")
GMACS = (0.385, 0.64, 0.60, 0.86)


def small_pool(n: int = 240, classes: int = 12, seed: int = 0, keys=("a", "b", "c"),
               gmacs=(0.4, 0.6, 0.9)) -> cal.Pool:
    pool = cal.synthetic_pool(n, classes, [1.2, 1.5, 1.9, 2.2][: len(keys)], gmacs, seed=seed)
    return cal.Pool(tuple(keys), pool.gmacs, pool.logits, pool.labels)


def same_figures(a: cal.Choice, b: cal.Choice) -> None:
    assert a.models == b.models
    assert a.accuracy == pytest.approx(b.accuracy, abs=1e-12)
    assert a.avg_gmacs == pytest.approx(b.avg_gmacs, abs=1e-9)
    assert a.exit_ratios == pytest.approx(b.exit_ratios, abs=1e-12)


OBJECTIVES = [
    cal.Objective(goal="max_accuracy", budget_gmacs=0.75),
    cal.Objective(goal="max_accuracy", budget_gmacs=0.9, max_past_first=0.4),
    cal.Objective(goal="min_cost", target_accuracy=0.5),
    cal.Objective(goal="min_cost", target_accuracy=0.45, margin_sigmas=1.0, max_worst_gmacs=1.6),
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.goal.value}")
@pytest.mark.parametrize("models", [("a", "c"), ("b", "a", "c"), ("c", "a")])
def test_search_equals_brute_force_over_all_candidate_thresholds(objective, models):
    pool = small_pool()
    found = cal.search(pool, objective, only=[models], percentiles=COARSE, max_models=3).best
    brute = cal.brute_force(pool, objective, models, percentiles=COARSE)
    assert (found is None) == (brute is None)
    if found is not None:
        assert found.accuracy == pytest.approx(brute.accuracy, abs=1e-12)
        assert found.avg_gmacs == pytest.approx(brute.avg_gmacs, abs=1e-9)


@pytest.mark.parametrize("kind", list(committee.Confidence))
@pytest.mark.parametrize("aggregation", list(committee.Aggregation))
def test_every_result_replays_exactly_with_committee_cascade(kind, aggregation):
    pool = small_pool(seed=3)
    result = cal.search(pool, cal.Objective(goal="max_accuracy", budget_gmacs=0.8), kind=kind,
                        aggregation=aggregation, percentiles=COARSE, max_models=3)
    assert result.per_sequence
    for keys, choice in result.per_sequence.items():
        same_figures(choice, cal.replay(pool, keys, choice.thresholds, kind, aggregation))


def test_torch_backend_finds_the_same_figures():
    pool = small_pool(seed=5)
    objective = cal.Objective(goal="max_accuracy", budget_gmacs=0.8)
    exact = cal.search(pool, objective, percentiles=COARSE, max_models=3).best
    fast = cal.search(pool, objective, percentiles=COARSE, max_models=3, backend="torch").best
    assert fast.accuracy == pytest.approx(exact.accuracy, abs=1.5 / pool.size)


def large_gap_pool(n: int = 400, classes: int = 10, seed: int = 0) -> cal.Pool:
    """A cheap model that is right only where its logit gap exceeds 24 (max_prob saturates in float32 from a
    gap of ~17), and an expensive model that is always right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    gap = rng.uniform(8.0, 34.0, n)
    cheap = rng.normal(0, 0.5, (n, classes)).astype(np.float32)
    cheap[np.arange(n), np.where(gap > 24.0, labels, (labels + 1) % classes)] += gap
    exact = rng.normal(0, 0.5, (n, classes)).astype(np.float32)
    exact[np.arange(n), labels] += 40.0
    return cal.Pool(("cheap", "exact"), np.array([0.1, 1.0]), np.stack([cheap, exact]), labels)


@pytest.mark.parametrize("kind", [committee.Confidence.MAX_PROB, committee.Confidence.LOGIT_GAP])
def test_both_backends_choose_the_same_where_float32_confidences_saturate(kind):
    pool = large_gap_pool()
    objective = cal.Objective(goal="min_cost", target_accuracy=0.95)
    exact = cal.search(pool, objective, kind=kind, max_models=2).best
    fast = cal.search(pool, objective, kind=kind, max_models=2, backend="torch").best
    assert exact.models == ("cheap", "exact") and exact.avg_gmacs < 0.8  # the cheap model answers a third
    assert fast.models == exact.models
    assert fast.thresholds == pytest.approx(exact.thresholds, abs=1e-12)
    assert (fast.accuracy, fast.avg_gmacs) == (exact.accuracy, exact.avg_gmacs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), budget=st.floats(0.4, 1.6), target=st.floats(0.2, 0.8),
       goal=st.sampled_from(list(cal.Goal)), margin=st.sampled_from([0.0, 1.0]))
def test_monotonicity_shortcuts_never_change_the_answer(seed, budget, target, goal, margin):
    pool = small_pool(n=150, seed=seed)
    objective = cal.Objective(goal=goal, budget_gmacs=budget, target_accuracy=target, margin_sigmas=margin)
    pruned = cal.search(pool, objective, percentiles=COARSE, max_models=3, prune=True)
    full = cal.search(pool, objective, percentiles=COARSE, max_models=3, prune=False)
    assert pruned.sequences <= full.sequences
    assert (pruned.best is None) == (full.best is None)
    if full.best is not None:
        assert pruned.best.accuracy == full.best.accuracy
        assert pruned.best.avg_gmacs == pytest.approx(full.best.avg_gmacs, abs=1e-12)


def test_sequences_repeat_only_independent_copies():
    single = small_pool(keys=("a", "b", "c"))
    seqs = list(cal.sequences(single, 4))
    assert len(seqs) == 3 + 6 + 6  # ordered choices without repeating an entry
    assert all(len(set(s)) == len(s) for s in seqs)
    copies = cal.synthetic_pool(50, 5, [1.0, 1.0], [1.0, 2.0], copies=2)  # m0#1, m0#2, m1#1, m1#2
    seqs = [tuple(copies.keys[i] for i in s) for s in cal.sequences(copies, 2)]
    assert ("m0#1", "m0#2") in seqs and ("m0#2", "m0#1") not in seqs and ("m0#1", "m1#1") in seqs
    assert len(seqs) == 2 + 4
    eight = cal.synthetic_pool(8, 3, [1.0] * 8, [1.0] * 8, copies=4)
    assert sum(1 for s in cal.sequences(eight, 4) if len(s) >= 2) == 4672  # the paper's count


def test_beam_strategy_finds_a_feasible_answer_no_better_than_exhaustive():
    pool = small_pool(n=300, seed=2, keys=("a", "b", "c", "d"), gmacs=(0.3, 0.5, 0.8, 1.1))
    objective = cal.Objective(goal="max_accuracy", budget_gmacs=0.8)
    full = cal.search(pool, objective, percentiles=COARSE, max_models=3)
    beam = cal.search(pool, objective, percentiles=COARSE, max_models=3, strategy="beam", beam_width=2)
    assert beam.sequences < full.sequences
    assert beam.best.avg_gmacs <= 0.8 + 1e-12
    assert beam.best.accuracy <= full.best.accuracy


def test_margin_keeps_a_new_set_within_budget_more_often():
    pool = small_pool(n=400, seed=7)
    loose = cal.search(pool, cal.Objective(goal="max_accuracy", budget_gmacs=0.7), percentiles=COARSE).best
    safe = cal.search(pool, cal.Objective(goal="max_accuracy", budget_gmacs=0.7, margin_sigmas=2.0),
                      percentiles=COARSE).best
    assert safe.avg_gmacs <= loose.avg_gmacs


def test_frontier_is_pareto_and_holds_the_solitary_extremes():
    pool = small_pool(seed=4)
    res = cal.search(pool, cal.Objective(goal="max_accuracy", budget_gmacs=10.0), percentiles=COARSE,
                     max_models=3, frontier=True, prune=False)
    front = res.frontier
    assert all(b.avg_gmacs >= a.avg_gmacs and b.accuracy > a.accuracy for a, b in itertools.pairwise(front))
    assert front[0].avg_gmacs == pytest.approx(min(pool.gmacs))


def write_scores(folder: Path, pool: cal.Pool, extra_ids: int = 0, variants: int = 1, labelled: bool = True) -> str:
    """A scores table of ``pool``; with ``variants`` > 1, consecutive records are variants of one source image
    (``/x/v{j}/img{i}.jpg``, the layout of make_variants.py)."""
    rows = []
    for m, key in enumerate(pool.keys):
        for i in range(pool.size):
            rows.append({"id": f"r{i}", "uri": f"/x/v{i % variants}/img{i // variants}.jpg",
                         "label": int(pool.labels[i]) if labelled else None, "model": key,
                         "gmacs": float(pool.gmacs[m]), "logits": pool.logits[m, i].tolist()})
    for i in range(extra_ids):  # scored by one entry only (a dead letter elsewhere): dropped
        rows.append({"id": f"lone{i}", "uri": f"/x/lone{i}.jpg", "label": 0, "model": pool.keys[0],
                     "gmacs": float(pool.gmacs[0]), "logits": pool.logits[0, 0].tolist()})
    os.makedirs(folder / "scores", exist_ok=True)
    run_id = "20261128T101500Z-5c0e5d"  # as pipelines.score leaves it: a file named by the run, then its commit
    pq.write_table(pa.Table.from_pylist(rows, schema=score.SCORES.schema),
                   folder / "scores" / f"{run_id}-00000-of-00001.parquet")
    RunFolder(str(folder)).commit({"run_id": run_id})
    return str(folder)


def split_rows(n: int, variants: int, heldout: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The selection and held-out rows pipelines.calibrate uses for ``write_scores(..., variants)`` records
    (the ids r0..r{n-1} sort as strings)."""
    ids = sorted(f"r{i}" for i in range(n))
    uris = [f"/x/v{int(i[1:]) % variants}/img{int(i[1:]) // variants}.jpg" for i in ids]
    sel, held = cal.split_by_group(calibrate.record_groups(ids, uris, None, "group"), heldout, seed)
    order = np.asarray([int(i[1:]) for i in ids])
    return order[sel], order[held]


def test_calibrate_chooses_on_one_side_of_a_group_split_and_writes_the_heldout_figures(tmp_path):
    pool = small_pool(n=400, classes=1000, seed=1, keys=KEYS, gmacs=GMACS)
    scores = write_scores(tmp_path / "scores", pool, extra_ids=2, variants=4)
    out = tmp_path / "calib"
    summary = calibrate.run(["--scores", scores, "--output", str(out), "--budget", "match:lite2@260",
                             "--max_models", "3", "--percentile_step", "10", "--folds", "3",
                             "--margin_sigmas", "0.5", "output=out/calibrated"])
    assert summary["records"] == 400 and summary["dropped_records"] == 2
    assert summary["selection_records"] + summary["heldout_records"] == 400
    assert summary["selection_groups"] + summary["heldout_groups"] == 100  # 4 variants of 100 images
    sel, held = split_rows(400, 4)
    assert not {i // 4 for i in sel} & {i // 4 for i in held}  # no image on both sides
    cfg = schema.load(str(out / "cascade.yaml"))  # what pipelines.cascade does with --config
    choice = summary["choice"]
    models = choice["models"].split(" -> ")
    assert [f"{s.model}@{s.resolution}" for s in cfg.stages] == models
    assert cfg.output == "out/calibrated"
    thresholds = [s.threshold for s in cfg.stages[:-1]]
    assert thresholds == choice["thresholds"]  # written exactly
    chosen_on = cal.replay(pool.subset(np.sort(sel)), models, thresholds, cfg.confidence, cfg.aggregation)
    assert chosen_on.accuracy == choice["accuracy"]
    # the promise is the held-out measurement, as data
    heldout = cal.measure(pool.subset(np.sort(held)), models, thresholds, cfg.confidence, cfg.aggregation)
    block = cfg.calibration
    assert block.heldout_accuracy == round(heldout.accuracy, 4) and block.heldout_gmacs == round(heldout.avg_gmacs, 4)
    assert block.heldout_records == len(held) and block.heldout_groups == summary["heldout_groups"]
    assert len(block.expected_exit_ratios) == len(cfg.stages)
    assert sum(block.expected_exit_ratios) == pytest.approx(1, abs=1e-12)
    assert len(block.expected_escalated) == len(cfg.stages) - 1
    assert block.margin > 0 and block.heldout_agreement is None
    frontier = pq.read_table(out / "frontier.parquet")
    assert frontier.schema.equals(calibrate.FRONTIER_SCHEMA)
    assert {"solitary", "ensemble"} <= set(frontier.column("kind").to_pylist())
    assert None not in frontier.column("heldout_accuracy").to_pylist()
    for name in ("frontier.md", "report.md", "calibration.json", "accuracy_vs_gmacs.png", "heldout_frontier.png",
                 "t1_sweep.png", "confidence_topk.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "calibration.json").read_text())["choice"] == choice


def test_stages_after_a_zero_threshold_are_dropped():
    pool = small_pool(seed=9)
    t = cal.trimmed(pool, cal.replay(pool, ["b", "a", "c"], [0.0, 0.5]))
    assert t == cal.replay(pool, ["b"], []) and t.exit_ratios == (1.0,)
    assert cal.trimmed(pool, cal.replay(pool, ["b", "a"], [0.3])).models == ("b", "a")


def test_split_and_folds_keep_every_group_on_one_side():
    groups = np.repeat(np.arange(50), 4)
    sel, held = cal.split_by_group(groups, 0.3, seed=3)
    assert len(held) == 15 * 4 and not set(groups[sel]) & set(groups[held])
    folds = cal.group_folds(groups, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(200))
    assert all(not set(groups[a]) & set(groups[b]) for a, b in itertools.combinations(folds, 2))


def test_clustered_standard_error_counts_groups_not_records():
    rng = np.random.default_rng(0)
    values = (rng.random(300) < 0.7).astype(float)
    usual = values.std(ddof=1) / np.sqrt(300)
    assert cal.clustered_se(values, np.arange(300)) == pytest.approx(usual, rel=1e-9)
    copies = np.repeat(values, 4)  # each record 4 times, in one group: no more information than 300 records
    assert cal.clustered_se(copies, np.repeat(np.arange(300), 4)) == pytest.approx(usual, rel=1e-9)
    assert cal.clustered_se(copies, np.arange(1200)) < usual / 1.9  # what a record-level split would claim


def test_an_ensemble_target_gives_the_cheapest_cascade_of_its_models_matching_it(tmp_path):
    pool = small_pool(n=600, classes=1000, seed=6, keys=KEYS, gmacs=GMACS)
    scores = write_scores(tmp_path / "scores", pool, variants=2)
    members = ("lite0@224", "lite1@240", "lite2@260")
    summary = calibrate.run(["--scores", scores, "--output", str(tmp_path / "c"), "--no_plots",
                             "--target", f"match:ensemble({','.join(members)})", "--percentile_step", "5",
                             "--folds", "0", "--margin_sigmas", "0", "--max_models", "3"])
    sel, _ = split_rows(600, 2)
    chosen = pool.subset(np.sort(sel))
    ensemble = cal.replay(chosen, members, [1.0, 1.0])
    models = summary["choice"]["models"].split(" -> ")
    assert set(models) <= set(members) and set(summary["pool"]) == set(members)  # lite0@288 is not a member
    assert summary["objective"]["target_accuracy"] == pytest.approx(ensemble.accuracy)
    assert summary["choice"]["accuracy"] >= ensemble.accuracy
    assert summary["choice"]["avg_gmacs"] < ensemble.avg_gmacs  # the paper's stars: same accuracy, less cost


def test_label_free_calibration_needs_no_label_and_chooses_as_with_labels(tmp_path):
    pool = small_pool(n=400, classes=1000, seed=8, keys=KEYS, gmacs=GMACS)
    args = ["--target", "agree:lite2@260:0.9", "--percentile_step", "10", "--folds", "2", "--max_models", "3",
            "--no_plots"]
    unlabelled = calibrate.run(["--scores", write_scores(tmp_path / "u", pool, variants=4, labelled=False),
                                "--output", str(tmp_path / "cu"), *args])
    labelled = calibrate.run(["--scores", write_scores(tmp_path / "l", pool, variants=4),
                              "--output", str(tmp_path / "cl"), *args])
    assert unlabelled["choice"] == labelled["choice"]  # labels play no part in the choice
    assert unlabelled["metric"] == "agreement with lite2@260"
    assert unlabelled["choice"]["accuracy"] >= 0.9  # "accuracy" of the search = agreement with the reference
    block = schema.load(str(tmp_path / "cu" / "cascade.yaml")).calibration
    assert block.heldout_accuracy is None and block.margin is None  # nothing to measure it against
    assert block.agreement_reference == "lite2@260" and 0.8 < block.heldout_agreement <= 1.0
    assert labelled["heldout"]["agreement"] == unlabelled["heldout"]["agreement"]
    assert labelled["heldout"]["accuracy"] is not None  # where labels exist, accuracy is reported too
    _, held = split_rows(400, 4)
    models, ts = labelled["choice"]["models"].split(" -> "), labelled["choice"]["thresholds"]
    reference = cal.predictions(pool, ["lite2@260"])[np.sort(held)]
    replayed = committee.cascade(pool.stack(models)[:, np.sort(held)], ts, aggregation=labelled["aggregation"])
    assert block.heldout_agreement == round(float((replayed.pred == reference).mean()), 4)
    # both aggregations were searched against a model; the cheaper one that meets the target is kept
    searched = labelled["aggregations_searched"]
    assert set(searched) == {"logits", "last"}
    assert labelled["choice"]["avg_gmacs"] == min(c["avg_gmacs"] for c in searched.values() if c)
    assert schema.load(str(tmp_path / "cl" / "cascade.yaml")).aggregation.value == labelled["aggregation"]


def test_aggregation_last_cannot_reproduce_an_ensemble(tmp_path):
    pool = small_pool(n=40, classes=10, keys=KEYS, gmacs=GMACS)
    with pytest.raises(SystemExit, match="--aggregation last: .*ensemble"):
        calibrate.run(["--scores", write_scores(tmp_path / "s", pool), "--output", str(tmp_path / "c"),
                       "--target", "match:ensemble(lite0@224,lite2@260)", "--aggregation", "last"])


def recorded_answers(pool: cal.Pool, keys, aggregation, float32: bool = False) -> cal.Answers:
    """Every stage's committee answer on every record, as a run's shadow rows record them (``float32``: with the
    confidences rounded as the ``stages`` column stores them)."""
    conf, pred = [], []
    for k in range(len(keys)):
        combined = committee.ensemble(pool.stack(keys[: k + 1]), aggregation)
        conf.append(committee.confidence(combined))
        pred.append(combined.argmax(-1))
    idx = [pool.index(k) for k in keys]
    conf = np.array(conf, dtype=np.float32 if float32 else np.float64).astype(np.float64)
    return cal.Answers(tuple(keys), pool.gmacs[idx], np.array(pred), conf, pool.labels, pool.groups)


@pytest.mark.parametrize("aggregation", ["logits", "last"])
def test_the_search_over_recorded_answers_equals_the_search_over_logits(aggregation):
    """A run's shadow rows hold each stage's committee answer, which is all Algorithm 1 needs: the thresholds
    chosen from them, and the figures measured on them, are those of the search over the models' logits."""
    pool = small_pool(n=300, classes=12, seed=4)
    keys = ("a", "b", "c")
    answers = recorded_answers(pool, keys, aggregation)
    objective = cal.Objective(goal="min_cost", target_accuracy=pool.solitary_accuracy("b"), margin_sigmas=0.5)
    got = cal.search_answers(answers, pool.labels, objective, COARSE)
    want = cal.search(pool, objective, only=[keys[:k] for k in (1, 2, 3)], aggregation=aggregation,
                      percentiles=COARSE, prune=False)
    assert got.best is not None
    same_figures(got.best, want.best)
    assert got.per_sequence.keys() == want.per_sequence.keys()
    measured = cal.measure_answers(answers, got.best.thresholds, answers.pred[-1])
    direct = cal.measure(pool, got.best.models, got.best.thresholds, aggregation=aggregation,
                         reference=answers.pred[-1])
    assert measured == direct


def write_shadow_run(folder: Path, pool: cal.Pool, keys, aggregation: str, shadow_every: int = 1) -> str:
    """A committed run of ``keys`` whose predictions hold every ``shadow_every``-th record (0: none) as a shadow row
    (every stage's answer), the others with their first stage only; records are 4 variants of each image."""
    from transforms.tables import PREDICTIONS

    answers = recorded_answers(pool, keys, aggregation)
    run_id = "20261205T101500Z-abc123"
    rows = []
    for i in range(pool.size):
        shadow = shadow_every > 0 and i % shadow_every == 0
        stages = [{"stage": k + 1, "model": keys[k], "pred_class": int(answers.pred[k, i]),
                   "confidence": float(answers.conf[k, i])} for k in range(len(keys) if shadow else 1)]
        rows.append({"run_id": run_id, "id": f"r{i}", "uri": f"/x/v{i % 4}/img{i // 4}.jpg", "label": None,
                     "label_name": None, "pred_class": stages[0]["pred_class"], "pred_name": None,
                     "confidence": stages[0]["confidence"], "exit_stage": 1, "gmacs": 0.4, "top5": [],
                     "stages": stages, "shadow": shadow})
    os.makedirs(folder / "predictions")
    pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTIONS.schema),
                   folder / "predictions" / f"{run_id}-00000-of-00001.parquet")
    stages = ", ".join(f"{{model: {k.split('@')[0]}, resolution: {k.split('@')[1]}, threshold: 0.5}}" for k in keys)
    cfg = schema.load("lite_cascade", [f"stages=[{stages}]", f"aggregation={aggregation}", "shadow=0.25"])
    RunFolder(str(folder)).commit({"run_id": run_id, "config": schema.to_yaml(cfg)})
    return str(folder)


def test_recalibration_from_a_runs_shadow_records(tmp_path, capsys):
    """--from_run: the thresholds of the run's own cascade chosen on its shadow rows only, label-free against
    the last stage (lite2@260 alone, with aggregation last), held out by source image; the config it writes
    keeps the run's settings and states the held-out agreement; too few shadow records print a warning."""
    keys = ("lite0@224", "lite1@240", "lite2@260")
    pool = small_pool(n=600, classes=50, seed=5, keys=keys, gmacs=(0.385, 0.6, 0.86))
    run = write_shadow_run(tmp_path / "run", pool, keys, "last", shadow_every=2)
    summary = calibrate.run(["--from_run", run, "--output", str(tmp_path / "cal"), "--target",
                             "agree:lite2@260:0.9", "--percentile_step", "10"])
    assert "WARNING: 300 shadow records: below 400" in capsys.readouterr().out
    assert summary["records"] == 300 and summary["shadow"]["rows"] == 600 and not summary["trusted"]
    cfg = schema.load(str(tmp_path / "cal" / "cascade.yaml"))
    assert cfg.aggregation.value == "last" and cfg.shadow == 0.25  # the run's settings go on
    models = summary["choice"]["models"].split(" -> ")
    assert [f"{s.model}@{s.resolution}" for s in cfg.stages] == models == list(keys[: len(models)])
    thresholds = [s.threshold for s in cfg.stages[:-1]]
    shadow = np.arange(0, 600, 2)  # groups as calibrate makes them: the source image of each uri
    groups = calibrate.record_groups([f"r{i}" for i in shadow], [f"/x/v{i % 4}/img{i // 4}.jpg" for i in shadow],
                                     None, "group")
    answers = recorded_answers(dataclasses.replace(pool.subset(shadow), groups=groups), keys, "last", float32=True)
    sel, held = cal.split_by_group(answers.group_of_each(), 0.5, 0)
    heldout = cal.measure_answers(answers.subset(held), thresholds, answers.pred[-1][held])
    # the written thresholds sit between float32 values, so float64 confidences exit as their float32 roundings do
    float64 = recorded_answers(pool.subset(shadow), keys, "last")
    assert (cal.decide(float64, thresholds).exit_stage == cal.decide(answers, thresholds).exit_stage).all()
    block = cfg.calibration
    assert block.agreement_reference == "lite2@260" and block.heldout_agreement == round(heldout.agreement, 4)
    assert block.heldout_records == len(held) and summary["selection"]["agreement"] >= 0.9


def test_recalibration_from_a_run_refuses_what_it_cannot_use(tmp_path):
    pool = small_pool(n=40, classes=10, seed=6, keys=("lite0@224", "lite2@260"), gmacs=(0.385, 0.86))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--from_run .*empty: no committed run"):
        calibrate.run(["--from_run", str(tmp_path / "empty"), "--output", str(tmp_path / "c"), "--target", "0.5"])
    no_shadow = write_shadow_run(tmp_path / "plain", pool, ("lite0@224", "lite2@260"), "logits", shadow_every=0)
    with pytest.raises(SystemExit, match=r"--from_run .*plain: no shadow record of the cascade lite0@224 -> lite2@260"):
        calibrate.run(["--from_run", no_shadow, "--output", str(tmp_path / "c"), "--target", "agree:lite2@260:0.9"])
    run = write_shadow_run(tmp_path / "run", pool, ("lite0@224", "lite2@260"), "logits")
    with pytest.raises(SystemExit, match=r"--target agree:lite2@260:0.9: .* ensemble\(lite0@224,lite2@260\)"):
        calibrate.run(["--from_run", run, "--output", str(tmp_path / "c"), "--target", "agree:lite2@260:0.9"])
    with pytest.raises(SystemExit, match=r"no shadow record has a label"):
        calibrate.run(["--from_run", run, "--output", str(tmp_path / "c"), "--target", "0.5"])


def test_calibrate_min_cost_matching_a_model_and_a_where_filter(tmp_path):
    pool = small_pool(n=200, classes=1000, seed=2, keys=KEYS, gmacs=GMACS)
    scores = write_scores(tmp_path / "scores", pool)
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label", "variant", "id"])
        for i in range(pool.size):
            w.writerow([f"/x/r{i}.jpg", int(pool.labels[i]), "clean" if i % 2 else "noise", f"r{i}"])
    summary = calibrate.run(["--scores", scores, "--output", str(tmp_path / "c"), "--objective", "min_cost",
                             "--target", "match:lite2@260", "--only", "lite0@224,lite1@240,lite2@260",
                             "--manifest", str(manifest), "--where", "variant=clean", "--folds", "0",
                             "--heldout", "0", "--margin_sigmas", "0", "--percentile_step", "5", "--no_plots"])
    assert summary["records"] == 100 and summary["heldout_records"] == 0
    clean = pool.subset(np.arange(1, 200, 2))
    assert summary["choice"]["accuracy"] >= clean.solitary_accuracy("lite2@260")
    assert summary["choice"]["models"] in ("lite0@224 -> lite1@240 -> lite2@260", "lite0@224 -> lite1@240",
                                           "lite0@224", "lite0@224 -> lite1@240 -> lite2@260")
    assert schema.load(str(tmp_path / "c" / "cascade.yaml")).calibration is None  # no held-out set, no promise


def test_a_manifest_group_column_decides_the_split(tmp_path):
    ids, uris = [f"r{i}" for i in range(6)], [f"/x/{i}.jpg" for i in range(6)]
    rows = {f"r{i}": {"uri": uris[i], "group": "g" + str(i // 3)} for i in range(6)}
    assert calibrate.record_groups(ids, uris, rows, "group").tolist() == [0, 0, 0, 1, 1, 1]
    assert calibrate.record_groups(ids, ["/a/clean/x.jpg", "/a/noise/x.jpg", "/a/clean/y.png"] * 2, None,
                                   "group").tolist() == [0, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("text,expected", [
    ("0.8", calibrate.Target("0.8", value=0.8)),
    ("match:lite2@260", calibrate.Target("match:lite2@260", match=("lite2@260",))),
    ("match:ensemble(a@1, b@2)", calibrate.Target("match:ensemble(a@1, b@2)", match=("a@1", "b@2"))),
    ("agree:lite2@260:0.97", calibrate.Target("agree:lite2@260:0.97", value=0.97, agree=("lite2@260",))),
    ("agree:ensemble(a,b):0.9", calibrate.Target("agree:ensemble(a,b):0.9", value=0.9, agree=("a", "b"))),
])
def test_targets_parse(text, expected):
    assert calibrate.parse_target(text) == expected


def test_a_malformed_target_is_refused_with_the_forms():
    with pytest.raises(SystemExit, match="agree:REFERENCE:SHARE"):
        calibrate.parse_target("agree:lite2@260")


def test_score_pipeline_on_real_images(tmp_path):
    """Four real images through pipelines.score, one without a label (scored all the same, for label-free
    calibration): inputs = scored + dead letters (one missing file)."""
    if not (SAMPLE / "labels.csv").exists():
        pytest.skip(f"the shared ImageNet sample is absent ({SAMPLE}); it lies beside the checkout")
    with open(SAMPLE / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:4]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label"])
        for i, r in enumerate(rows):
            w.writerow([str(SAMPLE / r["path"]), r["class_index"] if i < 3 else ""])  # the last one unlabelled
        w.writerow([str(tmp_path / "missing.jpg"), 1])
    out = tmp_path / "scores"
    manifest_out = score.run(["--models", "lite0@224", "--input", str(manifest), "--output", str(out),
                              "--batch_size", "4"])
    assert manifest_out["invariant_holds"]
    assert manifest_out["counts"]["entries"]["lite0@224"] == {"scored": 4, "dead_letters": 0}
    assert manifest_out["counts"]["read_dead_letters"] == 1
    pool, info = load_pool(str(out))
    assert pool.keys == ("lite0@224",) and pool.logits.shape == (1, 4, 1000) and info["records"] == 4
    assert sorted(pool.labels.tolist()) == sorted([-1] + [int(r["class_index"]) for r in rows[:3]])
    assert pool.solitary_accuracy("lite0@224") >= 0.5  # clean ImageNet images, one per class; one unlabelled


def test_report_of_a_run_refuses_a_folder_with_no_committed_run(tmp_path):
    """Tables without ``runs/<run_id>.json`` are an interrupted run's: the report says so and writes nothing
    (the report of a committed run: tests/test_outputs.py)."""
    from pipelines import report
    from transforms.tables import EXIT_STATS

    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "exit_stats")
    name = "20261128T101500Z-abc123-00000-of-00001.parquet"
    pq.write_table(EXIT_STATS.schema.empty_table(), run_dir / "exit_stats" / name)
    with pytest.raises(SystemExit, match=r"^report: .* holds no committed run .*an incomplete run 20261128T101500Z"):
        report.run(["--run", str(run_dir), "--output", str(tmp_path / "plots")])
    assert not (tmp_path / "plots").exists()
    curve = report.topk_curve(np.array([0.9, 0.8, 0.1]), np.array([True, False, True]), np.array([1 / 3, 1.0]))
    assert curve.tolist() == [1.0, 2 / 3]


def test_the_run_report_holds_a_run_against_its_calibrations_promises(tmp_path):
    """A committed run whose config carries a calibration block: the report shows, per figure, what the block
    promised on data alike and whether the run keeps it."""
    from pipelines import report
    from pipelines.folder import RunFolder
    from transforms.tables import EXIT_STATS, PREDICTIONS

    run_dir, run_id = tmp_path / "run", "20261128T101500Z-abc123"
    top = [{"class": 0, "name": "a", "prob": 0.5}]
    preds = [{"run_id": run_id, "id": f"r{i}", "uri": f"/x/{i}", "label": i % 3, "label_name": "x", "pred_class": 0,
              "pred_name": "a", "confidence": i / 10, "exit_stage": 1 + i % 2, "gmacs": 0.4, "top5": top,
              "stages": [], "shadow": False} for i in range(10)]
    stats = [{"run_id": run_id, "stage": s, "model": "read" if s == 0 else "lite0", "resolution": None if s == 0
              else 224, "threshold": 0.5 if s == 1 else None, "stage_gmacs": 0.4 * (s > 0),
              "cumulative_gmacs": 0.4 * s, "records_in": 10 if s < 2 else 5, "records_exited": 5 * (s > 0),
              "records_failed": 0, "exit_ratio": 0.5 * (s > 0), "exit_ratio_of_reached": None if s == 0 else 0.5 * s,
              "labelled_exited": 5 * (s > 0), "label_errors": 0, "accuracy_exited": 0.4, "total_inputs": 10,
              "predictions": 10,
              "dead_letters": 0, "avg_gmacs": 0.6, "worst_case_gmacs": 0.8, "last_model_gmacs": 0.4,
              "accuracy": 0.4, "shadow_records": 0, "avg_shadow_gmacs": 0.0, "shadow_exited": 0, "shadow_agreed": 0,
              "shadow_agreement": None, "shadow_agreement_low": None, "shadow_agreement_high": None,
              "shadow_last_accuracy": None} for s in (0, 1, 2)]
    for name, rows, sch in (("predictions", preds, PREDICTIONS.schema), ("exit_stats", stats, EXIT_STATS.schema)):
        os.makedirs(run_dir / name)
        pq.write_table(pa.Table.from_pylist(rows, schema=sch), run_dir / name / f"{run_id}-00000-of-00001.parquet")
    cfg = schema.load("lite_cascade", ["stages=[{model: lite0}, {model: lite1}]", "calibration.heldout_accuracy=0.45",
                                       "calibration.margin=0.1", "calibration.heldout_gmacs=0.55",
                                       "calibration.gmacs_margin=0.02", "calibration.expected_exit_ratios=[0.6,0.4]"])
    cfg.calibration.cascade = schema.signature(cfg)  # the block was measured for this very cascade
    RunFolder(str(run_dir)).commit({"run_id": run_id, "config": schema.to_yaml(cfg), "wall_seconds": 1.0,
                                     "counts": {"inputs_listed": 10}, "invariant_holds": True})
    report.run(["--run", str(run_dir), "--output", str(tmp_path / "plots")])
    md = (tmp_path / "plots" / "report.md").read_text()
    assert "| accuracy | 45.00% | >= 35.00% | 40.00% | -5.0 | yes |" in md  # the run's 40 % is within the margin
    assert "| average GMACs | 0.550 | <= 0.570 | 0.600 | +0.050 GMACs | **NO** |" in md
    assert "| exit ratio, stage 2 lite0 | 40.0% | within 5 points | 50.0% | +10.0 | **NO** |" in md
    # the same run with another threshold than the calibrated one: the block's figures are not held against it
    cfg.stages[0].threshold = 0.9
    RunFolder(str(run_dir)).commit({"run_id": run_id, "config": schema.to_yaml(cfg), "wall_seconds": 1.0,
                                     "counts": {"inputs_listed": 10}, "invariant_holds": True})
    report.run(["--run", str(run_dir), "--output", str(tmp_path / "plots")])
    md = (tmp_path / "plots" / "report.md").read_text()
    assert "The calibration figures do not apply to this run: this config's cascade (lite0@224 >= 0.900000" in md
    assert "| accuracy | 45.00%" not in md and "holds" not in md.split("## Against the calibration")[1]


CALIBRATED = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")
                    if schema.load(p.stem).calibration is not None)


def test_the_calibrated_profiles_are_those_of_the_docs():
    assert {"lite_cascade", "imagenet_sample_calibrated", "imagenet_sample_agree97"} <= set(CALIBRATED)


@pytest.mark.parametrize("profile", CALIBRATED)
def test_a_calibrated_profile_states_a_consistent_heldout_promise(profile):
    cfg = schema.load(profile)
    block = cfg.calibration
    assert len(block.expected_exit_ratios) == len(cfg.stages) and sum(block.expected_exit_ratios) == pytest.approx(1)
    assert block.expected_escalated == pytest.approx([1 - sum(block.expected_exit_ratios[: i + 1])
                                                      for i in range(len(cfg.stages) - 1)])
    # >=: a video is its own group; images have several variants per group
    assert block.heldout_gmacs > 0 and block.gmacs_margin >= 0 and block.heldout_records >= block.heldout_groups
    assert (block.heldout_accuracy is None) == (block.margin is None)
    assert (block.agreement_reference is None) == (block.heldout_agreement is None)
    assert block.heldout_accuracy is not None or block.heldout_agreement is not None
    if block.heldout_accuracy is not None:
        assert 0 < block.margin < block.heldout_accuracy <= 1


def test_lite_cascade_carries_the_thresholds_and_figures_of_its_calibration_report():
    summary = json.loads((ROOT / "docs" / "calibration" / "lite_cascade" / "calibration.json").read_text())
    cfg = schema.load("lite_cascade")
    assert [f"{s.model}@{s.resolution}" for s in cfg.stages] == ["lite0@224", "lite1@240", "lite2@260"]
    assert all(s.batch_size == 8 for s in cfg.stages)
    assert [s.threshold for s in cfg.stages[:-1]] == summary["choice"]["thresholds"]
    assert dataclasses.asdict(cfg.calibration) == summary["calibration"]


def test_an_unreachable_target_says_what_is_reachable_and_writes_the_frontier(tmp_path):
    pool = small_pool(n=300, classes=1000, seed=7, keys=KEYS, gmacs=GMACS)
    scores = write_scores(tmp_path / "scores", pool, variants=2)
    with pytest.raises(SystemExit) as refused:
        calibrate.run(["--scores", scores, "--output", str(tmp_path / "c"), "--no_plots", "--target", "0.999",
                       "--percentile_step", "10", "--folds", "0", "--max_models", "2"])
    message = str(refused.value)
    assert message.startswith("no cascade meets the objective on the 150 selection records: the least average "
                              "GMACs at accuracy >= 99.90%, with a margin of 1 standard errors.")
    assert "reachable: the best accuracy is" in message and "Objective(" not in message
    assert (tmp_path / "c" / "frontier.md").exists() and not (tmp_path / "c" / "cascade.yaml").exists()


def test_the_run_report_sets_the_shadow_agreement_against_the_calibrations_promise():
    """The shadow section: overall agreement from the per-stage counts, compared with the promise only where the
    calibration's reference is what the last stage answers; a shortfall is a warning, and so is a small sample."""
    from pipelines import run_report

    def stats(agreed):
        rows = [{"stage": 0, "model": "read", "shadow_records": 2000, "avg_shadow_gmacs": 0.1}]
        for k, (model, n, a) in enumerate(zip(("lite0@224", "lite2@260"), (1500, 500), agreed)):
            rows.append({"stage": k + 1, "model": model, "shadow_exited": n, "shadow_agreed": a,
                         "shadow_agreement": a / n, "shadow_agreement_low": None, "shadow_agreement_high": None,
                         "shadow_last_accuracy": None})
        return rows

    cal_block = {"agreement_reference": "lite2@260", "heldout_agreement": 0.97, "agreement_margin": 0.01}
    good = run_report.shadow_figures(stats((1460, 500)), cal_block, "LAST")
    assert good["agreement"] == 0.98 and good["holds"] and good["trusted"]
    assert not any(isinstance(b, run_report.Alert) for b in run_report.shadow_blocks(stats((1460, 500)), good))
    stale = run_report.shadow_figures(stats((1380, 500)), cal_block, "last")
    assert stale["agreement"] == 0.94 and stale["holds"] is False and stale["low"] < 0.94 < stale["high"]
    alerts = [b.text for b in run_report.shadow_blocks(stats((1380, 500)), stale) if isinstance(b, run_report.Alert)]
    assert len(alerts) == 1 and "below the 96.00% the calibration promised" in alerts[0]
    other = run_report.shadow_figures(stats((1380, 500)), cal_block, "logits")  # the last stage answers an ensemble
    assert other["reference"] == "ensemble(lite0@224,lite2@260)" and other["promised"] is None
    assert run_report.shadow_figures([{"stage": 0, "shadow_records": 0}], cal_block, "last") is None


def test_the_agree97_profile_gives_lite2s_answers_for_fewer_gmacs():
    """imagenet_sample_agree97 (aggregation last): held out, at least 97 % agreement with Lite2@260 alone, at
    fewer GMACs than Lite2 (docs/CALIBRATION.md)."""
    from models import registry

    cfg = schema.load("imagenet_sample_agree97")
    block = cfg.calibration
    assert cfg.aggregation is committee.Aggregation.LAST and block.agreement_reference == "lite2@260"
    assert f"{cfg.stages[-1].model}@{cfg.stages[-1].resolution}" == "lite2@260"
    assert block.heldout_agreement >= 0.97 and block.heldout_agreement - block.agreement_margin > 0.95
    assert block.heldout_gmacs + block.gmacs_margin < registry.gmacs(registry.parse_key("lite2@260"))
