"""``--plan``: what a run will do and cost, printed before anything runs and without loading a model.

The inputs are counted, each stage's model, threshold and GMACs listed, and the compute of the run estimated
at the throughputs measured by benchmarks/ (``configs/estimate.py``). Expected exit ratios and the average cost
come from the config's ``calibration:`` block only when this config is the cascade that block was measured for
(``schema.calibration_mismatch``); otherwise the plan says so, estimates the worst case, and prints the block's
figures labelled as the calibrated cascade's.
"""

from __future__ import annotations

import os
from typing import Optional

from configs import estimate, schema
from configs.plan import build_plan
from pipelines import demo
from pipelines.job import bounded
from transforms.manifests import count_inputs, first_uri


def _hours(hours: float) -> str:
    """A duration for a person: hours, or minutes / seconds when short."""
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def _machine_line(name: str, machine: estimate.Machine, est: estimate.Estimate, gpu_decode: bool) -> list[str]:
    cascade, alone = est.cascade_compute(machine, gpu_decode), est.last_alone_compute(machine, gpu_decode)
    if cascade is None or alone is None:
        missing = sorted(set(est.keys) - set(machine.model_images_per_s))
        return [f"  {name}: no throughput figure for {', '.join(missing) or 'the inputs (no count)'}"]

    def cost(c: estimate.Compute) -> str:
        if machine.kind == "cpu":
            return (f"{_hours(c.hours)} of one such machine = {c.hours:,.4g} machine-hours ({c.core_hours:,.4g} "
                    f"core-hours); {1 / c.seconds_per_record:,.1f} records/s")
        return (f"{_hours(c.hours)} of one GPU worker = {c.hours:,.4g} GPU-hours; "
                f"{1 / c.seconds_per_record:,.0f} records/s")

    used = [f"{k} {machine.model_images_per_s[k]:,.1f} images/s" for k in dict.fromkeys(est.keys)]
    used.append(f"decoding {machine.decode_images_per_s_per_core:,.0f} images/s per core x {machine.cores}")
    if machine.kind == "gpu" and gpu_decode and machine.gpu_decode_images_per_s:
        used.append(f"nvJPEG {machine.gpu_decode_images_per_s:,.0f} images/s")
    if machine.overhead_s_per_record:
        used.append(f"pipeline overhead {1000 * machine.overhead_s_per_record:.1f} ms per record")
    return [
        f"  {name} ({machine.machine}; figures of {machine.date}):",
        f"    cascade: {cost(cascade)}, bound by {cascade.bound}",
        f"    {est.keys[-1]} alone: {cost(alone)}: the cascade takes {cascade.hours / alone.hours:.0%} of its time",
        "    figures used: " + "; ".join(used),
        "    sources: " + "; ".join(f"{k}: {v}" for k, v in machine.sources.items()),
    ]


