"""Videos in the cascade: decoding them into records, classifying a video by its views, per-video rows.
The tasks that use them are in ``transforms.tasks``.

- ``DecodeVideos`` (the reader of ``ReadInputs`` for video inputs) streams a video through PyAV and turns
  it into one ``FrameRecord`` per sampled frame (frame granularity; those are classified like images) or
  into one ``VideoRecord`` holding all its views (video granularity).
- ``classify_views``: a video's views are split out and batched with other videos' views (so batches stay
  full), regrouped by video after inference and averaged; the mean goes through the same ``Route``
  (Algorithm 1 of ``models.committee``) as an image's logits.
- ``VideoPredictions`` reduces frame exits to one row per video: the mean of its frames' final logits.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference

from configs.plan import StagePlan
from configs.schema import Granularity
from models import committee, registry
from models.classifier import Failure
from models.preprocess import BadInput, load_image
from models.video import BadVideo, SamplingPlan, read_video
from transforms.fetch import open_input, read_failure, with_timeout
from transforms.io import DEAD, dead
from transforms.progress import NAMESPACE, progress
from transforms.records import DeadLetter, Exit, FrameRecord, Record, VideoRecord, utf8_text
from transforms.stage import ClassifierHandler
from transforms.tables import VIDEO_PREDICTIONS

VIEWS = "views"


class DecodeVideos(beam.DoFn):
    """A listed video -> its frame records, or one video record; unreadable videos -> one dead letter each.

    Counts ``videos_sampled`` and ``frames_sampled`` (the records a video becomes at frame granularity)."""

    def __init__(self, plan: SamplingPlan, granularity: Granularity, short_side: int, max_pixels: int,
                 timeout_s: float):
        self.plan = plan
        self.granularity = Granularity(granularity)
        self.short_side = short_side
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self.videos = Metrics.counter(NAMESPACE, "videos_sampled")
        self.frames = Metrics.counter(NAMESPACE, "frames_sampled")

    def _read(self, uri: str):
        fs, path = open_input(uri)
        with fs.open(path, "rb") as fh:
            return read_video(fh, self.plan, short_side=self.short_side, max_pixels=self.max_pixels)

    def process(self, record: Record):
        try:  # reading and decoding one video is bounded in time too (decode.read_timeout_s)
            frames = with_timeout(lambda: self._read(record.uri), self.timeout_s, record.uri)
        except BadVideo as err:
            yield dead(record.id, record.uri, str(err), err.category)
            return
        except Exception as err:  # one video's failure, whatever it is, is that video's dead letter
            yield dead(record.id, record.uri, read_failure(err))
            return
        self.videos.inc()
        self.frames.inc(len(frames))
        if self.granularity is Granularity.VIDEO:
            yield VideoRecord(id=record.id, uri=record.uri, label=record.label, label_error=record.label_error,
                              extras=record.extras, views=tuple(view for frame in frames for view in frame.views))
            return
        for frame in frames:
            yield FrameRecord(id=f"{record.id}#{frame.index}", uri=record.uri, label=record.label,
                              label_error=record.label_error, extras=record.extras, data=frame.views[0],
                              video_id=record.id, frame_index=frame.index, timestamp_s=frame.timestamp_s)


class SplitViews(beam.DoFn):
    """Video record -> (key, record), plus ((key, view), crop) per view; a view that does not decode
    dead-letters the video."""

    def __init__(self, plan: StagePlan):
        self.plan = plan

    def process(self, record: VideoRecord):
        number, decode = self.plan.number, self.plan.settings.decode
        progress.add(number, "in")
        try:
            crops = [load_image(v, self.plan.spec.input, max_pixels=decode.max_pixels, draft=decode.draft,
                                target=self.plan.settings.decode_target) for v in record.views]
        except BadInput as err:
            progress.add(number, "failed")
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(record.id, record.uri, number, f"view: {err}",
                                                                       err.category))
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
    failure = next((x for x in logits if isinstance(x, Failure)), None)
    inference = failure or np.mean(np.stack(logits).astype(np.float64), axis=0)
    for record in grouped["video"]:  # more than one only for a video listed twice under one id
        yield record, PredictionResult(None, inference, model_id)


def classify_views(records, plan: StagePlan):
    """Videos -> their views, batched with other videos' views -> logits regrouped by video -> (video, mean of
    its views' logits) for ``Route``; plus the videos whose views do not decode."""
    split = records | "SplitViews" >> beam.ParDo(SplitViews(plan)).with_outputs(DEAD, VIEWS, main="videos")
    logits = (
        split[VIEWS]
        | "Infer" >> RunInference(KeyedModelHandler(ClassifierHandler(plan)))
        | "ByVideo" >> beam.MapTuple(lambda view, result: (view[0], result.inference))
    )
    regrouped = (
        {"video": split.videos, "logits": logits}
        | "Regroup" >> beam.CoGroupByKey()
        | "MeanOverViews" >> beam.FlatMap(mean_over_views, plan.key)
    )
    return regrouped, (split[DEAD],)


class MeanLogitsFn(beam.CombineFn):
    """Frame exits of one video -> (sum of final logits, frames, gmacs, label)."""

    def create_accumulator(self):
        return None, 0, 0.0, None

    def add_input(self, acc, exit: Exit):
        total, frames, gmacs, label = acc
        logits = np.asarray(exit.combined, dtype=np.float64)
        return ((logits if total is None else total + logits), frames + 1, gmacs + exit.gmacs,
                exit.record.label)

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for total, frames, gmacs, label in accs:
            if total is not None:
                out = (total if out[0] is None else out[0] + total, out[1] + frames, out[2] + gmacs, label)
        return out

    def extract_output(self, acc):
        return acc


def video_row(element, spec: registry.ModelSpec, kind: committee.Confidence, run_id: str) -> dict:
    (video_id, uri), (total, frames, gmacs, label) = element
    mean = total / frames
    pred = int(np.argmax(mean))
    return VIDEO_PREDICTIONS.row(run_id=run_id, video_id=video_id, uri=utf8_text(uri), label=label,
                                 label_name=spec.label_name(label), pred_class=pred, pred_name=spec.class_name(pred),
                                 confidence=float(committee.confidence(mean, kind)), frames=frames, gmacs=gmacs)


class VideoPredictions(beam.PTransform):
    """Frame exits -> one row per video: the mean of its frames' final logits, their count and total GMACs."""

    def __init__(self, spec: registry.ModelSpec, kind: committee.Confidence, run_id: str):
        super().__init__()
        self.spec = spec
        self.kind = kind
        self.run_id = run_id

    def expand(self, rows):
        return (
            rows
            | "ByVideo" >> beam.Map(lambda e: ((e.record.video_id, e.record.uri), e))
            | "MeanLogits" >> beam.CombinePerKey(MeanLogitsFn())
            | "Rows" >> beam.Map(video_row, self.spec, self.kind, self.run_id)
        )
