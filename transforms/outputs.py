"""The run's Parquet tables: explicit schemas, the exit statistics combiner and the sinks.

Each table is a folder of Parquet files under the run's output folder (``predictions/``, ``exit_stats/``,
``dead_letter/``) written by Beam's file sink: temporary files first, renamed into place on success.
The columns are documented for analysts in the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import apache_beam as beam
import pyarrow as pa

from transforms.records import DeadLetter

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("pred_class", pa.int32(), nullable=False),
        pa.field("pred_name", pa.string()),
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("exit_stage", pa.int32(), nullable=False),
        pa.field("gmacs", pa.float64(), nullable=False),
        pa.field("top5_classes", pa.list_(pa.int32())),
        pa.field("top5_probs", pa.list_(pa.float32())),
    ]
)

# Frame granularity: one row per sampled frame, with where it sits in its video.
FRAME_PREDICTIONS_SCHEMA = pa.schema(
    list(PREDICTIONS_SCHEMA)
    + [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64(), nullable=False),
    ]
)

# Frame granularity: one row per video, the mean of its frames' final logits.
VIDEO_PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("pred_class", pa.int32(), nullable=False),
        pa.field("pred_name", pa.string()),
        pa.field("confidence", pa.float64(), nullable=False),
        pa.field("frames", pa.int64(), nullable=False),
        pa.field("gmacs", pa.float64(), nullable=False),
    ]
)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.int32(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)

EXIT_STATS_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.int32(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("threshold", pa.float64()),  # null on the last stage, where every record exits
        pa.field("stage_gmacs", pa.float64(), nullable=False),
        pa.field("cumulative_gmacs", pa.float64(), nullable=False),
        pa.field("records_in", pa.int64(), nullable=False),
        pa.field("records_exited", pa.int64(), nullable=False),
        pa.field("records_failed", pa.int64(), nullable=False),
        pa.field("exit_ratio", pa.float64()),
        pa.field("share_of_predictions", pa.float64()),
        pa.field("labelled_exited", pa.int64(), nullable=False),
        pa.field("accuracy_exited", pa.float64()),
        pa.field("total_inputs", pa.int64(), nullable=False),
        pa.field("predictions", pa.int64(), nullable=False),
        pa.field("dead_letters", pa.int64(), nullable=False),
        pa.field("avg_gmacs", pa.float64()),
        pa.field("worst_case_gmacs", pa.float64(), nullable=False),
        pa.field("last_model_gmacs", pa.float64(), nullable=False),
        pa.field("accuracy", pa.float64()),
    ]
)


@dataclass(frozen=True)
class StageInfo:
    number: int
    model: str
    resolution: int
    threshold: Optional[float]
    gmacs: float


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


class ExitStatsFn(beam.CombineFn):
    """Tallies prediction rows and dead letters into per-stage counts, one accumulator for the run."""

    def __init__(self, n_stages: int):
        self.n = n_stages

    def create_accumulator(self):
        # per stage (index 0 = reading): exited, failed, labelled exited, correct exited; plus gmacs sum
        return {"exited": [0] * (self.n + 1), "failed": [0] * (self.n + 1), "labelled": [0] * (self.n + 1),
                "correct": [0] * (self.n + 1), "gmacs": 0.0}

    def add_input(self, acc, element):
        if isinstance(element, DeadLetter):
            acc["failed"][element.stage] += 1
            return acc
        stage = element["exit_stage"]
        acc["exited"][stage] += 1
        acc["gmacs"] += element["gmacs"]
        if element["label"] is not None:
            acc["labelled"][stage] += 1
            acc["correct"][stage] += int(element["label"] == element["pred_class"])
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        out = self.create_accumulator()
        for acc in accs:
            for key in ("exited", "failed", "labelled", "correct"):
                out[key] = [a + b for a, b in zip(out[key], acc[key])]
            out["gmacs"] += acc["gmacs"]
        return out

    def extract_output(self, acc):
        return acc


def exit_stats_rows(acc: dict, stages: list[StageInfo]) -> list[dict]:
    """The exit_stats table from the combined tallies: one row per stage, run-level columns repeated."""
    exited, failed = acc["exited"], acc["failed"]
    predictions = sum(exited)
    dead = sum(failed)
    labelled = sum(acc["labelled"])
    cumulative = 0.0
    worst = sum(s.gmacs for s in stages)
    rows = []
    for s in stages:
        k = s.number
        cumulative += s.gmacs
        records_in = sum(exited[k:]) + sum(failed[k:])
        rows.append(
            {
                "stage": k,
                "model": s.model,
                "resolution": s.resolution,
                "threshold": s.threshold,
                "stage_gmacs": s.gmacs,
                "cumulative_gmacs": cumulative,
                "records_in": records_in,
                "records_exited": exited[k],
                "records_failed": failed[k],
                "exit_ratio": _ratio(exited[k], records_in - failed[k]),
                "share_of_predictions": _ratio(exited[k], predictions),
                "labelled_exited": acc["labelled"][k],
                "accuracy_exited": _ratio(acc["correct"][k], acc["labelled"][k]),
                "total_inputs": predictions + dead,
                "predictions": predictions,
                "dead_letters": dead,
                "avg_gmacs": _ratio(acc["gmacs"], predictions),
                "worst_case_gmacs": worst,
                "last_model_gmacs": stages[-1].gmacs,
                "accuracy": _ratio(sum(acc["correct"]), labelled),
            }
        )
    return rows


class WriteTable(beam.PTransform):
    """Rows (dicts) -> ``<output>/<name>/part-SSSSS-of-NNNNN.parquet`` with an explicit schema."""

    def __init__(self, output: str, name: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self.prefix = f"{output.rstrip('/')}/{name}/part"
        self.schema = schema
        self.num_shards = num_shards

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(
            self.prefix, self.schema, file_name_suffix=".parquet", num_shards=self.num_shards
        )


class ExitStats(beam.PTransform):
    """(prediction rows, dead letters) -> exit_stats rows."""

    def __init__(self, stages: list[StageInfo]):
        super().__init__()
        self.stages = stages

    def expand(self, pcolls: Iterable):
        stages = self.stages
        return (
            tuple(pcolls)
            | "All" >> beam.Flatten()
            | "Tally" >> beam.CombineGlobally(ExitStatsFn(len(stages)))
            | "Rows" >> beam.FlatMap(exit_stats_rows, stages)
        )
