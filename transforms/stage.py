"""One stage of the cascade: re-batch, preprocess at the stage's resolution, run its model in full
batches through Beam's RunInference, update each record's running committee, and route it.

Routing uses the committee maths of ``models.committee`` record by record, so the pipeline's decisions
are those of Algorithm 1 applied to the same per-model logits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from configs.schema import ModelSharing, Precision, StageConfig
from models import committee, registry
from models.preprocess import BadInput, load_image, to_model_input
from transforms.io import DEAD
from transforms.progress import progress
from transforms.records import DeadLetter, Record

EXITED = "exited"
CONTINUE = "continue"
TOP_K = 5
log = logging.getLogger("cascade")


@dataclass(frozen=True)
class InferenceFailure:
    """Stands in for the logits of a record on which the model raised, even alone in its batch."""

    reason: str


@dataclass(frozen=True)
class StageRuntime:
    """Run-wide settings a stage needs besides its own config."""

    confidence: committee.Confidence = committee.Confidence.MAX_PROB
    aggregation: committee.Aggregation = committee.Aggregation.LOGITS
    max_pixels: int = 100_000_000
    draft: bool = True
    device: str = "auto"
    model_sharing: ModelSharing = ModelSharing.PROCESS
    torch_threads: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_AUTOCAST = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class ClassifierHandler(ModelHandler[np.ndarray, Any, torch.nn.Module]):
    """A RunInference model handler for one registry model at one resolution.

    ``run_inference`` returns float32 logits per example. If the model raises on a batch, the batch is
    retried split in halves down to single examples, so only the examples that fail alone get an
    ``InferenceFailure``; their neighbours are still classified.
    """

    def __init__(self, spec: registry.ModelSpec, stage: StageConfig, runtime: StageRuntime, stage_number: int):
        super().__init__()
        self.spec = spec
        self.stage = stage
        self.runtime = runtime
        self.stage_number = stage_number
        self._device: Optional[torch.device] = None

    def load_model(self) -> torch.nn.Module:
        if self.runtime.torch_threads > 0:
            torch.set_num_threads(self.runtime.torch_threads)
        device = resolve_device(self.runtime.device)
        model = registry.build(self.spec).to(device)
        if self.stage.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.stage.compile:
            model = torch.compile(model)
        log.info("stage %d: loaded %s on %s", self.stage_number, self.spec.key, device)
        return model

    def _forward(self, model: torch.nn.Module, batch: Sequence[np.ndarray]) -> np.ndarray:
        device = next(iter(model.parameters()), torch.empty(0)).device
        host = torch.from_numpy(np.stack(batch))
        if device.type == "cuda":
            host = host.pin_memory()
        x = to_model_input(host.to(device, non_blocking=True), self.spec.input)
        if self.stage.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = _AUTOCAST.get(Precision(self.stage.precision))
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        out = logits.float().cpu().numpy()
        if out.shape != (len(batch), self.spec.num_classes):
            raise ValueError(f"model returned shape {tuple(out.shape)}, expected ({len(batch)}, {self.spec.num_classes})")
        return out

    def _infer(self, model: torch.nn.Module, batch: Sequence[np.ndarray]) -> list:
        try:
            return list(self._forward(model, batch))
        except Exception as err:  # a bad batch must not fail the job: bisect down to the culprit
            if len(batch) == 1:
                return [InferenceFailure(f"model {self.spec.key} failed: {type(err).__name__}: {err}")]
            half = len(batch) // 2
            return self._infer(model, batch[:half]) + self._infer(model, batch[half:])

    def run_inference(self, batch, model, inference_args=None):
        return [PredictionResult(x, y, self.spec.key) for x, y in zip(batch, self._infer(model, batch))]

    def batch_elements_kwargs(self):
        size = self.stage.batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def share_model_across_processes(self) -> bool:
        return ModelSharing(self.runtime.model_sharing) is ModelSharing.MACHINE

    def get_metrics_namespace(self) -> str:
        return f"stage{self.stage_number}"

    def get_num_bytes(self, batch) -> int:
        return sum(x.nbytes for x in batch)


class Preprocess(beam.DoFn):
    """Record -> (record, (res, res, 3) uint8 crop); undecodable inputs -> dead letters."""

    def __init__(self, spec: registry.ModelSpec, runtime: StageRuntime, stage_number: int):
        self.spec = spec
        self.runtime = runtime
        self.stage_number = stage_number

    def process(self, record: Record):
        progress.add(self.stage_number, "in")
        try:
            image = load_image(
                record.data, self.spec.input, max_pixels=self.runtime.max_pixels, draft=self.runtime.draft
            )
        except BadInput as err:
            progress.add(self.stage_number, "failed")
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(record.id, record.uri, self.stage_number, str(err)))
            return
        yield record, image


def prediction_row(record: Record, combined: np.ndarray, conf: float, spec: registry.ModelSpec) -> dict:
    probs = committee.softmax(combined)
    top = np.argsort(-probs, kind="stable")[:TOP_K]
    row = {
        "id": record.id,
        "uri": record.uri,
        "label": record.label,
        "pred_class": int(top[0]),
        "pred_name": spec.class_name(int(top[0])),
        "confidence": float(conf),
        "exit_stage": record.stages_run,
        "gmacs": float(record.gmacs),
        "top5_classes": [int(c) for c in top],
        "top5_probs": [float(probs[c]) for c in top],
    }
    row.update(record.columns(combined))
    return row


class Route(beam.DoFn):
    """(record, logits) -> update the running committee; exit (a prediction row) or continue."""

    def __init__(self, spec: registry.ModelSpec, threshold: float, is_last: bool, gmacs: float,
                 runtime: StageRuntime, stage_number: int):
        self.spec = spec
        self.threshold = threshold
        self.is_last = is_last
        self.gmacs = gmacs
        self.runtime = runtime
        self.stage_number = stage_number

    def process(self, element):
        record, result = element
        if isinstance(result.inference, InferenceFailure):
            progress.add(self.stage_number, "failed")
            yield beam.pvalue.TaggedOutput(
                DEAD, DeadLetter(record.id, record.uri, self.stage_number, result.inference.reason)
            )
            return
        scores = committee.member_scores(result.inference, self.runtime.aggregation).astype(np.float64)
        score_sum = scores if record.score_sum is None else record.score_sum + scores
        record = dataclasses.replace(
            record, score_sum=score_sum, stages_run=record.stages_run + 1, gmacs=record.gmacs + self.gmacs
        )
        combined = committee.combine(score_sum, record.stages_run, self.runtime.aggregation)
        conf = float(committee.confidence(combined, self.runtime.confidence))
        if self.is_last or committee.exits(conf, self.threshold):
            progress.add(self.stage_number, "exited")
            yield prediction_row(record, combined, conf, self.spec)
        else:
            progress.add(self.stage_number, "escalated")
            yield beam.pvalue.TaggedOutput(CONTINUE, record)


class CascadeStage(beam.PTransform):
    """Records in -> {exited: prediction rows, continue: records for the next stage, dead_letter}."""

    def __init__(self, stage: StageConfig, spec: registry.ModelSpec, gmacs: float, runtime: StageRuntime,
                 stage_number: int, is_last: bool):
        super().__init__()
        self.stage = stage
        self.spec = spec
        self.gmacs = gmacs
        self.runtime = runtime
        self.stage_number = stage_number
        self.is_last = is_last

    def expand(self, records):
        if self.stage_number > 1:  # escalated records of all bundles meet again, so batches stay full
            records = records | "Rebatch" >> beam.Reshuffle()
        inferred, failed = self.classify(records)
        routed = inferred | "Route" >> beam.ParDo(
            Route(self.spec, self.stage.threshold, self.is_last, self.gmacs, self.runtime, self.stage_number)
        ).with_outputs(DEAD, CONTINUE, main=EXITED)
        dead = (failed, routed[DEAD]) | "Failures" >> beam.Flatten()
        return {EXITED: routed[EXITED], CONTINUE: routed[CONTINUE], DEAD: dead}

    def classify(self, records):
        """Records -> ((record, PredictionResult) pairs for ``Route``, dead letters)."""
        ready = records | "Preprocess" >> beam.ParDo(
            Preprocess(self.spec, self.runtime, self.stage_number)
        ).with_outputs(DEAD, main="ready")
        return ready.ready | "Infer" >> RunInference(self.handler()), ready[DEAD]

    def handler(self) -> KeyedModelHandler:
        return KeyedModelHandler(ClassifierHandler(self.spec, self.stage, self.runtime, self.stage_number))


def default_threads(workers: int) -> int:
    """Intra-op threads per worker process that do not oversubscribe the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
