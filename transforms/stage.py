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
from typing import Any, Sequence

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from configs.schema import ModelSharing, StageConfig
from models import committee, inference, registry
from models.preprocess import BadInput, decode_pool, gpu_decodable, load_batch, load_images
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
    gpu_decode: bool = True  # on a CUDA device, JPEGs are decoded in batches by nvJPEG (see EncodedImage)
    device: str = "auto"
    model_sharing: ModelSharing = ModelSharing.PROCESS
    torch_threads: int = 0


@dataclass(frozen=True)
class EncodedImage:
    """An image still encoded, as it waits in a batch: the model handler decodes the whole batch at once,
    in threads on the CPU, or with nvJPEG on the model's CUDA device (see ``ClassifierHandler``)."""

    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


class LoadedClassifier:
    """A model loaded on its device: called with a batch of ``(H, W, 3)`` uint8 crops (a stacked array, or a
    list that may hold ``EncodedImage``s to decode on the device first), returns ``(N, C)`` float32 logits.
    Numpy and bytes in, numpy out, so that with ``model_sharing: machine`` the one copy in a machine can
    serve the other processes through Beam's cross-process proxy, which pickles arguments and results."""

    def __init__(self, module: torch.nn.Module, device: torch.device, spec: registry.ModelSpec,
                 stage: StageConfig):
        self.module = module
        self.device = device
        self.spec = spec
        self.channels_last = stage.channels_last
        self.precision = stage.precision

    def __call__(self, batch: Sequence[np.ndarray | EncodedImage]) -> np.ndarray:
        """Raises the ``BadInput`` of an encoded image that cannot be decoded, even on the CPU."""
        if any(isinstance(x, EncodedImage) for x in batch):
            crops = iter(load_batch([x.data for x in batch if isinstance(x, EncodedImage)], self.spec.input,
                                    self.device))
            pixels = [next(crops) if isinstance(x, EncodedImage) else torch.tensor(x, device=self.device)
                      for x in batch]
            bad = next((x for x in pixels if isinstance(x, BadInput)), None)
            if bad is not None:
                raise bad
            batch = torch.stack(pixels)
        return inference.forward(self.module, self.spec, batch, channels_last=self.channels_last,
                                 precision=self.precision, device=self.device)


