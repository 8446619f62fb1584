"""The report of one committed run of pipelines.cascade, for a person: ``report.md`` and the same as one
self-contained ``report.html`` (images inlined), with its plots beside them. Called by
``python -m pipelines.report --run DIR``.

The report is a list of blocks (headings, paragraphs, tables, images, warnings) rendered twice, so that the
Markdown and the HTML say the same. Figures come from the run's committed tables only
(``pipelines.common.read_table`` with the run's id); a folder without a committed run is refused.
"""

from __future__ import annotations

import base64
import collections
import html
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import fsspec
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from pipelines import common

DRIFT_MARGIN = 0.05  # exit ratios further than this from the calibration's (absolute) are flagged
TOP_CONFUSIONS = 10
EXAMPLES_PER_CATEGORY = 3


# ---- blocks and their two renderings -----------------------------------------------------------------------

@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str  # may hold `code` and **bold**


@dataclass(frozen=True)
class Alert:
    text: str


@dataclass(frozen=True)
class TableBlock:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: str = ""  # one of l / r per column; default: first left, others right


@dataclass(frozen=True)
class Image:
    name: str  # a PNG beside the report
    alt: str


def _align(block: TableBlock) -> str:
    return block.align or "l" + "r" * (len(block.header) - 1)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Alert):
            out.append(f"> **Warning.** {b.text}")
        elif isinstance(b, TableBlock):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in _align(b)) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.name})")
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ccc;
padding:.25rem .6rem}th{background:#f3f3f3}td.r,th.r{text-align:right}code{background:#f3f3f3;padding:0 .2rem}
.warning{border-left:4px solid #d9822b;background:#fff4e5;padding:.5rem 1rem;margin:1rem 0}img{max-width:100%}"""


def to_html(blocks: Sequence, title: str, images: dict[str, bytes]) -> str:
    """One self-contained page: the PNGs are inlined as data: URIs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Alert):
            out.append(f'<div class="warning"><strong>Warning.</strong> {_inline_html(b.text)}</div>')
        elif isinstance(b, TableBlock):
            align = _align(b)
            out.append("<table><thead><tr>" + "".join(f'<th class="{a}">{_inline_html(h)}</th>'
                                                      for h, a in zip(b.header, align)) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f'<td class="{a}">{_inline_html(str(c))}</td>' for c, a in zip(row, align))
                    + "</tr>" for row in b.rows]
            out.append("</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(images[b.name]).decode()
            out.append(f'<p><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></p>')
    out.append("</body></html>")
    return "\n".join(out)


# ---- figures from the tables ---------------------------------------------------------------------------

def pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def calibration_block(manifest: dict) -> dict:
    """The run's config's ``calibration:`` block ({} when it has none)."""
    config = yaml.safe_load(manifest.get("config") or "") or {}
    return config.get("calibration") or {}


def drift(stats: Sequence[dict], expected: Optional[Sequence[float]], margin: float) -> list[dict]:
    """Per stage: the run's exit ratio beside the calibration's, and whether it drifts past ``margin``."""
    if not expected:
        return []
    stages = [s for s in stats if s["stage"] >= 1]
    return [{"stage": s["stage"], "model": s["model"], "run": s["exit_ratio"], "expected": e,
             "drifts": s["exit_ratio"] is not None and abs(s["exit_ratio"] - e) > margin}
            for s, e in zip(stages, expected)]


def promises(cal: dict, run: dict) -> list[dict]:
    """What a config's calibration block promises on data like its calibration data, beside the run:
    accuracy >= heldout_accuracy - margin, average GMACs <= heldout_gmacs + gmacs_margin."""
    out = []
    if cal.get("heldout_accuracy") is not None:
        held, acc = cal["heldout_accuracy"], run["accuracy"]
        bound = held - (cal.get("margin") or 0.0)
        out.append({"figure": "accuracy", "calibrated": pct(held, 2), "promised": f">= {pct(bound, 2)}",
                    "run": pct(acc, 2), "difference": "-" if acc is None else f"{100 * (acc - held):+.1f}",
                    "holds": "-" if acc is None else ("yes" if acc >= bound else "**NO**")})
    if cal.get("heldout_gmacs") is not None and run["avg_gmacs"] is not None:
        held, avg = cal["heldout_gmacs"], run["avg_gmacs"]
        bound = held + (cal.get("gmacs_margin") or 0.0)
        out.append({"figure": "average GMACs", "calibrated": f"{held:.3f}", "promised": f"<= {bound:.3f}",
                    "run": f"{avg:.3f}", "difference": f"{avg - held:+.3f} GMACs",
                    "holds": "yes" if avg <= bound else "**NO**"})
    return out


def confusions(pred: dict, top: int = TOP_CONFUSIONS) -> list[tuple[str, str, int]]:
    """The most frequent (true class, predicted class) pairs among wrong labelled predictions, by name."""
    pairs = collections.Counter(
        (ln or str(lab), pn or str(pc))
        for lab, ln, pc, pn in zip(pred["label"], pred["label_name"], pred["pred_class"], pred["pred_name"])
        if lab is not None and lab != pc)
    return [(a, b, n) for (a, b), n in pairs.most_common(top)]


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[tuple[float, float, float, int]]:
    """(bin low, bin high, accuracy, records) for each non-empty confidence bin of [0, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return [(float(edges[b]), float(edges[b + 1]), float(correct[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]


# ---- plots -------------------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_exit_ratios(stats: Sequence[dict], expected: Optional[Sequence[float]]) -> bytes:
    stages = [s for s in stats if s["stage"] >= 1]
    x = np.arange(len(stages))
    width = 0.38 if expected else 0.6
    fig, ax = plt.subplots(figsize=(9, 4.5))
    run = [100 * (s["exit_ratio"] or 0.0) for s in stages]
    bars = ax.bar(x - (width / 2 if expected else 0), run, width, color="tab:green", label="this run")
    for bar, s in zip(bars, stages):
        acc = "" if s["accuracy_exited"] is None else f"\naccuracy {100 * s['accuracy_exited']:.1f} %"
        ax.annotate(f"{100 * (s['exit_ratio'] or 0):.1f} %{acc}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if expected:
        ebars = ax.bar(x + width / 2, [100 * e for e in expected], width, color="white", edgecolor="tab:blue",
                       hatch="//", label="expected (config's calibration)")
        for bar, e in zip(ebars, expected):
            ax.annotate(f"{100 * e:.1f} %", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, color="tab:blue")
    ax.set_xticks(x, [f"stage {s['stage']}\n{s['model']}" + ("" if s["threshold"] is None
                                                                 else f"\nthreshold {s['threshold']:.3f}")
                      for s in stages], fontsize=8)
    ax.set_ylabel("exit ratio: share of all predictions (%)")
    top = max(run + [100 * e for e in (expected or [])] + [1.0])
    ax.set_ylim(0, top * 1.3)
    ax.set_title("Exit ratio per stage: share of all predictions exiting there (sums to 100 %)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def plot_confidence(stats: Sequence[dict], pred: dict, confidence: str) -> bytes:
    """Per stage, the confidence of the records exiting there (stacked: correct, wrong, unlabelled), with
    the stage's threshold: a record exits at a stage once its confidence reaches the threshold."""
    stages = [s for s in stats if s["stage"] >= 1]
    conf = np.asarray(pred["confidence"], dtype=float)
    stage_of = np.asarray(pred["exit_stage"])
    label = pred["label"]
    correct = np.array([lab is not None and lab == pc for lab, pc in zip(label, pred["pred_class"])])
    labelled = np.array([lab is not None for lab in label])
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False, sharey=False)
    bins = np.linspace(0, 1, 21)
    for ax, s in zip(axes[0], stages):
        here = stage_of == s["stage"]
        groups = [(conf[here & correct], "correct", "tab:green"),
                  (conf[here & labelled & ~correct], "wrong", "tab:red"),
                  (conf[here & ~labelled], "unlabelled", "tab:grey")]
        groups = [g for g in groups if len(g[0])]
        if groups:
            ax.hist([g[0] for g in groups], bins=bins, stacked=True, color=[g[2] for g in groups],
                    label=[g[1] for g in groups])
        if s["threshold"] is not None:
            ax.axvline(s["threshold"], color="black", ls="--", lw=1.2, label=f"threshold {s['threshold']:.3f}")
        if not groups:
            ax.text(0.5, 0.5, "no record exited here", transform=ax.transAxes, ha="center", fontsize=9)
        last = " (last: all exit)" if s["threshold"] is None else ""
        ax.set_title(f"stage {s['stage']} {s['model']}: {int(here.sum())} exited{last}", fontsize=9)
        ax.set_xlabel(f"confidence at exit ({confidence})")
        ax.set_ylabel("records")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        if groups or s["threshold"] is not None:
            ax.legend(fontsize=7, loc="upper center")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle("Confidence of the records exiting at each stage", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_reliability(table: Sequence[tuple[float, float, float, int]]) -> bytes:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    mids = [(lo + hi) / 2 for lo, hi, _, _ in table]
    accs = [100 * acc for _, _, acc, _ in table]
    ax.bar(mids, accs, width=0.09, color="tab:blue", alpha=0.8, label="accuracy of the records in the bin")
    for m, a, (_, _, _, n) in zip(mids, accs, table):
        ax.annotate(f"n={n}", (m, a), ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 100], "--", color="grey", lw=1, label="confidence = accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 135)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("confidence at exit (bins of 0.1)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs confidence (labelled records; n = records in the bin)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    return _png(fig)


# ---- the report --------------------------------------------------------------------------------------------

def build_report(run_output: str, run_id: Optional[str] = None,
                 margin: float = DRIFT_MARGIN) -> tuple[list, dict[str, bytes], dict]:
    """(blocks, PNGs by name, figures) of a committed run; FileNotFoundError for a folder without one."""
    manifest = common.read_manifest(run_output, run_id)
    run_id = manifest["run_id"]
    stats = sorted(common.read_table(run_output, "exit_stats", [run_id]).to_pylist(), key=lambda s: s["stage"])
    pred = common.read_table(run_output, "predictions", [run_id]).select(
        ["label", "label_name", "pred_class", "pred_name", "confidence", "exit_stage"]).to_pydict()
    dead = (common.read_table(run_output, "dead_letter", [run_id]).to_pylist()
            if common.count_rows(run_output, "dead_letter", [run_id]) else [])
    config = yaml.safe_load(manifest["config"]) or {}
    cal = calibration_block(manifest)
    expected = cal.get("expected_exit_ratios")
    run = stats[0]
    counts = manifest["counts"]
    images: dict[str, bytes] = {}
    blocks: list = [Heading(f"Run {run_id}", 1)]
    blocks.append(Para(f"Output folder `{run_output}`; started {manifest.get('started_utc', '?')}, finished "
                       f"{manifest.get('finished_utc', '?')} ({manifest['wall_seconds']:.0f} s); config "
                       f"`{manifest.get('profile')}` over `{config.get('input', '?')}`; runner flags "
                       f"`{' '.join(manifest.get('beam_args') or []) or '(none)'}`."))
    incomplete = common.incomplete_runs(run_output)
    if incomplete:
        blocks.append(Alert(f"This folder also holds files of {len(incomplete)} run(s) that never committed "
                               f"({', '.join(sorted(incomplete))}): interrupted or still running. They are not "
                               "part of this report; readers of the tables must skip them too (README, reading "
                               "the outputs)."))

    blocks.append(Heading("Counts"))
    total = run["predictions"] + run["dead_letters"]
    holds = manifest.get("invariant_holds")
    blocks.append(Para(
        f"**{counts.get('inputs_listed', '?')}** inputs listed → **{run['predictions']}** predictions + "
        f"**{run['dead_letters']}** dead letters = {total}. The count invariant (every input ends in exactly one "
        f"of the two tables, counted from the listing, the Parquet footers and exit_stats) "
        + ("**holds**." if holds else "**is violated**: see the run's manifest.")))
    sum_ratios = sum(s["exit_ratio"] or 0.0 for s in stats)
    blocks.append(Heading("Stages"))
    blocks.append(Para("Exit ratio is the paper's: the share of all predictions that exit at the stage (it sums "
                       f"to 100 % over the stages; here {pct(sum_ratios)}). Stage 0 is reading the inputs."))
    rows = []
    for s in stats:
        if s["stage"] == 0:
            rows.append(["0", "read inputs", "-", str(s["records_in"]), str(s["records_failed"]), "-", "-", "-", "-",
                         "-"])
            continue
        rows.append([str(s["stage"]), s["model"], "-" if s["threshold"] is None else f"{s['threshold']:.4f}",
                     str(s["records_in"]), str(s["records_failed"]), str(s["records_exited"]), pct(s["exit_ratio"]),
                     pct(s["exit_ratio_of_reached"]), pct(s["accuracy_exited"]) +
                     (f" of {s['labelled_exited']}" if s["labelled_exited"] else ""), f"{s['cumulative_gmacs']:.3f}"])
    blocks.append(TableBlock(["stage", "model", "threshold", "records in", "failed", "exited", "exit ratio",
                              "exited of those classified here", "accuracy of exited (labelled)",
                              "cumulative GMACs"], rows, "lllrrrrrrr"))

    blocks.append(Heading("Cost and accuracy"))
    last = run["last_model_gmacs"]
    cost = ("no prediction" if run["avg_gmacs"] is None else
            f"average **{run['avg_gmacs']:.3f}** GMACs per record ({run['avg_gmacs'] / last:.0%} of the last model "
            f"alone, {last:.3f}); worst case (every stage) {run['worst_case_gmacs']:.3f}")
    labelled = sum(s["labelled_exited"] for s in stats)
    acc = ("no labelled record" if run["accuracy"] is None
           else f"accuracy **{pct(run['accuracy'], 2)}** on the {labelled} labelled predictions")
    blocks.append(Para(f"GMACs are multiply-adds × 10⁹: {cost}. {acc[0].upper()}{acc[1:]}."))

    blocks.append(Heading("Against the calibration"))
    rows_drift = drift(stats, expected, margin)
    if not rows_drift:
        blocks.append(Para("The config has no `calibration:` block with `expected_exit_ratios`, so there is "
                           "nothing to compare with (a config written by `pipelines.calibrate` has one)."))
    else:
        blocks.append(Para(f"Calibrated for `{cal.get('target')}` on {cal.get('data') or 'unrecorded data'}"
                           + (f" ({cal['heldout_records']} held-out records)" if cal.get("heldout_records") else "")
                           + f". Drift margin: {100 * margin:.0f} points of exit ratio per stage."))
        table = [[f"exit ratio, stage {d['stage']} {d['model']}", pct(d["expected"]),
                  f"within {100 * margin:.0f} points", pct(d["run"]),
                  f"{100 * ((d['run'] or 0) - d['expected']):+.1f}", "**NO**" if d["drifts"] else "yes"]
                 for d in rows_drift]
        table += [[p["figure"], p["calibrated"], p["promised"], p["run"], p["difference"], p["holds"]]
                  for p in promises(cal, run)]
        blocks.append(TableBlock(["figure", "calibration (held out)", "promised on data alike", "this run",
                                  "difference (points)", "holds"], table))
        drifted = [d for d in rows_drift if d["drifts"]]
        if drifted:
            worst = max(drifted, key=lambda d: abs((d["run"] or 0) - d["expected"]))
            blocks.append(Alert(
                f"The exit ratios of this run drift from the calibration's by more than {100 * margin:.0f} points "
                f"(stage {worst['stage']}: {pct(worst['run'])} here, {pct(worst['expected'])} expected). The data "
                "is not like the calibration data, so the accuracy and cost the calibration promised may not "
                "hold: calibrate on labelled records like these (docs/CALIBRATION.md)."))

    blocks.append(Heading("Plots"))
    images["exit_ratios.png"] = plot_exit_ratios(stats, expected)
    blocks.append(Image("exit_ratios.png", "exit ratio per stage"))
    if pred["confidence"]:
        images["confidence_by_stage.png"] = plot_confidence(stats, pred, str(config.get("confidence", "")).lower())
        blocks.append(Image("confidence_by_stage.png", "confidence of the records exiting at each stage"))
    keep = [i for i, lab in enumerate(pred["label"]) if lab is not None]
    if keep:
        conf = np.asarray(pred["confidence"], dtype=float)[keep]
        correct = np.asarray([pred["label"][i] == pred["pred_class"][i] for i in keep])
        table = reliability(conf, correct)
        images["reliability.png"] = plot_reliability(table)
        blocks.append(Image("reliability.png", "accuracy vs confidence"))
        blocks.append(TableBlock(["confidence", "records", "accuracy"],
                                 [[f"{lo:.1f}-{hi:.1f}", str(n), pct(a)] for lo, hi, a, n in table]))
        blocks.append(Heading("Top confusions (labelled records)"))
        top = confusions(pred)
        blocks.append(TableBlock(["true class", "predicted class", "records"], [[a, b, str(n)] for a, b, n in top],
                                 "llr") if top else Para("No labelled record was misclassified."))
    else:
        blocks.append(Para("No labelled record: no accuracy, reliability or confusions."))

    blocks.append(Heading("Dead letters"))
    if not dead:
        blocks.append(Para("None."))
    else:
        by = collections.defaultdict(list)
        for d in dead:
            by[d["category"]].append(d)
        rows = []
        for category, items in sorted(by.items(), key=lambda kv: -len(kv[1])):
            stages = ", ".join(str(s) for s in sorted({d["stage"] for d in items}))
            examples = "; ".join(f"`{d['uri']}`: {d['error']}" for d in items[:EXAMPLES_PER_CATEGORY])
            rows.append([category, str(len(items)), stages, examples])
        blocks.append(TableBlock(["category", "records", "stage(s)", f"examples (up to {EXAMPLES_PER_CATEGORY})"],
                                 rows, "lrll"))
    figures = {"run_id": run_id, "sum_exit_ratios": sum_ratios, "drift": rows_drift,
               "dead_letters_by_category": dict(collections.Counter(d["category"] for d in dead))}
    return blocks, images, figures


def write_report(run_output: str, output: Optional[str] = None, run_id: Optional[str] = None,
                 margin: float = DRIFT_MARGIN) -> dict:
    """Write report.md, report.html and the PNGs into ``output`` (default ``<run_output>/report``)."""
    output = (output or f"{run_output.rstrip('/')}/report").rstrip("/")
    blocks, images, figures = build_report(run_output, run_id, margin)
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    for name, data in images.items():
        fs.pipe_file(f"{path}/{name}", data)
    fs.pipe_file(f"{path}/report.md", to_markdown(blocks).encode())
    fs.pipe_file(f"{path}/report.html", to_html(blocks, f"Run {figures['run_id']}", images).encode())
    return {**figures, "output": output, "files": ["report.md", "report.html", *images]}
