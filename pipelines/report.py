"""Reports: of a finished cascade run, or plots of a pool of scores.

  python -m pipelines.report --run out/cascade          # writes out/cascade/report/report.md and report.html
  python -m pipelines.report --scores scores/ --output plots/

--run: the report of the folder's committed runs together (--run_id one of them): the runs, counts and the
count invariant over the folder,
per stage the records in, the exit ratio (the share of all predictions exiting there), the accuracy of the
records exiting there and the cumulative cost; GMACs against the last model alone; confidence per stage
with its threshold; accuracy vs confidence; top confusions by class name; dead letters by category; and,
when the config was calibrated, the run against its calibration: the exit ratios it expected (a warning
when they drift), the accuracy and average GMACs it promised. report.html is the same page with its
images inlined. A folder without a committed run (an interrupted one) is refused.

--scores: plots of a pool scored by pipelines.score: accuracy vs average GMACs of solitary models,
ensembles and cascades (the paper's Figure 2), a 2-model cascade as its threshold sweeps 0..1 (Figure 3),
and the accuracy of the most confident records for each confidence function (Figure A).
"""

from __future__ import annotations

if __name__ == "__main__":  # before Beam is imported: its import logs a warning that concerns no pipeline here
    from pipelines import quiet_beam_import

    quiet_beam_import()

import argparse
import sys
from collections.abc import Sequence

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from models import calibration as cal
from models import committee, registry
from pipelines import run_report
from pipelines.pool import frontier_rows, load_pool, markdown_table

KIND_STYLE = {"solitary": ("o", "tab:blue"), "ensemble": ("s", "tab:orange"), "cascade": ("^", "tab:green")}


