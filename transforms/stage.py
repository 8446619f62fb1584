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
from typing import Any, Optional

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from configs.plan import StagePlan
from configs.schema import ModelSharing
from models import committee
from models.classifier import EncodedImage, Example, Failure, LoadedModel, failure_reason
from models.failures import Category, CircuitBreaker
from transforms.io import DEAD
from transforms.progress import progress
from transforms.records import DeadLetter, Decision, Exit, Record, StageAnswer, in_shadow

EXITED = "exited"
CONTINUE = "continue"
THRESHOLD = "threshold"
BUDGET_QUANTILES = 1001  # quantiles of a stage's confidences for a budget: rank error <= 1/1000 of its records
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


def update(record: Record, logits: np.ndarray, plan: StagePlan) -> tuple[Record, np.ndarray, float]:
    """The record with this stage's logits added to its committee (and the committee's answer to its
    ``answers``), the committee's logits and confidence."""
    settings = plan.settings
    scores = committee.member_scores(logits, settings.aggregation).astype(np.float64)
    score_sum = committee.accumulate(record.score_sum, scores, settings.aggregation)
    combined = committee.combine(score_sum, record.stages_run + 1, settings.aggregation)
    conf = float(committee.confidence(combined, settings.confidence))
    answer = StageAnswer(plan.number, plan.key, int(np.argmax(combined)), conf)
    record = dataclasses.replace(
        record, score_sum=score_sum, stages_run=record.stages_run + 1, gmacs=record.gmacs + plan.gmacs,
        answers=record.answers + (answer,),
    )
    return record, combined, conf


def route(record: Record, result: np.ndarray | Failure, plan: StagePlan,
          threshold: Optional[float] = None) -> Exit | DeadLetter | Record:
    """Algorithm 1 at one stage for one record: an ``Exit``, the updated record (it continues), or a
    ``DeadLetter`` if the stage failed on it or its output cannot be routed (the routing boundary: one
    record's bad output never fails the job). ``threshold`` replaces the plan's (a budget's). Both execution
    modes route through here, so they decide alike.

    A shadow record (``records.in_shadow``, a share ``shadow`` of the run's ids) that the cascade exits before
    the last stage keeps that decision and goes on through every stage, adding each stage's answer; it leaves
    at the last stage with the decision (or at a stage that fails on it: the decision stands, the shadow ends)."""
    if record.decision is not None:  # a shadow record the cascade has decided on: only its answers grow
        progress.add(plan.number, "shadow")
        if not isinstance(result, Failure):
            try:
                record = update(record, result, plan)[0]
            except Exception:  # the shadow ends here; the cascade's decision stands
                return Exit.decided(record)
        return Exit.decided(record) if plan.is_last or isinstance(result, Failure) else record
    if isinstance(result, Failure):
        progress.add(plan.number, "failed")
        return DeadLetter(record.id, record.uri, plan.number, result.reason, result.category)
    try:
        record, combined, conf = update(record, result, plan)
        exits = plan.is_last or committee.exits(conf, plan.threshold if threshold is None else threshold)
    except Exception as err:
        progress.add(plan.number, "failed")
        reason = f"model {plan.key} output could not be routed: {failure_reason(err)}"
        return DeadLetter(record.id, record.uri, plan.number, reason, Category.MODEL_ERROR)
    progress.add(plan.number, "exited" if exits else "escalated")
    if exits and not plan.is_last and in_shadow(record.id, plan.settings.shadow):
        return dataclasses.replace(record, decision=Decision(plan.number, combined, conf, record.gmacs))
    return Exit(record, combined, conf) if exits else record


def breaker(plan: StagePlan) -> CircuitBreaker:
    """The circuit breaker of a stage's step (one per stage and DoFn instance; ``watch`` feeds it)."""
    return CircuitBreaker(f"stage {plan.number} ({plan.key})", plan.settings.circuit_breaker)


def watch(stage_breaker: CircuitBreaker, routed: Exit | DeadLetter | Record) -> None:
    """Count a routed record in its stage's breaker: raises ``SystemicFailure`` when (nearly) every record of
    the stage's window failed with one category."""
    if isinstance(routed, DeadLetter):
        stage_breaker.observe(routed.category, routed.error)
    else:
        stage_breaker.observe(None)


def tagged(routed: Exit | DeadLetter | Record, value=None):
    """A routed record as the output of a step: an ``Exit`` on the main output, the others tagged.
    ``value`` replaces what is emitted (a ``WindowedValue`` of it, for outputs of ``finish_bundle``)."""
    value = routed if value is None else value
    if isinstance(routed, Exit):
        return value
    return beam.pvalue.TaggedOutput(DEAD if isinstance(routed, DeadLetter) else CONTINUE, value)


class Route(beam.DoFn):
    """(record, logits) -> update the running committee; exit (an ``Exit``) or continue. The threshold is the
    plan's, or, for a stage with a budget, the one ``budget_threshold`` computed over the run (a side input)."""

    def __init__(self, plan: StagePlan):
        self.plan = plan
        self._breaker = None  # made on the worker (it holds a lock, which does not pickle)

    def confidence(self, element):
        """(record, result) -> the confidence ``process`` will route it by (none for a record it dead-letters)."""
        record, result = element
        if record.decision is None and not isinstance(result.inference, Failure):  # a decided shadow record:
            # the cascade sent it on only for the shadow, so it is no part of this stage's budget
            try:
                yield update(record, result.inference, self.plan)[2]
            except Exception:  # process() dead-letters this record, with the reason
                pass

    def process(self, element, threshold=None):
        record, result = element
        routed = route(record, result.inference, self.plan, threshold)
        self._breaker = self._breaker or breaker(self.plan)
        watch(self._breaker, routed)
        yield tagged(routed)


def budget_threshold(quantiles: list[float], escalate: float) -> float:
    """The threshold that sends on ``escalate`` of the records whose confidences have these quantiles (min,
    ..., max): records below the ``escalate`` quantile continue. All of them: 1, which nothing reaches."""
    if not quantiles or escalate >= 1.0:
        return 1.0
    return float(quantiles[round(escalate * (len(quantiles) - 1))])


class CascadeStage(beam.PTransform):
    """Records in -> {exited: ``Exit``s, continue: records for the next stage, dead_letter, threshold}.
    ``task`` says how records become model examples and how their results regroup (``transforms.tasks``).
    ``threshold`` is a one-element PCollection, ``(stage number, threshold used)``, for a stage with a
    budget: its records wait for the quantiles of all its confidences before they are routed. The stage's
    resource hints (``stages[i].resources``) apply to its steps, so that a runner can place each stage on its
    own kind of worker."""

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
        route, threshold, side = Route(self.plan), None, {}
        if self.plan.escalate is not None:
            threshold = (
                inferred
                | "Confidences" >> beam.FlatMap(route.confidence)
                | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(BUDGET_QUANTILES)
                | "BudgetThreshold" >> beam.Map(budget_threshold, self.plan.escalate)
            )
            side = {"threshold": beam.pvalue.AsSingleton(threshold)}
            threshold = threshold | "Number" >> beam.Map(lambda t, n: (n, t), self.plan.number)
        routed = inferred | "Route" >> beam.ParDo(route, **side).with_outputs(DEAD, CONTINUE, main=EXITED)
        dead = (*failed, routed[DEAD]) | "Failures" >> beam.Flatten()
        return {EXITED: routed[EXITED], CONTINUE: routed[CONTINUE], DEAD: dead, THRESHOLD: threshold}


def default_threads(workers: int) -> int:
    """Intra-op threads per worker (process, or thread of one process) that do not oversubscribe the
    machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
