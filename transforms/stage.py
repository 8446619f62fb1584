"""One stage of the cascade in Beam: re-batch, run the stage's model in full batches through Beam's
RunInference, update each record's running committee, and route it.

The model itself (decoding, normalising, the forward pass, bisection of failing batches) is
``models.classifier.Classifier``; the handler here only adapts it to RunInference. Routing uses the committee
maths of ``models.committee`` record by record, so the pipeline's decisions are those of Algorithm 1 applied
to the same per-model logits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from configs.plan import StagePlan
from configs.schema import ModelSharing
from models import committee
from models.classifier import EncodedImage, Example, Failure, LoadedModel
from transforms.io import DEAD
from transforms.progress import progress
from transforms.records import DeadLetter, Exit, Record

EXITED = "exited"
CONTINUE = "continue"
log = logging.getLogger("cascade")


class ClassifierHandler(ModelHandler[Example, Any, LoadedModel]):
    """A RunInference model handler for one stage: a thin adapter of the stage's ``Classifier``. A result's
    ``inference`` is float32 logits, or a ``Failure`` for an example that did not decode or that the model
    failed on alone."""

    def __init__(self, plan: StagePlan):
        super().__init__()
        self.plan = plan
        self.classifier = plan.classifier()

    def load_model(self) -> LoadedModel:
        model = self.classifier.load()
        log.info("stage %d: loaded %s on %s (pid %d)", self.plan.number, self.plan.key, model.device, os.getpid())
        return model

    def run_inference(self, batch, model, inference_args=None):
        results = self.classifier.classify(model, batch)
        return [PredictionResult(x, y, self.plan.key) for x, y in zip(batch, results)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self.plan.batch_size, "max_batch_size": self.plan.batch_size}

    def share_model_across_processes(self) -> bool:
        return self.plan.settings.model_sharing is ModelSharing.MACHINE

    def get_metrics_namespace(self) -> str:
        return f"stage{self.plan.number}"

    def get_num_bytes(self, batch) -> int:
        return sum(x.nbytes for x in batch)


def encoded(record: Record, stage_number: int) -> tuple[Record, EncodedImage]:
    """Record -> (record, its bytes as the example to batch); decoding waits for the batch."""
    progress.add(stage_number, "in")
    return record, EncodedImage(record.data)


def classify_images(records, plan: StagePlan):
    """Records -> (record, PredictionResult) pairs: the "Batch" and "Infer" steps of a stage, applied in the
    caller's scope so that their labels stay the caller's."""
    handler = KeyedModelHandler(ClassifierHandler(plan))
    return records | "Batch" >> beam.Map(encoded, plan.number) | "Infer" >> RunInference(handler)


def route(record: Record, result: np.ndarray | Failure, plan: StagePlan) -> Exit | DeadLetter | Record:
    """Algorithm 1 at one stage for one record: add the stage's logits to its running committee, then an
    ``Exit``, the updated record (it continues), or a ``DeadLetter`` if the stage failed on it. Both
    execution modes route through here, so they decide alike."""
    settings = plan.settings
    if isinstance(result, Failure):
        progress.add(plan.number, "failed")
        return DeadLetter(record.id, record.uri, plan.number, result.reason)
    scores = committee.member_scores(result, settings.aggregation).astype(np.float64)
    score_sum = scores if record.score_sum is None else record.score_sum + scores
    record = dataclasses.replace(
        record, score_sum=score_sum, stages_run=record.stages_run + 1, gmacs=record.gmacs + plan.gmacs
    )
    combined = committee.combine(score_sum, record.stages_run, settings.aggregation)
    conf = float(committee.confidence(combined, settings.confidence))
    if plan.is_last or committee.exits(conf, plan.threshold):
        progress.add(plan.number, "exited")
        return Exit(record, combined, conf)
    progress.add(plan.number, "escalated")
    return record


def tagged(routed: Exit | DeadLetter | Record, value=None):
    """A routed record as the output of a step: an ``Exit`` on the main output, the others tagged.
    ``value`` replaces what is emitted (a ``WindowedValue`` of it, for outputs of ``finish_bundle``)."""
    value = routed if value is None else value
    if isinstance(routed, Exit):
        return value
    return beam.pvalue.TaggedOutput(DEAD if isinstance(routed, DeadLetter) else CONTINUE, value)


class Route(beam.DoFn):
    """(record, logits) -> update the running committee; exit (an ``Exit``) or continue."""

    def __init__(self, plan: StagePlan):
        self.plan = plan

    def process(self, element):
        record, result = element
        yield tagged(route(record, result.inference, self.plan))


class CascadeStage(beam.PTransform):
    """Records in -> {exited: ``Exit``s, continue: records for the next stage, dead_letter}. ``task`` says how
    records become model examples and how their results regroup (``transforms.tasks``). The stage's resource
    hints (``stages[i].resources``) apply to its steps, so that a runner can place each stage on its own
    kind of worker."""

    def __init__(self, plan: StagePlan, task):
        super().__init__()
        self.plan = plan
        self.task = task
        if plan.resources:
            self.with_resource_hints(**plan.resource_hints)

    def expand(self, records):
        if self.plan.number > 1:  # escalated records of all bundles meet again, so batches stay full
            records = records | "Rebatch" >> beam.Reshuffle()
        inferred, failed = self.task.classify(records, self.plan)
        routed = inferred | "Route" >> beam.ParDo(Route(self.plan)).with_outputs(DEAD, CONTINUE, main=EXITED)
        dead = (*failed, routed[DEAD]) | "Failures" >> beam.Flatten()
        return {EXITED: routed[EXITED], CONTINUE: routed[CONTINUE], DEAD: dead}


def default_threads(workers: int) -> int:
    """Intra-op threads per worker process that do not oversubscribe the machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
