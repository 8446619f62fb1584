"""Videos in the cascade: decoding them into records, a stage that decides per video, per-video rows.

- ``DecodeVideos`` (the reader of ``ReadInputs`` for video inputs) streams a video through PyAV and turns
  it into one ``FrameRecord`` per sampled frame (frame granularity; those go through ``CascadeStage`` like
  images) or into one ``VideoRecord`` holding all its views (video granularity).
- ``VideoStage`` is a cascade stage whose unit of decision is a video: its views are split out and batched
  with other videos' views (so batches stay full), regrouped by video after inference, averaged, and the
  mean goes through the same ``Route`` (Algorithm 1 of ``models.committee``) as an image's logits.
- ``VideoPredictions`` reduces frame rows to one row per video: the mean of its frames' final logits.
"""

from __future__ import annotations

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference

from configs.schema import Granularity
from models import committee, registry
from models.preprocess import BadInput, load_image
from models.video import BadVideo, SamplingPlan, read_video
from transforms.io import DEAD, dead
from transforms.progress import NAMESPACE, progress
from transforms.records import DeadLetter, FrameRecord, Record, VideoRecord
from transforms.stage import CascadeStage, InferenceFailure, StageRuntime

VIEWS = "views"


class DecodeVideos(beam.DoFn):
    """A listed video -> its frame records, or one video record; unreadable videos -> one dead letter each.

    Counts ``videos_sampled`` and ``frames_sampled`` (the records a video becomes at frame granularity)."""

    def __init__(self, plan: SamplingPlan, granularity: Granularity, short_side: int, max_pixels: int):
        self.plan = plan
        self.granularity = Granularity(granularity)
        self.short_side = short_side
        self.max_pixels = max_pixels
        self.videos = Metrics.counter(NAMESPACE, "videos_sampled")
        self.frames = Metrics.counter(NAMESPACE, "frames_sampled")

    def process(self, record: Record):
        try:
            with fsspec.open(record.uri, "rb") as fh:
                frames = read_video(fh, self.plan, short_side=self.short_side, max_pixels=self.max_pixels)
        except FileNotFoundError:
            yield dead(record.id, record.uri, "file not found")
            return
        except BadVideo as err:
            yield dead(record.id, record.uri, str(err))
            return
        except OSError as err:
            yield dead(record.id, record.uri, f"could not read: {type(err).__name__}: {err}")
            return
        self.videos.inc()
        self.frames.inc(len(frames))
        if self.granularity is Granularity.VIDEO:
            yield VideoRecord(id=record.id, uri=record.uri, label=record.label,
                              views=tuple(view for frame in frames for view in frame.views))
            return
        for frame in frames:
            yield FrameRecord(id=f"{record.id}#{frame.index}", uri=record.uri, label=record.label,
                              data=frame.views[0], video_id=record.id, frame_index=frame.index,
                              timestamp_s=frame.timestamp_s)


class SplitViews(beam.DoFn):
    """Video record -> (key, record), plus ((key, view), crop) per view; a view that does not decode
    dead-letters the video."""

    def __init__(self, spec: registry.ModelSpec, runtime: StageRuntime, stage_number: int):
        self.spec = spec
        self.runtime = runtime
        self.stage_number = stage_number

    def process(self, record: VideoRecord):
        progress.add(self.stage_number, "in")
        try:
            crops = [load_image(v, self.spec.input, max_pixels=self.runtime.max_pixels, draft=self.runtime.draft)
                     for v in record.views]
        except BadInput as err:
            progress.add(self.stage_number, "failed")
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(record.id, record.uri, self.stage_number, f"view: {err}"))
            return
        key = (record.id, record.uri)
        yield key, record
        for i, crop in enumerate(crops):
            yield beam.pvalue.TaggedOutput(VIEWS, ((key, i), crop))


def mean_over_views(element, model_id: str):
    """(key, {video: [record], logits: [per-view logits]}) -> (record, result) for ``Route``: the mean of
    the views' logits, or the failure of a view that the model could not classify."""
    _, grouped = element
    logits = grouped["logits"]
    failure = next((x for x in logits if isinstance(x, InferenceFailure)), None)
    inference = failure or np.mean(np.stack(logits).astype(np.float64), axis=0)
    for record in grouped["video"]:  # more than one only for a video listed twice under one id
        yield record, PredictionResult(None, inference, model_id)


class VideoStage(CascadeStage):
    """A cascade stage whose records are videos: one prediction row per exiting video.

    ``gmacs`` is the cost of the stage per video (views x the model's GMACs)."""

    def classify(self, records):
        """Videos -> their views, batched with other videos' views -> logits regrouped by video -> (video,
        mean of its views' logits) for ``Route``; plus the videos whose views do not decode."""
        split = records | "SplitViews" >> beam.ParDo(
            SplitViews(self.spec, self.runtime, self.stage_number)
        ).with_outputs(DEAD, VIEWS, main="videos")
        logits = (
            split[VIEWS]
            | "Infer" >> RunInference(self.handler())
            | "ByVideo" >> beam.MapTuple(lambda view, result: (view[0], result.inference))
        )
        regrouped = (
            {"video": split.videos, "logits": logits}
            | "Regroup" >> beam.CoGroupByKey()
            | "MeanOverViews" >> beam.FlatMap(mean_over_views, self.spec.key)
        )
        return regrouped, (split[DEAD],)


class MeanLogitsFn(beam.CombineFn):
    """Frame rows of one video -> (sum of final logits, frames, gmacs, label)."""

    def create_accumulator(self):
        return None, 0, 0.0, None

    def add_input(self, acc, row):
        total, frames, gmacs, label = acc
        logits = np.asarray(row["logits"], dtype=np.float64)
        return (logits if total is None else total + logits), frames + 1, gmacs + row["gmacs"], row["label"]

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for total, frames, gmacs, label in accs:
            if total is not None:
                out = (total if out[0] is None else out[0] + total, out[1] + frames, out[2] + gmacs, label)
        return out

    def extract_output(self, acc):
        return acc


def video_row(element, spec: registry.ModelSpec, kind: committee.Confidence) -> dict:
    (video_id, uri), (total, frames, gmacs, label) = element
    mean = total / frames
    pred = int(np.argmax(mean))
    return {"video_id": video_id, "uri": uri, "label": label, "pred_class": pred,
            "pred_name": spec.class_name(pred), "confidence": float(committee.confidence(mean, kind)),
            "frames": frames, "gmacs": gmacs}


class VideoPredictions(beam.PTransform):
    """Frame prediction rows -> one row per video: the mean of its frames' final logits, their count and
    total GMACs."""

    def __init__(self, spec: registry.ModelSpec, kind: committee.Confidence):
        super().__init__()
        self.spec = spec
        self.kind = kind

    def expand(self, rows):
        return (
            rows
            | "ByVideo" >> beam.Map(lambda row: ((row["video_id"], row["uri"]), row))
            | "MeanLogits" >> beam.CombinePerKey(MeanLogitsFn())
            | "Rows" >> beam.Map(video_row, self.spec, self.kind)
        )