def plan_lines(cfg: schema.CascadeConfig, profile: Optional[str], records: Optional[int], counted: str,
               figures: dict[str, estimate.Machine]) -> tuple[estimate.Estimate, list[str]]:
    """The --plan report: inputs, stages, expected exit ratios and GMACs, compute against the last model."""
    mismatch = schema.calibration_mismatch(cfg)
    cal = cfg.calibration
    try:
        run_plan = build_plan(cfg)  # no model is loaded: GMACs come from the registry's cache
        expected = None if mismatch or cal is None else cal.expected_exit_ratios
        est = estimate.estimate(run_plan, expected, records)
    except (schema.ConfigError, ValueError) as err:
        raise SystemExit(f"invalid config: {err}") from None
    lines = [f"plan of {profile} over {cfg.input or 'the embedded demo photos'}: "
             + (f"{records:,} inputs ({counted})" if records is not None else "inputs not counted"),
             "", "| stage | model | threshold | GMACs | cumulative GMACs | expected exit ratio | expected reach |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    reach = est.reach or [None] * len(est.keys)
    ratios = est.expected_exit_ratios or [None] * len(est.keys)
    for i, (key, t, g, c, ratio, r) in enumerate(zip(est.keys, est.thresholds, est.stage_gmacs,
                                                    est.cumulative_gmacs, ratios, reach), start=1):
        lines.append(f"| {i} | {key} | {'-' if t is None else f'{t:.4f}'} | {g:.3f} | {c:.3f} | "
                     f"{'?' if ratio is None else f'{ratio:.1%}'} | {'?' if r is None else f'{r:.1%}'} |")
    lines.append("")
    if cal is None or not cal.expected_exit_ratios:
        lines.append("the config has no calibration block (calibration.expected_exit_ratios): the exit ratios and "
                     "the average cost are unknown until it runs; compute below is the worst case, every record "
                     "through every stage (docs/CALIBRATION.md makes a calibrated config)")
    else:
        figures_of = "calibration" if mismatch is None else "the calibrated cascade's figures, NOT this run's"
        lines.append(f"{figures_of}: {cal.target or 'target not recorded'} on {cal.data or 'data not recorded'}"
                     + (f", {cal.heldout_records} held-out records" if cal.heldout_records else "")
                     + (f"; held-out accuracy {cal.heldout_accuracy:.2%}" if cal.heldout_accuracy is not None else "")
                     + (f" (margin {cal.margin:.2%})" if cal.margin is not None else "")
                     + (f"; held-out average GMACs {cal.heldout_gmacs:.3f}" if cal.heldout_gmacs is not None else "")
                     + ("" if mismatch is None else "; exit ratios "
                        + ", ".join(f"{r:.1%}" for r in cal.expected_exit_ratios)))
        if mismatch is not None:
            lines.append(f"the calibration does not describe this config: {mismatch}. The exit ratios and the "
                         "average cost of this run are unknown until it runs; compute below is the worst case")
    avg = "unknown" if est.avg_gmacs is None else f"expected average {est.avg_gmacs:.3f}"
    lines.append(f"GMACs (multiply-adds x1e9) per record: {avg}, worst case {est.worst_gmacs:.3f}; "
                 f"{est.keys[-1]} alone {est.last_model_gmacs:.3f}"
                 + ("" if est.avg_gmacs is None else f" (the cascade: {est.avg_gmacs / est.last_model_gmacs:.0%} "
                    "of it)"))
    if est.shadow:
        lines.append(f"shadow sample: {est.shadow:.1%} of the records also go through every stage"
                     + ("" if est.shadow_gmacs is None else f", about {est.shadow_gmacs:.3f} GMACs per record more")
                     + " (not in the average; the compute below includes it where the exit ratios are known)")
    lines += ["", f"compute for the {'expected' if est.reach else 'worst'} case, at throughputs measured by "
                  f"benchmarks/ ({os.path.relpath(estimate.FIGURES, os.getcwd()) if figures else 'no figures'}); "
                  f"the config's device is {cfg.device}:"]
    if not figures:
        lines.append("  no throughput figures (benchmarks/throughput_figures.json is absent)")
    for name, machine in figures.items():
        lines += _machine_line(name, machine, est, cfg.decode.gpu)
    return est, lines


def print_plan(cfg: schema.CascadeConfig, profile: Optional[str]) -> dict:
    """--plan: nothing runs and no model is loaded; prints the plan and returns it as a dict."""
    if cfg.input:
        records, counted = bounded(lambda: count_inputs(cfg.input), cfg)
    else:
        records, counted = len(demo.photos()), "photos inside scikit-image"
    figures = estimate.load_figures()
    est, lines = plan_lines(cfg, profile, records, counted, figures)
    # the read path: its bound for remote inputs (requests in flight / latency)
    lines += ["", *estimate.read_lines(bounded(lambda: first_uri(cfg.input), cfg) if cfg.input else None,
                                       cfg.read.in_flight, est,
                                       figures, cfg.decode.gpu)]
    lines.append("(nothing was run and no model was loaded)")
    print("\n".join(lines))
    return {"plan": True, "records": records, "stages": list(est.keys), "calibration_applies":
            schema.calibration_mismatch(cfg) is None, "expected_exit_ratios": est.expected_exit_ratios,
            "avg_gmacs": est.avg_gmacs, "worst_gmacs": est.worst_gmacs,
            "last_model_gmacs": est.last_model_gmacs}


