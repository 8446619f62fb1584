"""The report of an output folder of pipelines.cascade, for a person: every committed run together (the folder
as one dataset: a table of its runs, the counts and the invariant over all of them, their stages combined when
they share one cascade) or one run (``--run_id``). ``report.md`` and the same as one self-contained
``report.html`` (images inlined), with its plots beside them. Called by ``python -m pipelines.report --run DIR``.

The report is a list of blocks (headings, paragraphs, tables, images, warnings) rendered twice, so that the
Markdown and the HTML say the same. Figures come from the run's committed tables only
(``pipelines.folder.RunFolder.read`` with the run's id); a folder without a committed run is refused.
"""

from __future__ import annotations

import base64
import collections
import html
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import fsspec
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import yaml

from configs import schema
from models.calibration import MIN_SHADOW_RECORDS, shadow_agreement, wilson_interval
from pipelines.folder import REPORT, REPORT_FILES, RunFolder

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


def shadow_figures(stats: Sequence[dict], cal: dict, aggregation: str) -> Optional[dict]:
    """The shadow sample's agreement with the last stage, overall and per stage, against the calibration's
    promised agreement where its reference is what the last stage answers (None: the run had no shadow)."""
    shadow = shadow_agreement(stats, aggregation)
    if shadow is None:
        return None
    promised = None
    if cal.get("heldout_agreement") is not None and cal.get("agreement_reference") == shadow.reference:
        promised = cal["heldout_agreement"] - (cal.get("agreement_margin") or 0.0)
    agreement = shadow.agreement
    return {"records": shadow.records, "complete": shadow.complete, "agreed": shadow.agreed, "agreement": agreement,
            "low": shadow.low, "high": shadow.high, "reference": shadow.reference,
            "calibrated_reference": cal.get("agreement_reference"), "promised": promised,
            "holds": None if promised is None or agreement is None else agreement >= promised,
            "avg_shadow_gmacs": stats[0].get("avg_shadow_gmacs"), "trusted": shadow.complete >= MIN_SHADOW_RECORDS}


def shadow_blocks(stats: Sequence[dict], figures: dict) -> list:
    """The report's section on the shadow sample."""
    f = figures
    out: list = [Para(
        f"**{f['records']}** records were shadowed (config `shadow`): they went through every stage, and their rows "
        f"keep the cascade's decision. Of them, {f['complete']} reached the last stage, whose answer (here "
        f"`{f['reference']}`) the cascade's decision equals on **{pct(f['agreement'], 2)}** "
        f"(95 % interval {pct(f['low'], 1)}-{pct(f['high'], 1)}). The shadow cost "
        + ("-" if f["avg_shadow_gmacs"] is None else f"{f['avg_shadow_gmacs']:.3f}")
        + " GMACs per prediction beyond the cascade's own (not in the average GMACs above).")]
    rows = []
    for s in (s for s in stats if s["stage"] >= 1):
        rows.append([str(s["stage"]), s["model"], str(s["shadow_exited"]), pct(s["shadow_agreement"], 2),
                     "-" if s["shadow_agreement_low"] is None else
                     f"{pct(s['shadow_agreement_low'])}-{pct(s['shadow_agreement_high'])}",
                     pct(s["shadow_last_accuracy"])])
    out.append(TableBlock(["stage", "model", "shadow records exited here", "agreement with the last stage",
                           "95 % interval", "last stage's accuracy on them (labelled)"], rows, "llrrrr"))
    if f["promised"] is not None:
        out.append(Para(f"The calibration promised agreement >= {pct(f['promised'], 2)} with "
                        f"`{f['reference']}`: " + ("it holds." if f["holds"] else "**it does not hold**.")))
        if not f["holds"]:
            out.append(Alert(
                f"The shadow sample agrees with `{f['reference']}` on {pct(f['agreement'], 2)} of its records "
                f"(95 % interval {pct(f['low'], 1)}-{pct(f['high'], 1)}), below the {pct(f['promised'], 2)} the "
                "calibration promised: the thresholds have gone stale on this data. Recalibrate from this run: "
                "`python -m pipelines.calibrate --from_run` (docs/CALIBRATION.md)."))
    elif f["calibrated_reference"]:
        out.append(Para(f"The calibration's agreement is with `{f['calibrated_reference']}`, not with what this "
                        f"run's last stage answers (`{f['reference']}`): the two are not compared."))
    if not f["trusted"]:
        out.append(Alert(f"Only {f['complete']} shadow records reached the last stage: below "
                         f"{MIN_SHADOW_RECORDS}, the agreement and a threshold recalibrated from them are too noisy "
                         "to trust (docs/CALIBRATION.md); raise `shadow`."))
    return out