def _save(fig, output: str, name: str) -> str:
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{name}", "wb") as fh:
        fig.savefig(fh, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return name


def plot_accuracy_vs_gmacs(rows: list[dict], output: str, chosen: dict | None = None,
                           budget: float | None = None, heldout: bool = False, metric: str = "accuracy",
                           reference: tuple[str, float] | None = None) -> str:
    """Figure 2: every solitary model and ensemble (one model at several resolutions joined by a dotted line),
    and the cascades of the Pareto frontier; with ``heldout``, the same choices (made on the selection set)
    measured on the held-out set, and a ``reference`` line (the most accurate solitary entry)."""
    acc_key, cost_key = ("heldout_accuracy", "heldout_avg_gmacs") if heldout else ("accuracy", "avg_gmacs")
    rows = [r for r in rows if r.get(acc_key) is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for kind, (marker, color) in KIND_STYLE.items():
        pts = [r for r in rows if r["kind"] == kind and (kind != "cascade" or r["on_frontier"])]
        if not pts:
            continue
        pts.sort(key=lambda r: r[cost_key])
        xs, ys = [r[cost_key] for r in pts], [100 * r[acc_key] for r in pts]
        if kind == "cascade":
            ax.plot(xs, ys, "-", color=color, lw=1, alpha=0.6)
        label = {"cascade": "cascades on the selection set's frontier"}.get(kind, kind)
        ax.scatter(xs, ys, marker=marker, color=color, s={"cascade": 22, "ensemble": 25}.get(kind, 45),
                   label=label, zorder=3, alpha=0.6 if kind == "ensemble" else 1.0)
        if kind == "solitary":
            for r in pts:
                ax.annotate(r["models"], (r[cost_key], 100 * r[acc_key]), textcoords="offset points",
                            xytext=(4, -10), fontsize=8)
            ladders: dict[str, list[dict]] = {}
            for r in pts:
                ladders.setdefault(registry.split_key(r["models"])[0], []).append(r)
            for i, ladder in enumerate(v for v in ladders.values() if len(v) > 1):  # one model, several resolutions
                ax.plot([r[cost_key] for r in ladder], [100 * r[acc_key] for r in ladder], ":", color=color, lw=1,
                        label="resolution ladder of one model" if i == 0 else None)
    if chosen and chosen.get(acc_key) is not None:
        ax.scatter([chosen[cost_key]], [100 * chosen[acc_key]], marker="*", s=250, color="tab:red",
                   label="chosen: " + chosen["models"], zorder=4)
    if budget is not None:
        ax.axvline(budget, color="grey", ls="--", lw=1, label=f"budget {budget:.3f} GMACs")
    if reference is not None:
        ax.axhline(100 * reference[1], color="tab:purple", ls=":", lw=1, label=f"{reference[0]}: {reference[1]:.2%}")
    where = "held-out set (chosen on the selection set)" if heldout else "selection set"
    ax.set_xlabel("average GMACs per record (multiply-adds x1e9)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric.capitalize()} vs cost on the {where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, output, "heldout_frontier.png" if heldout else "accuracy_vs_gmacs.png")


def plot_t1_sweep(pool: cal.Pool, pair: Sequence[str], output: str, kind, aggregation) -> str:
    """Figure 3: a 2-model cascade as t1 goes from 0 (all exit at model 1) to 1 (the 2-model ensemble)."""
    ts = np.linspace(0.0, 1.0, 101)
    pts = [cal.replay(pool, pair, [t], kind, aggregation) for t in ts]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sc = ax.scatter([p.avg_gmacs for p in pts], [100 * p.accuracy for p in pts], c=ts, cmap="viridis", s=18)
    ax.plot([p.avg_gmacs for p in pts], [100 * p.accuracy for p in pts], "-", color="grey", lw=0.8, alpha=0.6)
    fig.colorbar(sc, ax=ax, label="threshold t1")
    for key, marker in zip(pair, ("o", "s")):
        solo = cal.replay(pool, [key], [], kind, aggregation)
        ax.scatter([solo.avg_gmacs], [100 * solo.accuracy], marker=marker, s=80, color="tab:red", zorder=4)
        ax.annotate(f"{key} alone", (solo.avg_gmacs, 100 * solo.accuracy), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("average GMACs per record")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Cascade {pair[0]} -> {pair[1]} as t1 sweeps 0..1 ({kind.value})")
    ax.grid(alpha=0.3)
    return _save(fig, output, "t1_sweep.png")


def plot_exit_ratios(stages: list[dict], output: str, title: str) -> str:
    """Share of records exiting at each stage, with the accuracy of the records that exited there."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = [s["label"] for s in stages]
    ratios = [100 * s["exit_ratio"] for s in stages]
    bars = ax.bar(labels, ratios, color="tab:green", alpha=0.8)
    for bar, s in zip(bars, stages):
        acc = "" if s.get("accuracy") is None else f"\nacc {s['accuracy']:.1%}"
        ax.annotate(f"{s['exit_ratio']:.1%}{acc}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("records exiting at the stage (%)")
    ax.set_ylim(0, max(ratios + [1]) * 1.25)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, output, "exit_ratios.png")


def cascade_stages(pool: cal.Pool, models: Sequence[str], thresholds: Sequence[float], kind, aggregation) -> list[dict]:
    idx = [pool.index(k) for k in models]
    res = committee.cascade(pool.logits[idx], list(thresholds), pool.gmacs[idx], kind, aggregation)
    out = []
    for j, key in enumerate(models):
        mask = res.exit_stage == j + 1
        t = f"\nt={thresholds[j]:.3f}" if j < len(thresholds) else ""
        out.append({"label": f"{j + 1}: {key}{t}", "exit_ratio": float(mask.mean()),
                    "accuracy": float((res.pred[mask] == pool.labels[mask]).mean()) if mask.any() else None})
    return out


def topk_curve(conf: np.ndarray, correct: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Accuracy of the ``share`` most confident records, for each share in (0, 1]."""
    order = np.argsort(-conf, kind="stable")
    cum = np.cumsum(correct[order])
    k = np.maximum(1, np.round(shares * len(conf)).astype(int))
    return cum[k - 1] / k


def plot_topk(curves: dict[str, dict[str, np.ndarray]], shares: np.ndarray, output: str) -> str:
    """Figure A: one panel per model, one line per confidence function."""
    n = len(curves)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, (model, lines) in zip(axes.ravel(), curves.items()):
        for name, acc in lines.items():
            ax.plot(100 * shares, 100 * acc, label=name)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("top-k % most confident records")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle("Accuracy of the most confident records, per confidence function")
    fig.tight_layout()
    return _save(fig, output, "confidence_topk.png")


def pool_topk(pool: cal.Pool, output: str) -> str:
    shares = np.linspace(0.01, 1.0, 100)
    curves = {}
    for key in pool.keys:
        z = pool.logits[pool.index(key)]
        correct = z.argmax(-1) == pool.labels
        curves[key] = {k.value: topk_curve(committee.confidence(z, k), correct, shares) for k in committee.Confidence}
    return plot_topk(curves, shares, output)


def _pair_for_sweep(pool: cal.Pool, chosen: dict | None) -> list[str]:
    models = chosen["models"].split(" -> ") if chosen else []
    if len(models) >= 2:
        return models[:2]
    by_cost = sorted(pool.keys, key=lambda k: pool.gmacs[pool.index(k)])
    return [by_cost[0], max(pool.keys, key=pool.solitary_accuracy)] if len(by_cost) > 1 else by_cost * 2


def calibration_report(pool: cal.Pool, summary: dict, rows: list[dict], output: str, kind, aggregation) -> str:
    """All plots of a calibration and ``report.md`` beside them; returns the report's path. ``pool`` is the
    selection set; held-out figures come from ``summary`` and ``rows``."""
    kind, aggregation = committee.Confidence(kind), committee.Aggregation(aggregation)
    chosen = summary.get("choice")
    metric = summary.get("metric", "accuracy")
    pngs = [plot_accuracy_vs_gmacs(rows, output, chosen, summary["objective"].get("budget_gmacs"), metric=metric)]
    held = summary.get("heldout")
    if held:
        best_solo = max((r for r in rows if r["kind"] == "solitary"), key=lambda r: r["accuracy"])
        point = {**chosen, "heldout_accuracy": held["accuracy" if metric == "accuracy" else "agreement"],
                 "heldout_avg_gmacs": held["avg_gmacs"]}
        pngs.append(plot_accuracy_vs_gmacs(rows, output, point, heldout=True, metric=metric,
                                           reference=(best_solo["models"] + " alone", best_solo["heldout_accuracy"])))
    pair = _pair_for_sweep(pool, chosen)
    if len(set(pair)) == 2:
        pngs.append(plot_t1_sweep(pool, pair, output, kind, aggregation))
    if chosen:
        models = chosen["models"].split(" -> ")
        pngs.append(plot_exit_ratios(cascade_stages(pool, models, chosen["thresholds"], kind, aggregation), output,
                                     "Exit ratios per stage of the chosen cascade (selection set)"))
    pngs.append(pool_topk(pool, output))
    obj = summary["objective"]
    lines = [
        "# Calibration report", "",
        f"{summary['records']} scored records"
        + (f" ({', '.join(summary['where'])})" if summary.get("where") else "")
        + f": {summary['selection_records']} to choose on ({summary['selection_groups']} source images), "
        f"{summary['heldout_records']} held out ({summary['heldout_groups']} source images; every variant of an "
        f"image on one side). Metric: {metric}; confidence `{summary['confidence']}`, aggregation "
        f"`{summary['aggregation']}`.", "",
        f"Target `{summary['target']}`. Objective: `{obj['goal']}`; target {obj['target_accuracy']}, budget "
        f"{obj['budget_gmacs']} GMACs, worst case <= {obj['max_worst_gmacs']}, past stage 1 <= "
        f"{obj['max_past_first']}; margin {obj['margin_sigmas']} standard errors on the selection set"
        + (f"; sequence chosen by {summary['folds']}-fold group-wise cross-validation" if summary["folds"] > 1
           else "") + ".", "",
        "## Pool", "", "| entry | GMACs | selection | held out |", "|---|---:|---:|---:|",
        *[f"| {k} | {v['gmacs']:.3f} | {_pct(v.get('selection'), metric)} | {_pct(v.get('heldout'), metric)} |"
          for k, v in summary["pool"].items()], "",
    ]
    if chosen:
        lines += ["## Chosen cascade", "",
                  f"{chosen['models']} with thresholds {', '.join(f'{t:.4f}' for t in chosen['thresholds']) or '-'} "
                  f"(worst case {chosen['worst_gmacs']:.3f} GMACs). Config: `{summary['config']}`.", "",
                  "| set | records | accuracy | agreement | average GMACs | exit ratios |",
                  "|---|---:|---:|---:|---:|---|",
                  *[_measured_line(name, summary.get(name)) for name in ("selection", "heldout") if summary.get(name)],
                  ""]
        block = summary.get("calibration")
        if block:
            promise = [f"average GMACs <= {block['heldout_gmacs'] + block['gmacs_margin']:.3f} "
                       f"(held-out {block['heldout_gmacs']:.3f} + {block['gmacs_margin']:.3f})"]
            if block.get("heldout_accuracy") is not None:
                promise.insert(0, f"accuracy >= {block['heldout_accuracy'] - block['margin']:.2%} (held-out "
                               f"{block['heldout_accuracy']:.2%} - margin {block['margin']:.2%})")
            if block.get("heldout_agreement") is not None:
                promise.append(f"agreement with {block['agreement_reference']} >= "
                               f"{block['heldout_agreement'] - block['agreement_margin']:.2%}")
            lines += ["What the config's `calibration:` block promises on data alike: " + "; ".join(promise) + ".", ""]
    if summary.get("cv"):
        cv = sorted(summary["cv"], key=lambda r: -r["cv_accuracy"])[:10]
        lines += ["## Cross-validation on the selection set (top 10 sequences by held-out-fold " + metric + ")", "",
                  "| models | CV " + metric + " | CV avg GMACs | CV share past stage 1 | qualifies |",
                  "|---|---:|---:|---:|:-:|",
                  *[f"| {r['models']} | {r['cv_accuracy']:.2%} | {r['cv_avg_gmacs']:.3f} | {r['cv_past_first']:.1%} | "
                    f"{'yes' if r['qualifies'] else ''} |" for r in cv], ""]

    front = [r for r in rows if r["on_frontier"] or r["kind"] == "solitary"]
    lines += [f"## Pareto frontier of the selection set (and every solitary model); column `accuracy` is {metric}",
              "", markdown_table(front)]
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in pngs], ""]
    path = f"{output.rstrip('/')}/report.md"
    with fsspec.open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path


def _pct(figures: dict | None, metric: str) -> str:
    if not figures:
        return "-"
    value = figures["accuracy"] if metric == "accuracy" else figures["agreement"]
    return "-" if value is None else f"{value:.2%}"


def _measured_line(name: str, m: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.2%}"

    return (f"| {name} | {m['records']} | {pct(m['accuracy'])} | {pct(m['agreement'])} | {m['avg_gmacs']:.3f} | "
            + " / ".join(f"{x:.1%}" for x in m["exit_ratios"]) + " |")


def run(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="output folder of pipelines.cascade: write its run report")
    parser.add_argument("--run_id", default=None,
                        help="with --run: the one committed run to report (default: every committed run together)")
    parser.add_argument("--drift_margin", type=float, default=run_report.DRIFT_MARGIN,
                        help="with --run: warn when a stage's exit ratio differs from the calibration's by more "
                             "than this (absolute share; default %(default)s)")
    parser.add_argument("--scores", default=None, help="output folder of pipelines.score: plot the pool")
    parser.add_argument("--output", default=None,
                        help="folder to write into (default: <run>/report for --run, the scores folder for --scores)")
    args = parser.parse_args(argv)
    if args.run:
        try:
            written = run_report.write_report(args.run, args.output, args.run_id, args.drift_margin)
        except FileNotFoundError as err:
            raise SystemExit(f"report: {err}") from None
        pngs = [f"{written['output']}/{name}" for name in written["files"]]
        for d in written["drift"]:
            if d["drifts"]:
                print(f"WARNING: stage {d['stage']} exit ratio {d['run']:.1%} vs {d['expected']:.1%} expected by the "
                      f"calibration: the data is not like the calibration data (see the report)")
    elif args.scores:
        pool, _ = load_pool(args.scores)
        output = args.output or args.scores
        kind, agg = committee.Confidence.MAX_PROB, committee.Aggregation.LOGITS
        depth = min(3, len(pool.keys))
        full = cal.search(pool, cal.Objective(goal="max_accuracy", budget_gmacs=float("inf")), frontier=True,
                          prune=False, max_models=depth)
        rows = frontier_rows(pool, full.frontier, depth, kind, agg)
        pngs = [plot_accuracy_vs_gmacs(rows, output), pool_topk(pool, output)]
        pair = _pair_for_sweep(pool, None)
        if len(set(pair)) == 2:
            pngs.append(plot_t1_sweep(pool, pair, output, kind, agg))
    else:
        parser.error("give --scores or --run")
    print("wrote " + ", ".join(pngs))
    return pngs


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
