"""How many shadow records does a recalibrated threshold need? (docs/CALIBRATION.md, "How many shadow records")

    python -m benchmarks.shadow_size --scores ../data/scores --config imagenet_sample_agree97 \
        --target agree:lite2@260:0.97 --sizes 100,200,400,700,990 --repeats 40

From a scored set (``pipelines.score``), each record's answer at every stage of ``--config``'s cascade is what
a run's shadow row would hold. The source images are split in two: one half plays the production run whose
shadow sample is recalibrated from (``pipelines.calibrate --from_run``'s search: ``search_answers`` with its
margin, then a group-wise held-out half for the promise), the other half is new data the recalibrated
thresholds then meet. For each shadow-sample size, ``--repeats`` random samples (of whole source images) give
the share of recalibrations whose agreement on the new data falls below the target and below their own promise.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from configs import schema
from models import calibration as cal
from models import committee
from pipelines.calibrate import parse_target, record_groups
from pipelines.pool import load_pool


def answers_of(pool: cal.Pool, keys, kind, aggregation) -> cal.Answers:
    """Every stage's committee answer on every record, as shadow rows record them."""
    conf, pred = [], []
    for k in range(len(keys)):
        combined = committee.ensemble(pool.stack(keys[: k + 1]), aggregation)
        conf.append(committee.confidence(combined, kind))
        pred.append(combined.argmax(-1))
    idx = [pool.index(k) for k in keys]
    return cal.Answers(tuple(keys), pool.gmacs[idx], np.array(pred), np.array(conf), pool.labels, pool.groups)


def recalibrate(shadow: cal.Answers, share: float, margin: float, percentiles, seed: int):
    """``--from_run``'s choice on ``shadow``: (thresholds, promised agreement) or None."""
    sel, held = cal.split_by_group(shadow.group_of_each(), 0.5, seed)
    truth = shadow.pred[-1]
    objective = cal.Objective(goal="min_cost", target_accuracy=share, margin_sigmas=margin)
    best = cal.search_answers(shadow.subset(sel), truth[sel], objective, percentiles).best
    if best is None:
        return None
    measured = cal.measure_answers(shadow.subset(held), best.thresholds, truth[held])
    return best.thresholds, measured.agreement - measured.margin("agreement", 2.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True)
    parser.add_argument("--config", required=True, help="the cascade whose run is recalibrated")
    parser.add_argument("--target", default="agree:lite2@260:0.97")
    parser.add_argument("--sizes", default="100,200,400,700,990", help="shadow records per recalibration")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--margin_sigmas", type=float, default=1.0)
    parser.add_argument("--percentile_step", type=float, default=2.0)
    args = parser.parse_args(argv)
    cfg = schema.load(args.config)
    keys = [spec.key for spec in schema.stage_specs(cfg)]
    kind, aggregation = committee.Confidence(cfg.confidence), committee.Aggregation(cfg.aggregation)
    share = parse_target(args.target).value
    pool, info = load_pool(args.scores, keys, {}, None)
    pool = replace(pool, groups=record_groups(info["ids"], info["uris"], None, "group"))
    answers = answers_of(pool, keys, kind, aggregation)
    production, new = cal.split_by_group(answers.group_of_each(), 0.5, seed=1)
    run, fresh = answers.subset(production), answers.subset(new)
    percentiles = tuple(float(q) for q in np.arange(0, 100 + 1e-9, args.percentile_step))
    groups = np.unique(run.group_of_each())
    per_group = len(production) / len(groups)
    rng = np.random.default_rng(0)
    print(f"cascade {' -> '.join(keys)} ({aggregation.value}), target {args.target}; {run.size} production "
          f"records, {fresh.size} new records; {args.repeats} recalibrations per size")
    print("shadow records | none found | new-data agreement: mean, 5th percentile | below target | "
          "below own promise | mean GMACs on new data")
    for size in (int(s) for s in args.sizes.split(",")):
        picked_groups = max(2, round(size / per_group))
        results = []
        for r in range(args.repeats):
            chosen = rng.choice(groups, size=min(picked_groups, len(groups)), replace=False)
            shadow = run.subset(np.flatnonzero(np.isin(run.group_of_each(), chosen)))
            got = recalibrate(shadow, share, args.margin_sigmas, percentiles, seed=r)
            if got is None:
                results.append(None)
                continue
            thresholds, promised = got
            on_new = cal.measure_answers(fresh, thresholds, fresh.pred[-1])
            results.append((on_new.agreement, promised, on_new.avg_gmacs))
        found = [x for x in results if x is not None]
        agreements = np.array([a for a, _, _ in found])
        print(f"{size:>14} | {len(results) - len(found):>10} | "
              + (f"{agreements.mean():.2%}, {np.percentile(agreements, 5):.2%} | "
                 f"{np.mean(agreements < share):.0%} | {np.mean([a < p for a, p, _ in found]):.0%} | "
                 f"{np.mean([g for _, _, g in found]):.3f}" if found else "- | - | - | -"))


if __name__ == "__main__":
    main()