CONFIDENCE_BINS = np.linspace(0.0, 1.0, 21)  # the confidence plot's bins
RELIABILITY_BINS = 10
RELIABILITY_EDGES = np.linspace(0.0, 1.0, RELIABILITY_BINS + 1)
REPORT_BATCH_ROWS = 65_536  # prediction rows read at a time: a report of 10^8 rows holds tallies, not rows
GROUPS = ("correct", "wrong", "unlabelled")


class Tallies:
    """What the report needs from the predictions table, tallied a batch of rows at a time, so that its memory
    does not grow with the run: per exit stage, confidence histograms of correct, wrong and unlabelled
    records; per reliability bin, labelled records and how many were right; counts of the (true, predicted)
    class pairs of wrong records, by name."""

    def __init__(self):
        self.rows = 0
        self.labelled = 0
        self.histograms: dict[int, np.ndarray] = {}  # exit stage -> (3 groups, bins) counts
        self.exited: dict[int, np.ndarray] = {}  # exit stage -> records per group (confidences outside the bins too)
        self.reliability_n = np.zeros(RELIABILITY_BINS, dtype=np.int64)
        self.reliability_correct = np.zeros(RELIABILITY_BINS, dtype=np.int64)
        self.pairs: collections.Counter = collections.Counter()

    def add(self, batch) -> None:
        """A record batch with the columns label, label_name, pred_class, pred_name, confidence, exit_stage."""
        n = batch.num_rows
        if not n:
            return
        self.rows += n
        cols = {name: batch.column(name) for name in batch.schema.names}
        labelled = cols["label"].is_valid().to_numpy(zero_copy_only=False)
        label = cols["label"].fill_null(-1).to_numpy(zero_copy_only=False)
        pred = cols["pred_class"].to_numpy(zero_copy_only=False)
        conf = cols["confidence"].fill_null(np.nan).to_numpy(zero_copy_only=False).astype(float)
        stage = cols["exit_stage"].to_numpy(zero_copy_only=False)
        correct = labelled & (label == pred)
        wrong = labelled & ~correct
        for k in np.unique(stage):
            here = stage == k
            hist = self.histograms.setdefault(int(k), np.zeros((len(GROUPS), len(CONFIDENCE_BINS) - 1), np.int64))
            exited = self.exited.setdefault(int(k), np.zeros(len(GROUPS), np.int64))
            for g, mask in enumerate((correct, wrong, ~labelled)):
                hist[g] += np.histogram(conf[here & mask], bins=CONFIDENCE_BINS)[0]
                exited[g] += int((here & mask).sum())
        self.labelled += int(labelled.sum())
        which = np.clip(np.digitize(conf[labelled], RELIABILITY_EDGES[1:-1]), 0, RELIABILITY_BINS - 1)
        self.reliability_n += np.bincount(which, minlength=RELIABILITY_BINS)
        self.reliability_correct += np.bincount(which, weights=correct[labelled], minlength=RELIABILITY_BINS
                                                ).astype(np.int64)
        if wrong.any():
            picked = pa.Table.from_batches([batch.filter(pa.array(wrong))]).select(
                ["label", "label_name", "pred_class", "pred_name"])
            counted = picked.group_by(["label", "label_name", "pred_class", "pred_name"]).aggregate(
                [("label", "count")])
            for lab, ln, pc, pn, count in zip(*(counted.column(c).to_pylist() for c in
                                                ("label", "label_name", "pred_class", "pred_name", "label_count"))):
                self.pairs[(ln or str(lab), pn or str(pc))] += count

    def reliability(self) -> list[tuple[float, float, float, int]]:
        """(bin low, bin high, accuracy, records) for each non-empty confidence bin of [0, 1]."""
        edges = RELIABILITY_EDGES
        return [(float(edges[b]), float(edges[b + 1]), float(self.reliability_correct[b] / self.reliability_n[b]),
                 int(self.reliability_n[b])) for b in range(RELIABILITY_BINS) if self.reliability_n[b]]

    def confusions(self, top: int = TOP_CONFUSIONS) -> list[tuple[str, str, int]]:
        """The most frequent (true class, predicted class) pairs among wrong labelled predictions, by name."""
        return [(a, b, n) for (a, b), n in self.pairs.most_common(top)]


