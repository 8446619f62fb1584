"""Tasks: the unit a cascade decides on, chosen once per run from the plan (``configs.plan.TaskKind``).

A task says four things, and nothing else in the pipeline depends on what a record is:
- ``reader``: how a listed input becomes records (image bytes; sampled frames; a video's views);
- ``classify``: how a stage turns records into model examples and regroups the results into one
  (record, logits) pair per record for ``Route`` (Algorithm 1 is the same for every task);
- ``prediction_row``: how an ``Exit`` becomes a row of its ``predictions`` table;
- ``tables`` and ``extra_outputs``: which tables it writes besides the run's own (``transforms.tables``).
``TASKS`` maps every ``TaskKind`` to its task (a test checks that it covers the enum). docs/ARCHITECTURE.md
shows how a dense task (segmentation, escalated per grid cell) fits as one more entry.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from configs.plan import CascadePlan, StagePlan, TaskKind
from configs.schema import Granularity
from models import committee
from transforms.fused import FusedCascade
from transforms.records import Exit, Record, in_shadow, utf8_text
from transforms.stage import classify_images
from transforms.tables import FRAME_PREDICTIONS, PREDICTIONS, VIDEO_PREDICTIONS, Table
from transforms.video import DecodeVideos, VideoPredictions, classify_views

TOP_K = 5
Sink = Callable[[Table], beam.PTransform]  # a table -> the transform writing its rows for this run


def prediction_columns(exit: Exit, plan: CascadePlan) -> dict:
    """The columns every task's prediction row has: the run, the record (and the manifest's own columns), its
    class, top-k, exit stage and cost (the cascade's decision, for a shadow record too), and every stage's
    answer."""
    record = exit.record
    spec = plan.stages[exit.stage - 1].spec
    probs = committee.softmax(exit.combined)
    top = [int(c) for c in np.argsort(-probs, kind="stable")[:TOP_K]]
    return {
        "run_id": plan.run_id,
        "id": record.id,
        "uri": utf8_text(record.uri),
        "label": record.label,
        "label_name": spec.label_name(record.label),
        "label_error": record.label_error,
        "pred_class": top[0],
        "pred_name": spec.class_name(top[0]),
        "confidence": float(exit.confidence),
        "exit_stage": exit.stage,
        "gmacs": float(exit.gmacs),
        "top5": [{"class": c, "name": spec.class_name(c), "prob": float(probs[c])} for c in top],
        "stages": [answer.as_entry() for answer in record.answers],
        "shadow": in_shadow(record.id, plan.settings.shadow),
        **record.extras,
    }


class ImageTask:
    """A record is an image file: one example per record, one prediction row per record."""

    kind = TaskKind.IMAGES
    predictions: Table = PREDICTIONS

    @property
    def tables(self) -> tuple[Table, ...]:
        """The task's own tables (the run adds exit_stats and dead_letter)."""
        return (self.predictions,)

    def reader(self, plan: CascadePlan) -> Optional[beam.DoFn]:
        """The DoFn from a listed record to records with their data; None: ``ReadInputs``' ReadBytes."""
        return None

    def classify(self, records, stage: StagePlan):
        """Staged mode: records -> ((record, PredictionResult) pairs for ``Route``, PCollections of dead letters
        raised before ``Route``)."""
        return classify_images(records, stage), ()

    def fused(self, plan: CascadePlan) -> beam.PTransform:
        """Fused mode: every stage in one step, which decodes each record once (``decode``) and runs each stage's
        model on what was decoded (``infer``)."""
        return FusedCascade(plan, self)

    def decode(self, classifier, records: Sequence[Record]) -> list:
        """Fused mode, stage 1: what every stage's model runs on, per record (an image's pixels, decoded once
        for the largest size any stage needs), or its ``Failure``."""
        return classifier.decode_once([record.data for record in records])

    def infer(self, classifier, model, decoded: Sequence) -> list:
        """Fused mode: a stage's logits (or ``Failure``) for what ``decode`` gave, one per record."""
        return classifier.classify_pixels(model, list(decoded))

    def prediction_row(self, exit: Exit, plan: CascadePlan) -> dict:
        return self.predictions.row(**prediction_columns(exit, plan))

    def extra_outputs(self, exits, plan: CascadePlan, sink: Sink) -> None:
        """Tables built from the exits besides ``predictions``."""


def _short_side(plan: CascadePlan) -> int:
    """Frames are kept downscaled to the largest size any stage resizes to."""
    return max(stage.spec.input.resize_to for stage in plan.stages)


class FrameTask(ImageTask):
    """A record is a sampled video frame, classified like an image; plus one row per video (the mean of its
    frames' final logits) in ``video_predictions``."""

    kind = TaskKind.VIDEO_FRAMES
    predictions = FRAME_PREDICTIONS

    @property
    def tables(self) -> tuple[Table, ...]:
        return (self.predictions, VIDEO_PREDICTIONS)

    def reader(self, plan: CascadePlan) -> beam.DoFn:
        return DecodeVideos(plan.video, Granularity.FRAME, _short_side(plan), plan.settings.decode.max_pixels,
                            plan.settings.decode.read_timeout_s)

    def prediction_row(self, exit: Exit, plan: CascadePlan) -> dict:
        record = exit.record
        return self.predictions.row(**prediction_columns(exit, plan), video_id=record.video_id,
                                    frame_index=record.frame_index, timestamp_s=record.timestamp_s)

    def extra_outputs(self, exits, plan: CascadePlan, sink: Sink) -> None:
        (
            exits
            | "VideoPredictions" >> VideoPredictions(plan.stages[-1].spec, plan.settings.confidence, plan.run_id)
            | "WriteVideoPredictions" >> sink(VIDEO_PREDICTIONS)
        )


class ClipTask(ImageTask):
    """A record is a whole video: each stage runs on all its views (clips x crops), batched with other
    videos' views, and the video exits or continues as a whole on the mean of its views' logits."""

    kind = TaskKind.VIDEO_CLIPS

    def reader(self, plan: CascadePlan) -> beam.DoFn:
        return DecodeVideos(plan.video, Granularity.VIDEO, _short_side(plan), plan.settings.decode.max_pixels,
                            plan.settings.decode.read_timeout_s)

    def classify(self, records, stage: StagePlan):
        return classify_views(records, stage)


TASKS: dict[TaskKind, ImageTask] = {
    TaskKind.IMAGES: ImageTask(),
    TaskKind.VIDEO_FRAMES: FrameTask(),
    TaskKind.VIDEO_CLIPS: ClipTask(),
}


def task_for(plan: CascadePlan, extra_fields: Sequence[pa.Field] = ()) -> ImageTask:
    """The plan's task; with ``extra_fields`` (a manifest's own columns), its predictions table carries them
    (a name that clashes with one of the table's raises ``ValueError``)."""
    task = TASKS[plan.task]
    if extra_fields:
        task = copy.copy(task)
        task.predictions = task.predictions.extended(extra_fields)
    return task
