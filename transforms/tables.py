"""The tables a run writes: each is a name, an explicit Parquet schema and the one way to build its rows
(``Table.row``, which refuses a row whose columns are not exactly the schema's), so that a column cannot be
added to a row without its schema, nor to the schema without its rows. No Beam here; the sink is
``transforms.outputs.WriteTable``. The columns are documented for analysts in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    name: str  # the folder under the run's output: <output>/<name>/part-*.parquet
    schema: pa.Schema
    columns: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "columns", frozenset(self.schema.names))

    def row(self, **values) -> dict:
        """A row of this table; missing or unknown columns raise, naming them."""
        if values.keys() != self.columns:
            missing, extra = sorted(self.columns - values.keys()), sorted(values.keys() - self.columns)
            raise ValueError(f"a row of table {self.name!r} does not fit its schema: missing {missing}, "
                             f"unknown {extra}")
        return values


_PREDICTION_FIELDS = [
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

PREDICTIONS = Table("predictions", pa.schema(_PREDICTION_FIELDS))

# Frame granularity: one row per sampled frame, with where it sits in its video.
FRAME_PREDICTIONS = Table("predictions", pa.schema(_PREDICTION_FIELDS + [
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("frame_index", pa.int64(), nullable=False),
    pa.field("timestamp_s", pa.float64(), nullable=False),
]))

# Frame granularity: one row per video, the mean of its frames' final logits.
VIDEO_PREDICTIONS = Table("video_predictions", pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.int32()),
    pa.field("pred_class", pa.int32(), nullable=False),
    pa.field("pred_name", pa.string()),
    pa.field("confidence", pa.float64(), nullable=False),
    pa.field("frames", pa.int64(), nullable=False),
    pa.field("gmacs", pa.float64(), nullable=False),
]))

DEAD_LETTER = Table("dead_letter", pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("stage", pa.int32(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
]))

EXIT_STATS = Table("exit_stats", pa.schema([
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
]))

# Every table any run of the cascade can write (an --overwrite removes them all); which ones a given run
# writes is its task's ``tables`` (transforms/tasks.py) plus RUN_TABLES.
RUN_TABLES = (EXIT_STATS, DEAD_LETTER)
ALL_TABLE_NAMES = tuple(dict.fromkeys(t.name for t in (PREDICTIONS, FRAME_PREDICTIONS, VIDEO_PREDICTIONS,
                                                      *RUN_TABLES)))