def tally_predictions(run_output: str, run_ids: str | Sequence[str]) -> Tallies:
    tallies = Tallies()
    columns = ["label", "label_name", "pred_class", "pred_name", "confidence", "exit_stage"]
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    for batch in RunFolder(run_output).batches("predictions", columns, REPORT_BATCH_ROWS, run_ids):
        tallies.add(batch)
    return tallies


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


def plot_confidence(stats: Sequence[dict], tallies: Tallies, confidence: str) -> bytes:
    """Per stage, the confidence of the records exiting there (stacked: correct, wrong, unlabelled), with
    the stage's threshold: a record exits at a stage once its confidence reaches the threshold."""
    stages = [s for s in stats if s["stage"] >= 1]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False, sharey=False)
    bins = CONFIDENCE_BINS
    centres = (bins[:-1] + bins[1:]) / 2
    colours = {"correct": "tab:green", "wrong": "tab:red", "unlabelled": "tab:grey"}
    for ax, s in zip(axes[0], stages):
        hist = tallies.histograms.get(s["stage"], np.zeros((len(GROUPS), len(bins) - 1), np.int64))
        per_group = tallies.exited.get(s["stage"], np.zeros(len(GROUPS), np.int64))
        exited = int(per_group.sum())
        groups = [(hist[g], name, colours[name]) for g, name in enumerate(GROUPS) if per_group[g]]
        if groups:  # the tallied counts drawn as the histograms they are
            ax.hist([centres] * len(groups), bins=bins, weights=[g[0] for g in groups], stacked=True,
                    color=[g[2] for g in groups], label=[g[1] for g in groups])
        if s["threshold"] is not None:
            ax.axvline(s["threshold"], color="black", ls="--", lw=1.2, label=f"threshold {s['threshold']:.3f}")
        if not groups:
            ax.text(0.5, 0.5, "no record exited here", transform=ax.transAxes, ha="center", fontsize=9)
        last = " (last: all exit)" if s["threshold"] is None else ""
        ax.set_title(f"stage {s['stage']} {s['model']}: {exited} exited{last}", fontsize=9)
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


@dataclass
class DeadLetterTally:
    """One category of a run's dead letters: how many, at which stages, and the first few rows."""

    records: int = 0
    stages: set = field(default_factory=set)
    examples: list = field(default_factory=list)


def tally_dead_letters(run_output: str, run_ids: Sequence[str]) -> dict[str, DeadLetterTally]:
    """The runs' dead letters by category, read a batch at a time."""
    out: dict[str, DeadLetterTally] = {}
    columns = ["category", "stage", "uri", "error"]
    for batch in RunFolder(run_output).batches("dead_letter", columns, REPORT_BATCH_ROWS, list(run_ids)):
        for d in batch.to_pylist():
            tally = out.setdefault(d["category"], DeadLetterTally())
            tally.records += 1
            tally.stages.add(d["stage"])
            if len(tally.examples) < EXAMPLES_PER_CATEGORY:
                tally.examples.append(d)
    return out


