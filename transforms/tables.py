"""The tables a run writes: each is a name, an explicit Parquet schema and the one way to build its rows
(``Table.row``, which refuses a row whose columns are not exactly the schema's), so that a column cannot be
added to a row without its schema, nor to the schema without its rows. No Beam here; the sink is
``transforms.outputs.WriteTable``. The columns are documented for analysts in docs/OUTPUTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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

    def extended(self, fields: Sequence[pa.Field]) -> "Table":
        """This table with ``fields`` appended (a manifest's own columns, carried through under their names);
        a name that is already a column, in any letter case (DuckDB ignores case), is refused."""
        ours = {name.lower() for name in self.schema.names}
        clash = sorted(f.name for f in fields if f.name.lower() in ours)
        if clash:
            raise ValueError(f"manifest column(s) {clash} would clash with column(s) of table {self.name!r} "
                             f"({', '.join(self.schema.names)}); rename them in the manifest")
        return Table(self.name, pa.schema(list(self.schema) + list(fields)))


RUN_ID = pa.field("run_id", pa.string(), nullable=False)  # in every table: which run wrote the row

TOP_K_ENTRY = pa.struct([pa.field("class", pa.int32()), pa.field("name", pa.string()),
                         pa.field("prob", pa.float32())])
# one stage's answer for a record: its committee's class and confidence (what routing saw at that stage); the
# confidence in float32 (7 digits), which keeps the column under 10 % of the table's size (docs/CALIBRATION.md)
STAGE_ANSWER = pa.struct([pa.field("stage", pa.int32(), nullable=False), pa.field("model", pa.string(), nullable=False),
                          pa.field("pred_class", pa.int32(), nullable=False),
                          pa.field("confidence", pa.float32(), nullable=False)])


def _keyed(key: str) -> list[pa.Field]:
    """The first columns of every table of records: the run, the record's key and its uri."""
    return [RUN_ID, pa.field(key, pa.string(), nullable=False), pa.field("uri", pa.string(), nullable=False)]


# a label and the prediction of it, in every table of predictions (records, or videos)
_LABEL_AND_PREDICTION = [
    pa.field("label", pa.int32()),
    pa.field("label_name", pa.string()),
    pa.field("pred_class", pa.int32(), nullable=False),
    pa.field("pred_name", pa.string()),
    pa.field("confidence", pa.float64(), nullable=False),
]

_PREDICTION_FIELDS = [
    *_keyed("id"),
    *_LABEL_AND_PREDICTION,
    pa.field("label_error", pa.string()),  # why the manifest's label cell is not a class index; null when fine
    pa.field("exit_stage", pa.int32(), nullable=False),
    pa.field("gmacs", pa.float64(), nullable=False),
    pa.field("top5", pa.list_(TOP_K_ENTRY)),
    pa.field("stages", pa.list_(STAGE_ANSWER), nullable=False),  # every stage the record went through, in order
    pa.field("shadow", pa.bool_(), nullable=False),  # a shadow record: it went through every stage (config shadow)
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
    *_keyed("video_id"),
    *_LABEL_AND_PREDICTION,
    pa.field("frames", pa.int64(), nullable=False),
    pa.field("gmacs", pa.float64(), nullable=False),
]))

DEAD_LETTER = Table("dead_letter", pa.schema([
    *_keyed("id"),
    pa.field("stage", pa.int32(), nullable=False),
    pa.field("category", pa.string(), nullable=False),  # a models.failures.Category value
    pa.field("error", pa.string(), nullable=False),
]))

# Stage 0 is reading the inputs (model "read"): its records_failed are the inputs dead-lettered before stage 1.
EXIT_STATS = Table("exit_stats", pa.schema([
    RUN_ID,
    pa.field("stage", pa.int32(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("resolution", pa.int32()),  # null on stage 0
    pa.field("threshold", pa.float64()),  # null on the last stage, where every record exits, and on stage 0
    pa.field("stage_gmacs", pa.float64(), nullable=False),
    pa.field("cumulative_gmacs", pa.float64(), nullable=False),
    pa.field("records_in", pa.int64(), nullable=False),
    pa.field("records_exited", pa.int64(), nullable=False),
    pa.field("records_failed", pa.int64(), nullable=False),
    pa.field("exit_ratio", pa.float64()),  # the paper's: exited here / all predictions (sums to 1 over stages)
    pa.field("exit_ratio_of_reached", pa.float64()),  # exited here / records classified at this stage
    pa.field("labelled_exited", pa.int64(), nullable=False),
    pa.field("label_errors", pa.int64(), nullable=False),  # predictions exited here with a label_error
    pa.field("accuracy_exited", pa.float64()),
    pa.field("total_inputs", pa.int64(), nullable=False),
    pa.field("predictions", pa.int64(), nullable=False),
    pa.field("dead_letters", pa.int64(), nullable=False),
    pa.field("avg_gmacs", pa.float64()),
    pa.field("worst_case_gmacs", pa.float64(), nullable=False),
    pa.field("last_model_gmacs", pa.float64(), nullable=False),
    pa.field("accuracy", pa.float64()),
    # the shadow sample (config shadow): rows marked shadow in the run, and the GMACs per prediction they cost
    # beyond the cascade's decision (run-level; avg_gmacs leaves them out)
    pa.field("shadow_records", pa.int64(), nullable=False),
    pa.field("avg_shadow_gmacs", pa.float64()),
    # per stage: shadow records the cascade exited here that went through every stage, how many of them got the
    # last stage's answer here, that share and its 95 % (Wilson) interval; null on stage 0 or without any
    pa.field("shadow_exited", pa.int64(), nullable=False),
    pa.field("shadow_agreed", pa.int64(), nullable=False),
    pa.field("shadow_agreement", pa.float64()),
    pa.field("shadow_agreement_low", pa.float64()),
    pa.field("shadow_agreement_high", pa.float64()),
    pa.field("shadow_last_accuracy", pa.float64()),  # the last stage's accuracy on those records (labelled ones)
]))

# Every table any run of the cascade can write (an --overwrite removes them all); which ones a given run
# writes is its task's ``tables`` (transforms/tasks.py) plus RUN_TABLES.
RUN_TABLES = (EXIT_STATS, DEAD_LETTER)
ALL_TABLE_NAMES = tuple(dict.fromkeys(t.name for t in (PREDICTIONS, FRAME_PREDICTIONS, VIDEO_PREDICTIONS,
                                                      *RUN_TABLES)))
