"""Writing the run's tables (``transforms.tables``) and the exit statistics combiner.

Each table is a folder of Parquet files under the run's output folder (``predictions/``, ``exit_stats/``,
``dead_letter/``) written by Beam's file sink: temporary files first, renamed into place on success. A run's
files are named by its run id (``<table>/<run_id>-SSSSS-of-NNNNN.parquet``), compressed with zstd, and carry
the run's description (id, start time, resolved config, versions) in their Parquet key-value metadata.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from configs.plan import StagePlan
from models.calibration import wilson_interval
from transforms.records import DeadLetter
from transforms.tables import EXIT_STATS, Table


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


class ExitStatsFn(beam.CombineFn):
    """Tallies prediction rows and dead letters into per-stage counts, one accumulator for the run."""

    def __init__(self, n_stages: int):
        self.n = n_stages

    def create_accumulator(self):
        # per stage (index 0 = reading): exited, failed, labelled exited, correct exited; plus how many rows
        # had each GMACs value, summed in one order at the end: a float sum in arrival order would differ in
        # its last digits from one bundling (or execution mode) to another
        # shadow rows, by the stage the cascade exited them at: all of them, those that went through every stage
        # (a later stage may fail on one), those whose answer agreed with the last stage's, and, among the
        # labelled ones, how often the last stage was right; "reached": how many rows exited at stage k and ran
        # up to stage j, for the shadow's own GMACs
        return {**{key: [0] * (self.n + 1) for key in COUNTS}, "gmacs": {}, "reached": {}}

    def add_input(self, acc, element):
        if isinstance(element, DeadLetter):
            acc["failed"][element.stage] += 1
            return acc
        stage = element["exit_stage"]
        acc["exited"][stage] += 1
        acc["gmacs"][element["gmacs"]] = acc["gmacs"].get(element["gmacs"], 0) + 1
        acc["label_errors"][stage] += element["label_error"] is not None
        if element["label"] is not None:
            acc["labelled"][stage] += 1
            acc["correct"][stage] += int(element["label"] == element["pred_class"])
        if element["shadow"]:
            answers = element["stages"]
            acc["shadow"][stage] += 1
            acc["reached"][(stage, len(answers))] = acc["reached"].get((stage, len(answers)), 0) + 1
            if len(answers) == self.n:
                last = answers[-1]["pred_class"]
                acc["shadow_full"][stage] += 1
                acc["shadow_agreed"][stage] += int(element["pred_class"] == last)
                if element["label"] is not None:
                    acc["shadow_labelled"][stage] += 1
                    acc["shadow_last_correct"][stage] += int(element["label"] == last)
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        out = self.create_accumulator()
        for acc in accs:
            for key in COUNTS:
                out[key] = [a + b for a, b in zip(out[key], acc[key])]
            for key in ("gmacs", "reached"):
                for value, count in acc[key].items():
                    out[key][value] = out[key].get(value, 0) + count
        return out

    def extract_output(self, acc):
        return acc


READ_MODEL = "read"  # the "model" of stage 0, where inputs are listed and read
COUNTS = ("exited", "failed", "labelled", "correct", "label_errors", "shadow", "shadow_full", "shadow_agreed",
          "shadow_labelled", "shadow_last_correct")


def exit_stats_rows(acc: dict, stages: Sequence[StagePlan], run_id: str,
                    thresholds: Optional[dict] = None) -> list[dict]:
    """The exit_stats table from the combined tallies: one row for reading (stage 0: the inputs that failed
    before stage 1) and one per stage, run-level columns repeated. ``exit_ratio`` is the paper's (exited at
    the stage / all predictions, summing to 1 over the stages); ``exit_ratio_of_reached`` is conditional
    (exited / records classified at the stage). ``thresholds``: stage number -> the threshold a budget
    stage computed over the run. Shadow records count where the cascade exited them (``avg_gmacs`` is the
    cascade's); what they cost beyond that is ``avg_shadow_gmacs``, and each stage's ``shadow_agreement`` is
    how often its exits' answer equalled the last stage's on the shadow records (95 % Wilson interval)."""
    thresholds = thresholds or {}
    exited, failed = acc["exited"], acc["failed"]
    predictions = sum(exited)
    dead = sum(failed)
    labelled = sum(acc["labelled"])
    cumulative = 0.0
    worst = sum(s.gmacs for s in stages)
    cumulatives = np.cumsum([0.0] + [s.gmacs for s in stages])
    shadow_gmacs = sum(count * (cumulatives[reached] - cumulatives[stage])
                       for (stage, reached), count in sorted(acc["reached"].items()))
    rows = []
    for k, s in [(0, None), *((s.number, s) for s in stages)]:
        cumulative += s.gmacs if s else 0.0
        full, agreed = acc["shadow_full"][k], acc["shadow_agreed"][k]
        low, high = wilson_interval(agreed, full) if s and full else (None, None)
        records_in = sum(exited[k:]) + sum(failed[k:])
        rows.append(EXIT_STATS.row(
            run_id=run_id,
            stage=k,
            model=s.key if s else READ_MODEL,
            resolution=s.resolution if s else None,
            threshold=thresholds.get(k, s.threshold) if s else None,
            stage_gmacs=s.gmacs if s else 0.0,
            cumulative_gmacs=cumulative,
            records_in=records_in,
            records_exited=exited[k],
            records_failed=failed[k],
            exit_ratio=_ratio(exited[k], predictions),
            exit_ratio_of_reached=_ratio(exited[k], records_in - failed[k]) if s else None,
            labelled_exited=acc["labelled"][k],
            label_errors=acc["label_errors"][k],
            accuracy_exited=_ratio(acc["correct"][k], acc["labelled"][k]),
            total_inputs=predictions + dead,
            predictions=predictions,
            dead_letters=dead,
            avg_gmacs=_ratio(sum(value * count for value, count in sorted(acc["gmacs"].items())), predictions),
            worst_case_gmacs=worst,
            last_model_gmacs=stages[-1].gmacs,
            accuracy=_ratio(sum(acc["correct"]), labelled),
            shadow_records=sum(acc["shadow"]),
            avg_shadow_gmacs=_ratio(shadow_gmacs, predictions),
            shadow_exited=full,
            shadow_agreed=agreed,
            shadow_agreement=_ratio(agreed, full) if s else None,
            shadow_agreement_low=low,
            shadow_agreement_high=high,
            shadow_last_accuracy=_ratio(acc["shadow_last_correct"][k], acc["shadow_labelled"][k]) if s else None,
        ))
    return rows


CODEC = "zstd"  # Beam's WriteToParquet writes uncompressed files unless told
# Arrow bytes a writer buffers before it writes a row group: Beam's default (64 MB) holds 400,000 prediction
# rows per writer in memory; 8 MB keeps row groups large enough for any reader
ROW_GROUP_BYTES = 8 * 1024 * 1024


class SystemArrowMemory(beam.DoFn):
    """Passes rows through; in each process that writes tables, Arrow allocates from the C library's
    allocator from then on. Arrow's default (mimalloc) keeps memory that the table writers' row groups
    freed: measured (benchmarks/data_path.py), a process whose Arrow allocations never exceeded 19 MB grew
    90 MB more with mimalloc than with the system allocator by 200,000 rows, and kept growing with the rows
    written. Arrow's work here is small (a row group of prediction rows at a time), so its speed does not
    matter; a worker's memory staying flat over 10^8 rows does."""

    def setup(self):
        if pa.default_memory_pool().backend_name != "system":
            pa.set_memory_pool(pa.system_memory_pool())

    def process(self, row):
        yield row


class WriteTable(beam.PTransform):
    """Rows of ``table`` (dicts from ``table.row``) -> ``<prefix>-SSSSS-of-NNNNN.parquet``, zstd-compressed, with
    ``metadata`` (and the table's name) as each file's key-value metadata. The output folder names the prefix
    (``pipelines.folder.RunFolder.table_prefix``)."""

    def __init__(self, prefix: str, table: Table, metadata: Optional[Mapping[str, str]] = None,
                 num_shards: int = 0):
        super().__init__()
        self.prefix = prefix
        self.schema = table.schema.with_metadata({**(metadata or {}), "cascade.table": table.name})
        self.num_shards = num_shards

    def expand(self, rows):
        return rows | "SystemArrowMemory" >> beam.ParDo(SystemArrowMemory()) | beam.io.WriteToParquet(
            self.prefix, self.schema, codec=CODEC, file_name_suffix=".parquet", num_shards=self.num_shards,
            row_group_buffer_size=ROW_GROUP_BYTES,
        )


class ExitStats(beam.PTransform):
    """(prediction rows, dead letters) -> exit_stats rows; ``thresholds`` (optional): a PCollection of
    (stage number, threshold) pairs computed during the run, recorded in place of the plan's."""

    def __init__(self, stages: Sequence[StagePlan], run_id: str, thresholds=None):
        super().__init__()
        self.stages = tuple(stages)
        self.run_id = run_id
        self.thresholds = thresholds

    def expand(self, pcolls: Iterable):
        stages = self.stages
        tally = ExitStatsFn(len(stages))
        # each input is tallied where it is made (a lifted combine), and only the small tallies meet: a Flatten
        # of the inputs themselves would make a runner such as FnApiRunner hold every prediction row in memory
        tallies = [pcoll | f"Tally{i}" >> beam.CombineGlobally(tally) for i, pcoll in enumerate(pcolls)]
        return (
            tallies
            | "Tallies" >> beam.Flatten()
            | "Merge" >> beam.CombineGlobally(tally.merge_accumulators)
            | "Rows" >> beam.FlatMap(exit_stats_rows, stages, self.run_id,
                                     beam.pvalue.AsDict(self.thresholds) if self.thresholds is not None else None)
        )