def failure_reason(err: Exception, limit: int = 300) -> str:
    """One line saying why a model raised. TorchScript wraps the model's own error in its serialized
    traceback, whose last line ("RuntimeError: ...") is the part a person needs."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, torch.jit.Error) and lines:
        text = lines[-1].removeprefix("builtins.")
    else:
        text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ClassifierHandler(ModelHandler[np.ndarray | EncodedImage, Any, LoadedClassifier]):
    """A RunInference model handler for one registry model at one resolution.

    Examples are ``EncodedImage``s (or crops already decoded). ``run_inference`` decodes the batch first:
    with ``decode.gpu`` on a CUDA device, the JPEGs nvJPEG can take are left to the model's device
    (``LoadedClassifier``); the others are decoded by PIL in a pool of ``torch_threads`` threads (all cores
    by default), so decoding uses every core as inference does. An example that does not decode gets an
    ``InferenceFailure`` with the reason. If the model raises on a batch, the batch is retried split in
    halves down to single examples, so only the examples that fail alone get an ``InferenceFailure``; their
    neighbours are still classified. Non-finite logits fail their example too.
    """

    def __init__(self, spec: registry.ModelSpec, stage: StageConfig, runtime: StageRuntime, stage_number: int):
        super().__init__()
        self.spec = spec
        self.stage = stage
        self.runtime = runtime
        self.stage_number = stage_number

    def load_model(self) -> LoadedClassifier:
        if self.runtime.torch_threads > 0:
            torch.set_num_threads(self.runtime.torch_threads)
        device = inference.resolve_device(self.runtime.device)
        model = inference.load(self.spec, device, channels_last=self.stage.channels_last,
                               compile=self.stage.compile)
        log.info("stage %d: loaded %s on %s (pid %d)", self.stage_number, self.spec.key, device, os.getpid())
        return LoadedClassifier(model, device, self.spec, self.stage)

    def _decode(self, batch: Sequence[np.ndarray | EncodedImage]) -> list[np.ndarray | EncodedImage | BadInput]:
        on_gpu = self.runtime.gpu_decode and inference.resolve_device(self.runtime.device).type == "cuda"
        items = list(batch)
        cpu = [i for i, x in enumerate(items) if isinstance(x, EncodedImage)
               and not (on_gpu and gpu_decodable(x.data, self.runtime.max_pixels))]
        threads = self.runtime.torch_threads or os.cpu_count() or 1
        crops = load_images([items[i].data for i in cpu], self.spec.input, max_pixels=self.runtime.max_pixels,
                            draft=self.runtime.draft, pool=decode_pool(threads) if threads > 1 else None)
        for i, crop in zip(cpu, crops):
            items[i] = crop
        return items

    def _infer(self, model: LoadedClassifier, batch: Sequence[np.ndarray | EncodedImage]) -> list:
        try:
            logits = model(batch)
        except Exception as err:  # a bad batch must not fail the job: bisect down to the culprit
            if len(batch) == 1:
                if isinstance(err, BadInput):  # an encoded image that no decoder could read
                    return [InferenceFailure(str(err))]
                return [InferenceFailure(f"model {self.spec.key} failed: {failure_reason(err)}")]
            half = len(batch) // 2
            return self._infer(model, batch[:half]) + self._infer(model, batch[half:])
        return [row if np.isfinite(row).all() else
                InferenceFailure(f"model {self.spec.key} returned non-finite logits (NaN or inf)") for row in logits]

    def run_inference(self, batch, model, inference_args=None):
        items = self._decode(batch)
        results = [InferenceFailure(str(x)) if isinstance(x, BadInput) else None for x in items]
        ready = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(ready, self._infer(model, [items[i] for i in ready]) if ready else ()):
            results[i] = result
        return [PredictionResult(x, y, self.spec.key) for x, y in zip(batch, results)]

    def batch_elements_kwargs(self):
        size = self.stage.batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def share_model_across_processes(self) -> bool:
        return ModelSharing(self.runtime.model_sharing) is ModelSharing.MACHINE

    def get_metrics_namespace(self) -> str:
        return f"stage{self.stage_number}"

    def get_num_bytes(self, batch) -> int:
        return sum(x.nbytes for x in batch)


def encoded(record: Record, stage_number: int) -> tuple[Record, EncodedImage]:
    """Record -> (record, its bytes as the example to batch); decoding waits for the batch."""
    progress.add(stage_number, "in")
    return record, EncodedImage(record.data)


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
        try:
            outputs = list(self._route(record, result))
        except Exception as err:  # the routing boundary: a record that cannot be routed is its own dead letter
            progress.add(self.stage_number, "failed")
            reason = f"model {self.spec.key} output could not be routed: {failure_reason(err)}"
            outputs = [beam.pvalue.TaggedOutput(DEAD, DeadLetter(record.id, record.uri, self.stage_number, reason))]
        yield from outputs

    def _route(self, record: Record, result: PredictionResult):
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


def classify(records, spec: registry.ModelSpec, stage: StageConfig, runtime: StageRuntime, stage_number: int):
    """Records -> (record, PredictionResult) pairs: the "Batch" and "Infer" steps of a stage, applied in the
    caller's scope so that their labels stay the caller's. A result's ``inference`` is float32 logits, or an
    ``InferenceFailure`` for a record that did not decode or that the model failed on."""
    handler = KeyedModelHandler(ClassifierHandler(spec, stage, runtime, stage_number))
    return records | "Batch" >> beam.Map(encoded, stage_number) | "Infer" >> RunInference(handler)


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
        dead = (*failed, routed[DEAD]) | "Failures" >> beam.Flatten()
        return {EXITED: routed[EXITED], CONTINUE: routed[CONTINUE], DEAD: dead}

    def classify(self, records):
        """Records -> ((record, PredictionResult) pairs for ``Route``, PCollections of dead letters raised before
        ``Route``). ``VideoStage`` overrides this step only: the routing of a record is the same whatever it
        is made of."""
        return classify(records, self.spec, self.stage, self.runtime, self.stage_number), ()

    def handler(self) -> KeyedModelHandler:
        return KeyedModelHandler(ClassifierHandler(self.spec, self.stage, self.runtime, self.stage_number))


def default_threads(workers: int) -> int:
    """Intra-op threads per worker process that do not oversubscribe the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
