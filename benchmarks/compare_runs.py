"""Compare the tables of two runs of ``pipelines.cascade`` row for row: the check that a refactor (or
another execution mode) changes no output.

    python -m benchmarks.compare_runs RUN_A RUN_B [--columns-of-a] [--atol 0]

For each table both runs wrote (predictions, video_predictions, exit_stats, dead_letter), rows are matched
on their key (id, video_id, or stage; dead letters on id, stage and error) and every column both tables have
is compared, exactly by default. Prints one line per table and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import math
import sys

from pipelines.folder import RunFolder
from transforms.tables import ALL_TABLE_NAMES

KEYS = {"predictions": ("id",), "video_predictions": ("video_id",), "exit_stats": ("stage",),
        "dead_letter": ("id", "stage", "error")}
IGNORED = {"run_id"}  # columns that differ between any two runs by design


def _same(a, b, atol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):  # a struct (top5 and stages entries): field by field
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    return a == b


def compare_table(run_a: str, run_b: str, name: str, atol: float = 0.0) -> list[str]:
    """Differences between table ``name`` of two runs, in words (empty: identical)."""
    rows = []
    for run in (run_a, run_b):
        table = RunFolder(run).read(name) if RunFolder(run).count_rows(name) else None
        rows.append([] if table is None else table.to_pylist())
    a, b = rows
    key = KEYS[name]
    index_a = {tuple(r[k] for k in key): r for r in a}
    index_b = {tuple(r[k] for k in key): r for r in b}
    problems = []
    if len(index_a) != len(a) or len(index_b) != len(b):
        problems.append(f"{name}: duplicate keys {key}")
    only_a, only_b = index_a.keys() - index_b.keys(), index_b.keys() - index_a.keys()
    if only_a or only_b:
        problems.append(f"{name}: {len(only_a)} rows only in A (e.g. {sorted(only_a)[:3]}), {len(only_b)} only "
                        f"in B (e.g. {sorted(only_b)[:3]})")
    columns = sorted(({c for r in a[:1] for c in r} & {c for r in b[:1] for c in r}) - IGNORED)
    for k in sorted(index_a.keys() & index_b.keys()):
        bad = [c for c in columns if not _same(index_a[k][c], index_b[k][c], atol)]
        if bad:
            problems.append(f"{name} {k}: " + ", ".join(f"{c}: {index_a[k][c]!r} != {index_b[k][c]!r}"
                                                         for c in bad[:3]))
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--atol", type=float, default=0.0, help="tolerance on float columns (default: exact)")
    args = parser.parse_args(argv)
    failed = False
    for name in (*ALL_TABLE_NAMES,):
        if not (RunFolder(args.run_a).count_rows(name) or RunFolder(args.run_b).count_rows(name)):
            continue
        problems = compare_table(args.run_a, args.run_b, name, args.atol)
        rows = RunFolder(args.run_a).count_rows(name)
        print(f"{name}: {rows} rows in A, {RunFolder(args.run_b).count_rows(name)} in B: "
              + ("identical" if not problems else f"{len(problems)} differences"))
        for line in problems[:20]:
            print("  " + line)
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
