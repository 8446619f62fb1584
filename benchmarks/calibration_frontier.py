"""How far below a reference model's GMACs a cascade matches its accuracy, on the held-out set.

    python benchmarks/calibration_frontier.py docs/calibration [--reference lite2@260]

Reads the ``frontier.parquet`` of a ``pipelines.calibrate`` run (solitary entries, ensembles and the
cascades of the selection set's Pareto frontier, each measured on the held-out set) and prints:
- the reference alone, on the selection and the held-out set;
- *chosen on the selection set*: the cheapest frontier point whose selection accuracy reaches the
  reference's, measured on the held-out set (an honest figure: the held-out set played no part);
- *read off the held-out set*: the cheapest frontier point whose held-out accuracy reaches the reference's
  (optimistic: the point is picked on the set it is measured on, as when one reads a matching point off a
  plot of validation results);
and the GMACs ratio of each to the reference.
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calibration", help="output folder of pipelines.calibrate")
    parser.add_argument("--reference", default="lite2@260")
    args = parser.parse_args(argv)
    rows = pq.read_table(f"{args.calibration}/frontier.parquet").to_pylist()
    ref = next(r for r in rows if r["kind"] == "solitary" and r["models"] == args.reference)
    print(f"{args.reference} alone: selection {ref['accuracy']:.2%}, held out {ref['heldout_accuracy']:.2%} "
          f"at {ref['avg_gmacs']:.3f} GMACs")
    front = [r for r in rows if r["on_frontier"] or r["kind"] == "solitary"]
    for title, acc, cost, need in (
        ("chosen on the selection set", "accuracy", "avg_gmacs", ref["accuracy"]),
        ("read off the held-out set", "heldout_accuracy", "heldout_avg_gmacs", ref["heldout_accuracy"]),
    ):
        hits = [r for r in front if r[acc] >= need - 1e-12]
        best = min(hits, key=lambda r: r[cost])
        t = ", ".join(f"{x:.4f}" for x in best["thresholds"]) or "-"
        print(f"{title}: {best['models']} (thresholds {t}): held out {best['heldout_accuracy']:.2%} at "
              f"{best['heldout_avg_gmacs']:.3f} GMACs = {ref['heldout_avg_gmacs'] / best['heldout_avg_gmacs']:.2f}x "
              f"less than {args.reference} (selection {best['accuracy']:.2%} at {best['avg_gmacs']:.3f})")


if __name__ == "__main__":
    main()
