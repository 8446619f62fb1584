"""What a run will cost, before it runs: from a plan, the exit ratios its calibration expects and throughputs
measured by ``benchmarks/`` (``benchmarks/throughput_figures.json``), the expected and worst-case GMACs
per record and the compute of N records, next to the last model alone. No Beam, no models loaded.

The cost model is docs/SCALING.md's: stage k runs on the share ``reach[k]`` of the records that get to it
(reach[1] = 1, reach[k+1] = reach[k] - exit ratio of stage k) and decodes each of them again.
- A CPU machine (``cores`` cores, one process): seconds per record = sum_k reach[k] (1 / model_k +
  1 / (cores x decode per core)) + the per-record overhead of the pipeline.
- A GPU worker (1 GPU + ``cores`` vCPUs): records/s = min(cores x decode per core / decodes, 1 / G) with PIL
  decoding, or 1 / (G + decodes / GPU decode rate) with nvJPEG, where G = sum_k reach[k] / model_k.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from configs.plan import CascadePlan

FIGURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                       "throughput_figures.json")


@dataclass(frozen=True)
class Machine:
    """One reference machine's measured throughputs (an entry of ``throughput_figures.json``)."""

    name: str
    kind: str  # cpu | gpu
    machine: str
    date: str
    cores: int
    model_images_per_s: dict[str, float]
    decode_images_per_s_per_core: float
    overhead_s_per_record: float = 0.0
    gpu_decode_images_per_s: Optional[float] = None
    sources: dict[str, str] = field(default_factory=dict)


def load_figures(path: str = FIGURES) -> dict[str, Machine]:
    """The reference machines of a figures file, by name; none if the file is absent."""
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        machines = json.load(fh)["machines"]
    return {name: Machine(name=name, **entry) for name, entry in machines.items()}


def reach(exit_ratios: Sequence[float]) -> list[float]:
    """The share of records that get to each stage, from the paper's exit ratios (summing to 1)."""
    out, left = [], 1.0
    for ratio in exit_ratios:
        out.append(max(left, 0.0))
        left -= ratio
    return out


@dataclass(frozen=True)
class Compute:
    """The compute of a run on one reference machine."""

    machine: Machine
    seconds_per_record: float  # machine (CPU) or worker (GPU) seconds per record
    bound: str  # what limits it
    hours: float  # machine-hours (CPU) or GPU-hours (GPU) for the records

    @property
    def core_hours(self) -> float:
        return self.hours * self.machine.cores


def compute(machine: Machine, keys: Sequence[str], stage_reach: Sequence[float], records: int,
            gpu_decode: bool) -> Optional[Compute]:
    """The compute of ``records`` records through the stages ``keys`` reached by ``stage_reach``; None when
    the machine has no figure for one of the models."""
    if any(k not in machine.model_images_per_s for k in keys):
        return None
    rates = [machine.model_images_per_s[k] for k in keys]
    decodes = sum(stage_reach)
    model_s = sum(r / m for r, m in zip(stage_reach, rates))
    decode_rate = machine.cores * machine.decode_images_per_s_per_core
    if machine.kind == "cpu":
        seconds = model_s + decodes / decode_rate + machine.overhead_s_per_record
        bound = "CPU (models, decoding and the pipeline take turns)"
    elif gpu_decode and machine.gpu_decode_images_per_s:
        seconds = model_s + decodes / machine.gpu_decode_images_per_s + machine.overhead_s_per_record
        bound = "GPU (nvJPEG decoding and models)"
    else:
        cpu_s = decodes / decode_rate
        seconds, bound = (cpu_s, "CPU decoding") if cpu_s > model_s else (model_s, "GPU models")
        seconds += machine.overhead_s_per_record
    return Compute(machine, seconds, bound, records * seconds / 3600)