# ---- the report --------------------------------------------------------------------------------------------

def combine(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """The exit_stats rows of several runs of one cascade as one run's: counts added, ratios and averages
    computed again from them (a threshold that differs between runs is None, with ``threshold_varies``)."""
    if len(runs) == 1:
        return [dict(s, threshold_varies=False) for s in sorted(runs[0], key=lambda s: s["stage"])]
    by_stage = collections.defaultdict(list)
    for stats in runs:
        for s in stats:
            by_stage[s["stage"]].append(s)
    predictions = sum(stats[0]["predictions"] for stats in runs)
    dead = sum(stats[0]["dead_letters"] for stats in runs)
    labelled = sum(s["labelled_exited"] for stats in runs for s in stats)
    correct = sum((s["accuracy_exited"] or 0.0) * s["labelled_exited"] for stats in runs for s in stats)
    exited_cost = sum(s["records_exited"] * s["cumulative_gmacs"] for stats in runs for s in stats if s["stage"] >= 1)
    out = []
    for stage, rows in sorted(by_stage.items()):
        first = rows[0]
        thresholds = {r["threshold"] for r in rows}
        exited = sum(r["records_exited"] for r in rows)
        reached = sum(r["records_in"] - r["records_failed"] for r in rows)
        labelled_here = sum(r["labelled_exited"] for r in rows)
        out.append({**first, "threshold": first["threshold"] if len(thresholds) == 1 else None,
                    "threshold_varies": len(thresholds) > 1,
                    "records_in": sum(r["records_in"] for r in rows), "records_exited": exited,
                    "records_failed": sum(r["records_failed"] for r in rows),
                    "exit_ratio": exited / predictions if predictions and stage >= 1 else None,
                    "exit_ratio_of_reached": exited / reached if reached and stage >= 1 else None,
                    "labelled_exited": labelled_here,
                    "accuracy_exited": (sum((r["accuracy_exited"] or 0.0) * r["labelled_exited"] for r in rows)
                                        / labelled_here) if labelled_here else None,
                    **_shadow_combined(rows, runs),
                    "total_inputs": sum(r["total_inputs"] for r in rows), "predictions": predictions,
                    "dead_letters": dead, "avg_gmacs": exited_cost / predictions if predictions else None,
                    "accuracy": correct / labelled if labelled else None})
    return out


def _shadow_combined(rows: Sequence[dict], runs: Sequence[Sequence[dict]]) -> dict:
    """One stage's shadow columns over several runs: counts added, the agreement and its interval computed again;
    the last stage's accuracy on them only when one run has shadow rows (its labelled count is not recorded)."""
    if "shadow_exited" not in rows[0]:
        return {}
    exited, agreed = sum(r["shadow_exited"] or 0 for r in rows), sum(r["shadow_agreed"] or 0 for r in rows)
    low, high = wilson_interval(agreed, exited)
    with_shadow = [r for r in rows if r["shadow_exited"]]
    shadowed = sum(stats[0].get("shadow_records") or 0 for stats in runs)
    return {"shadow_exited": exited, "shadow_agreed": agreed, "shadow_agreement": agreed / exited if exited else None,
            "shadow_agreement_low": low, "shadow_agreement_high": high,
            "shadow_last_accuracy": with_shadow[0]["shadow_last_accuracy"] if len(with_shadow) == 1 else None,
            "shadow_records": shadowed,
            "avg_shadow_gmacs": (sum((s[0].get("avg_shadow_gmacs") or 0.0) * s[0]["predictions"] for s in runs)
                                 / max(1, sum(s[0]["predictions"] for s in runs))) if shadowed else None}


def calibration_mismatch(record: dict) -> Optional[str]:
    """Why the calibration block of a run's config does not describe the run (None when it does)."""
    try:
        return schema.calibration_mismatch(schema.from_yaml(record.get("config") or ""))
    except schema.ConfigError as err:
        return f"its config no longer loads ({err})"


def _cascade_of(stats: Sequence[dict]) -> tuple:
    return tuple((s["stage"], s["model"]) for s in stats)


def _runs_table(records: Sequence[dict], by_run: dict[str, list[dict]], applies: dict[str, Optional[str]]
                ) -> TableBlock:
    rows = []
    for record in records:
        counts, run = record.get("counts") or {}, by_run[record["run_id"]][0]
        rows.append([f"`{record['run_id']}`", record.get("started_utc") or "?", str(record.get("profile")),
                     str(counts.get("inputs_listed", "?")), str(counts.get("inputs_skipped") or 0),
                     str(run["predictions"]), str(run["dead_letters"]),
                     "yes" if record.get("invariant_holds") else "**NO**",
                     "-" if run["avg_gmacs"] is None else f"{run['avg_gmacs']:.3f}",
                     "yes" if applies[record["run_id"]] is None else "no"])
    return TableBlock(["run", "started (UTC)", "config", "inputs listed", "skipped", "predictions", "dead letters",
                       "invariant", "average GMACs", "calibration applies"], rows, "lllrrrrlrl")


def stage_blocks(stats: Sequence[dict], sum_ratios: float) -> list:
    """The stages table (exit_stats rows, one run's or several runs' combined)."""
    rows = []
    for s in stats:
        if s["stage"] == 0:
            rows.append(["0", "read inputs", "-", str(s["records_in"]), str(s["records_failed"]), "-", "-", "-", "-",
                         "-"])
            continue
        threshold = "varies by run" if s.get("threshold_varies") else (
            "-" if s["threshold"] is None else f"{s['threshold']:.4f}")
        rows.append([str(s["stage"]), s["model"], threshold, str(s["records_in"]), str(s["records_failed"]),
                     str(s["records_exited"]), pct(s["exit_ratio"]), pct(s["exit_ratio_of_reached"]),
                     pct(s["accuracy_exited"]) + (f" of {s['labelled_exited']}" if s["labelled_exited"] else ""),
                     f"{s['cumulative_gmacs']:.3f}"])
    return [Heading("Stages"),
            Para("Exit ratio is the paper's: the share of all predictions that exit at the stage (it sums to 100 % "
                 f"over the stages; here {pct(sum_ratios)}). Stage 0 is reading the inputs."),
            TableBlock(["stage", "model", "threshold", "records in", "failed", "exited", "exit ratio",
                        "exited of those classified here", "accuracy of exited (labelled)", "cumulative GMACs"],
                       rows, "lllrrrrrrr")]


def cost_blocks(stats: Sequence[dict]) -> list:
    run = stats[0]
    last = run["last_model_gmacs"]
    cost = ("no prediction" if run["avg_gmacs"] is None else
            f"average **{run['avg_gmacs']:.3f}** GMACs per record ({run['avg_gmacs'] / last:.0%} of the last model "
            f"alone, {last:.3f}); worst case (every stage) {run['worst_case_gmacs']:.3f}")
    labelled = sum(s["labelled_exited"] for s in stats)
    acc = ("no labelled record" if run["accuracy"] is None
           else f"accuracy **{pct(run['accuracy'], 2)}** on the {labelled} labelled predictions")
    return [Heading("Cost and accuracy"), Para(f"GMACs are multiply-adds × 10⁹: {cost}. {acc[0].upper()}{acc[1:]}.")]


def calibration_blocks(blocks: list, records: Sequence[dict], by_run: dict[str, list[dict]],
                       applies: dict[str, Optional[str]], cal: dict, margin: float, single: bool) -> list[dict]:
    """The run(s) against the calibration block, over the runs whose config is the calibrated cascade (a run
    with other stages or thresholds is named: the block's figures do not apply to it); returns the drift."""
    blocks.append(Heading("Against the calibration"))
    expected = cal.get("expected_exit_ratios")
    if not expected:
        blocks.append(Para("The config has no `calibration:` block with `expected_exit_ratios`, so there is "
                           "nothing to compare with (a config written by `pipelines.calibrate` has one)."))
        return []
    others = {rid: why for rid, why in applies.items() if why is not None}
    if others:
        blocks.append(Alert("The calibration figures do not apply to " + ("this run" if single else "run(s) "
                            + ", ".join(sorted(others))) + ": " + next(iter(others.values()))
                            + ". Its exit ratios, accuracy and cost were measured for another cascade."))
    matching = [r["run_id"] for r in records if applies[r["run_id"]] is None
                and by_run[r["run_id"]][0]["predictions"] > 0]
    if not matching:
        if not others:
            blocks.append(Para("Nothing was classified by a run of the calibrated cascade: nothing to compare."))
        return []
    stats = combine([by_run[rid] for rid in matching])
    run = stats[0]
    blocks.append(Para(f"Calibrated for `{cal.get('target')}` on {cal.get('data') or 'unrecorded data'}"
                       + (f" ({cal['heldout_records']} held-out records)" if cal.get("heldout_records") else "")
                       + ("" if single and not others else f"; compared with the {run['predictions']} predictions of "
                          f"run(s) {', '.join(matching)}")
                       + f". Drift margin: {100 * margin:.0f} points of exit ratio per stage."))
    rows_drift = drift(stats, expected, margin)
    table = [[f"exit ratio, stage {d['stage']} {d['model']}", pct(d["expected"]), f"within {100 * margin:.0f} points",
              pct(d["run"]), f"{100 * ((d['run'] or 0) - d['expected']):+.1f}", "**NO**" if d["drifts"] else "yes"]
             for d in rows_drift]
    table += [[p["figure"], p["calibrated"], p["promised"], p["run"], p["difference"], p["holds"]]
              for p in promises(cal, run)]
    blocks.append(TableBlock(["figure", "calibration (held out)", "promised on data alike", "this run" if single
                              else "these runs", "difference (points)", "holds"], table))
    drifted = [d for d in rows_drift if d["drifts"]]
    if drifted:
        worst = max(drifted, key=lambda d: abs((d["run"] or 0) - d["expected"]))
        blocks.append(Alert(
            f"The exit ratios of {'this run' if single else 'these runs'} drift from the calibration's by more than "
            f"{100 * margin:.0f} points (stage {worst['stage']}: {pct(worst['run'])} here, {pct(worst['expected'])} "
            "expected). The data is not like the calibration data, so the accuracy and cost the calibration "
            "promised may not hold: calibrate on labelled records like these (docs/CALIBRATION.md)."))
    return rows_drift


def build_report(run_output: str, run_id: Optional[str] = None,
                 margin: float = DRIFT_MARGIN) -> tuple[list, dict[str, bytes], dict]:
    """(blocks, PNGs by name, figures) of the folder's committed runs together, or of run ``run_id``;
    FileNotFoundError for a folder without a committed run."""
    folder = RunFolder(run_output)
    records = [folder.record(run_id)] if run_id else (folder.records() or [folder.record()])
    run_ids = [r["run_id"] for r in records]
    by_run: dict[str, list[dict]] = collections.defaultdict(list)
    for row in folder.read("exit_stats", run_ids).to_pylist():
        by_run[row["run_id"]].append(row)
    by_run = {rid: sorted(rows, key=lambda s: s["stage"]) for rid, rows in by_run.items()}
    latest = records[-1]
    config = yaml.safe_load(latest["config"]) or {}
    cal = calibration_block(latest)
    applies = {r["run_id"]: calibration_mismatch(r) for r in records}
    one_cascade = len({_cascade_of(by_run[rid]) for rid in run_ids}) == 1
    stats = combine([by_run[rid] for rid in run_ids]) if one_cascade else []
    tallies = tally_predictions(run_output, run_ids)
    dead = tally_dead_letters(run_output, run_ids)
    counts = [r.get("counts") or {} for r in records]
    listed = sum(c.get("inputs_listed") or 0 for c in counts)
    skipped = sum(c.get("inputs_skipped") or 0 for c in counts)
    predictions = sum(by_run[rid][0]["predictions"] for rid in run_ids)
    dead_letters = sum(by_run[rid][0]["dead_letters"] for rid in run_ids)
    images: dict[str, bytes] = {}
    single = len(records) == 1
    title = f"Run {run_ids[0]}" if single else f"Output folder: {len(records)} committed runs"
    blocks: list = [Heading(title, 1)]
    if single:
        blocks.append(Para(f"Output folder `{run_output}`; started {latest.get('started_utc', '?')}, finished "
                           f"{latest.get('finished_utc', '?')} ({latest.get('wall_seconds', 0):.0f} s); config "
                           f"`{latest.get('profile')}` over `{config.get('input', '?')}`; runner flags "
                           f"`{' '.join(latest.get('beam_args') or []) or '(none)'}`."))
    else:
        blocks.append(Para(f"Output folder `{run_output}`: every committed run together, from {run_ids[0]} to "
                           f"{run_ids[-1]} (`--run_id` reports one). Each id was classified by one run (`--skip_done`"
                           " skips the ids earlier runs have), so the runs add up to one dataset."))
        blocks.append(_runs_table(records, by_run, applies))
    incomplete = folder.incomplete_runs()
    if incomplete:
        blocks.append(Alert(f"This folder also holds files of {len(incomplete)} run(s) that never committed "
                               f"({', '.join(sorted(incomplete))}): interrupted or still running. They are not "
                               "part of this report; readers of the tables must skip them too (docs/OUTPUTS.md)."))

    blocks.append(Heading("Counts"))
    holds = all(r.get("invariant_holds") for r in records) and listed == skipped + predictions + dead_letters
    blocks.append(Para(
        f"**{listed}** inputs listed → " + (f"**{skipped}** skipped (an earlier run has their ids) + " if skipped
                                            else "")
        + f"**{predictions}** predictions + **{dead_letters}** dead letters = {skipped + predictions + dead_letters}."
        " The count invariant (every input ends skipped or in exactly one of the two tables, counted from the "
        "listing, the Parquet footers and exit_stats) " + ("**holds**." if holds else "**is violated**: see the run "
                                                           "records (`runs/<run_id>.json`).")))
    label_errors = sum(s.get("label_errors") or 0 for rid in run_ids for s in by_run[rid])
    if label_errors:
        blocks.append(Para(f"{label_errors} predictions are unlabelled because their label could not be used "
                           "(not a class index, out of range): the images were classified all the same; the "
                           "`label_error` column of `predictions` says why for each."))
    nothing = [rid for rid in run_ids if by_run[rid][0]["predictions"] == 0]
    if predictions == 0:
        blocks.append(Alert(f"{'This run' if single else 'No run of this folder'} classified nothing: "
                            f"{skipped} input(s) skipped and {dead_letters} dead-lettered. There are no exit "
                            "ratios, cost or accuracy to report, and nothing to hold against the calibration."))
    elif nothing:
        blocks.append(Para(f"Run(s) {', '.join(nothing)} classified nothing (their inputs were skipped or "
                           "dead-lettered); the figures below come from the others."))
    sum_ratios = sum(s["exit_ratio"] or 0.0 for s in stats)
    rows_drift: list[dict] = []
    if predictions and not one_cascade:
        blocks.append(Heading("Stages"))
        blocks.append(Para("The runs of this folder do not share one cascade (their stages differ): their stages "
                           "cannot be added up. Report each with `--run_id`; the table of runs above has each one's "
                           "counts and cost."))
    elif predictions:
        blocks += stage_blocks(stats, sum_ratios)
        blocks += cost_blocks(stats)
        rows_drift = calibration_blocks(blocks, records, by_run, applies, cal, margin, single)
    shadow = shadow_figures(stats, cal, str(config.get("aggregation", "logits"))) if stats and predictions else None
    if shadow is not None:
        blocks.append(Heading("Shadow sample: agreement with the last stage"))
        blocks += shadow_blocks(stats, shadow)
    if predictions and one_cascade:
        expected = cal.get("expected_exit_ratios") if all(v is None for v in applies.values()) else None
        blocks.append(Heading("Plots"))
        images["exit_ratios.png"] = plot_exit_ratios(stats, expected)
        blocks.append(Image("exit_ratios.png", "exit ratio per stage"))
        if tallies.rows:
            images["confidence_by_stage.png"] = plot_confidence(stats, tallies,
                                                                str(config.get("confidence", "")).lower())
            blocks.append(Image("confidence_by_stage.png", "confidence of the records exiting at each stage"))
    if tallies.labelled:
        table = tallies.reliability()
        images["reliability.png"] = plot_reliability(table)
        blocks.append(Image("reliability.png", "accuracy vs confidence"))
        blocks.append(TableBlock(["confidence", "records", "accuracy"],
                                 [[f"{lo:.1f}-{hi:.1f}", str(n), pct(a)] for lo, hi, a, n in table]))
        blocks.append(Heading("Top confusions (labelled records)"))
        top = tallies.confusions()
        blocks.append(TableBlock(["true class", "predicted class", "records"], [[a, b, str(n)] for a, b, n in top],
                                 "llr") if top else Para("No labelled record was misclassified."))
    elif predictions:
        blocks.append(Para("No labelled record: no accuracy, reliability or confusions."))

    blocks.append(Heading("Dead letters"))
    if not dead:
        blocks.append(Para("None."))
    else:
        rows = []
        for category, tally in sorted(dead.items(), key=lambda kv: -kv[1].records):
            rows.append([category, str(tally.records), ", ".join(str(s) for s in sorted(tally.stages)),
                         "; ".join(f"`{d['uri']}`: {d['error']}" for d in tally.examples)])
        blocks.append(TableBlock(["category", "records", "stage(s)", f"examples (up to {EXAMPLES_PER_CATEGORY})"],
                                 rows, "lrll"))
    figures = {"run_id": run_ids[-1], "run_ids": run_ids, "title": title, "sum_exit_ratios": sum_ratios,
               "shadow": shadow,
               "drift": rows_drift, "calibration_applies": {rid: why is None for rid, why in applies.items()},
               "dead_letters_by_category": {category: tally.records for category, tally in dead.items()}}
    return blocks, images, figures


def write_report(run_output: str, output: Optional[str] = None, run_id: Optional[str] = None,
                 margin: float = DRIFT_MARGIN) -> dict:
    """Write report.md, report.html and the PNGs into ``output`` (default ``<run_output>/report``, whose names
    the output folder knows as the project's own: ``--overwrite`` replaces them, and nothing else there)."""
    output = (output or f"{run_output.rstrip('/')}/{REPORT}").rstrip("/")
    blocks, images, figures = build_report(run_output, run_id, margin)
    files = {**images, "report.md": to_markdown(blocks).encode(),
             "report.html": to_html(blocks, figures["title"], images).encode()}
    unknown = sorted(set(files) - set(REPORT_FILES))
    if unknown:
        raise AssertionError(f"report files {unknown} are not in pipelines.folder.REPORT_FILES")
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{path}/{name}", data)
    return {**figures, "output": output, "files": ["report.md", "report.html", *images]}
