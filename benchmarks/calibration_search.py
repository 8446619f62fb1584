"""Time the exhaustive calibration search at the paper's size: 8 pool models x cascades of up to 4.

    python benchmarks/calibration_search.py                      # 25,000 records x 1,000 classes
    python benchmarks/calibration_search.py --records 2000 --backend numpy

Each of the 8 synthetic models has 4 independently drawn copies (one family), so every ordered choice
of 2..4 models with repeats is a distinct cascade: 8^2 + 8^3 + 8^4 = 4,672 cascades (plus 8 solitary).
Prints the time, the cascades per second and the threshold-grid points per second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from models import calibration as cal


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=25_000)
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--max_models", type=int, default=4)
    parser.add_argument("--percentile_step", type=float, default=2.0)
    parser.add_argument("--backend", choices=["numpy", "torch"], default="torch")
    parser.add_argument("--prune", action="store_true", help="use the monotonicity shortcuts (default: off, "
                        "so that every cascade is evaluated)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    skills = np.linspace(1.6, 3.0, args.models)
    gmacs = np.round(np.geomspace(0.39, 37.0, args.models), 3)  # EfficientNet-B0..B7-like spread
    pool = cal.synthetic_pool(args.records, args.classes, skills, gmacs, copies=args.max_models, seed=0)
    made = time.perf_counter() - started
    cascades = sum(1 for s in cal.sequences(pool, args.max_models) if len(s) >= 2)
    objective = cal.Objective(goal="max_accuracy", budget_gmacs=float(np.median(gmacs)))
    percentiles = tuple(float(q) for q in np.arange(0, 100 + 1e-9, args.percentile_step))
    started = time.perf_counter()
    result = cal.search(pool, objective, max_models=args.max_models, percentiles=percentiles,
                        backend=args.backend, prune=args.prune)
    elapsed = time.perf_counter() - started
    print(f"pool: {args.models} models x {args.max_models} copies, {args.records:,} records x "
          f"{args.classes:,} classes (made in {made:.1f} s); {cascades:,} cascades of 2..{args.max_models} models")
    print(f"search ({args.backend}, percentile step {args.percentile_step}, prune={args.prune}): "
          f"{result.sequences:,} sequences, {result.grid_points:,} threshold tuples in {elapsed:.1f} s = "
          f"{result.sequences / elapsed:.1f} cascades/s, {result.grid_points / elapsed:,.0f} tuples/s")
    best = result.best
    print(f"best for avg GMACs <= {objective.budget_gmacs}: {' -> '.join(best.models)} "
          f"thresholds {[round(t, 3) for t in best.thresholds]}: accuracy {best.accuracy:.2%}, "
          f"avg GMACs {best.avg_gmacs:.3f}")


if __name__ == "__main__":
    main()