@dataclass(frozen=True)
class Estimate:
    keys: tuple[str, ...]
    thresholds: tuple[Optional[float], ...]
    stage_gmacs: tuple[float, ...]
    expected_exit_ratios: Optional[tuple[float, ...]]  # from the config's calibration block; None without one
    records: Optional[int]
    shadow: float = 0.0  # the config's shadow share: those records go through every stage

    @property
    def cumulative_gmacs(self) -> list[float]:
        total, out = 0.0, []
        for g in self.stage_gmacs:
            total += g
            out.append(total)
        return out

    @property
    def worst_gmacs(self) -> float:
        return sum(self.stage_gmacs)

    @property
    def last_model_gmacs(self) -> float:
        return self.stage_gmacs[-1]

    @property
    def reach(self) -> Optional[list[float]]:
        """The share of records each stage classifies: the cascade's, plus the shadow records it exited earlier."""
        if self.expected_exit_ratios is None:
            return None
        return [r + self.shadow * (1.0 - r) for r in reach(self.expected_exit_ratios)]

    @property
    def shadow_gmacs(self) -> Optional[float]:
        """GMACs per record the shadow sample costs beyond the cascade's (``avg_gmacs`` leaves them out)."""
        if self.expected_exit_ratios is None:
            return None
        return self.shadow * (self.worst_gmacs - self.avg_gmacs)

    @property
    def avg_gmacs(self) -> Optional[float]:
        if self.expected_exit_ratios is None:
            return None
        return sum(r * c for r, c in zip(self.expected_exit_ratios, self.cumulative_gmacs))

    def cascade_compute(self, machine: Machine, gpu_decode: bool) -> Optional[Compute]:
        """At the expected exit ratios, or in the worst case (every record through every stage) without them."""
        stage_reach = self.reach or [1.0] * len(self.keys)
        return None if self.records is None else compute(machine, self.keys, stage_reach, self.records, gpu_decode)

    def last_alone_compute(self, machine: Machine, gpu_decode: bool) -> Optional[Compute]:
        return None if self.records is None else compute(machine, self.keys[-1:], [1.0], self.records, gpu_decode)


def estimate(plan: CascadePlan, expected_exit_ratios: Optional[Sequence[float]], records: Optional[int]) -> Estimate:
    """The estimate of a plan. ``expected_exit_ratios`` must have one ratio per stage (else ValueError)."""
    if expected_exit_ratios is not None and len(expected_exit_ratios) != len(plan.stages):
        raise ValueError(f"calibration.expected_exit_ratios has {len(expected_exit_ratios)} ratios for "
                         f"{len(plan.stages)} stages")
    return Estimate(tuple(s.key for s in plan.stages), tuple(s.threshold for s in plan.stages),
                    tuple(s.gmacs for s in plan.stages),
                    None if expected_exit_ratios is None else tuple(expected_exit_ratios), records,
                    plan.settings.shadow)


REMOTE_SCHEMES = ("http://", "https://", "gs://", "s3://", "az://", "abfs://", "hf://")
READ_LATENCIES_S = (0.05, 0.2)  # typical object-store latencies per request (first byte), for the read bound


def read_bound(in_flight: int, latency_s: float) -> float:
    """Records/s one reader (a worker thread) can read at most: its reads in flight / the latency of one."""
    return in_flight / latency_s


def read_lines(first_uri: Optional[str], in_flight: int, est: Estimate, figures: dict[str, Machine],
               gpu_decode: bool) -> list[str]:
    """The --plan lines on the read path: for remote inputs (judged by the first input's URL), the bound
    ``read.in_flight / latency`` per reader at typical latencies, against each machine's compute rate (records/s
    of the cascade, ``est.cascade_compute``); local inputs are not bounded by it; without an input to look at,
    it says that it does not know."""
    computes = {name: est.cascade_compute(machine, gpu_decode) for name, machine in figures.items()}
    compute_records_per_s = {name: 1 / c.seconds_per_record for name, c in computes.items() if c is not None}
    if first_uri is None:
        return ["read path: not estimated (no input to look at)"]
    if not first_uri.startswith(REMOTE_SCHEMES):
        return ["read path: local files (no latency bound estimated; a local read costs about 0.1 ms)"]
    scheme = first_uri.split("://", 1)[0]
    lines = [f"read path: {scheme}:// inputs, read.in_flight={in_flight} reads in flight per worker thread: "
             "at most in_flight / latency records/s per thread (the latency is not known before the run):"]
    for latency in READ_LATENCIES_S:
        bound = read_bound(in_flight, latency)
        slower = [name for name, rate in compute_records_per_s.items() if rate > bound]
        lines.append(f"  at {latency * 1000:.0f} ms per request: {bound:,.0f} records/s per thread"
                     + (f"; below the compute of {', '.join(slower)}: reads bound the run there unless "
                        "workers run more threads or read.in_flight is raised" if slower else
                        "; above every machine's compute rate: reads do not bound the run"))
    return lines
