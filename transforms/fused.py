"""Every stage of the cascade in one step per worker (``execution: fused``): each record is decoded once.

``FusedCascadeFn`` keeps one buffer per stage. Records enter stage 1's buffer; when a buffer holds a full
batch of its stage, the batch runs (stage 1 decodes it first, once, for every stage: the task's ``decode``),
and the records that do not exit wait in the next stage's buffer with their decoded pixels (on the model's
device when decoding ran there) until it holds a full batch of that stage. Every buffer is flushed at the end
of each bundle, in stage order, so nothing is lost or held across bundles. Routing is ``transforms.stage.route``,
the staged mode's, so both modes take the same decisions from the same per-stage logits, and the outputs are
the same ``Exit``s and dead letters. What a record is, how it is decoded and how a stage's model runs on what
was decoded are the task's (``transforms.tasks``: ``decode`` and ``infer``), as ``task.classify`` is in the
staged mode, so that another task (a dense one: grid cells of an image) runs fused too.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import apache_beam as beam
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from configs.plan import CascadePlan
from transforms.io import DEAD
from transforms.progress import progress
from transforms.records import Record
from transforms.stage import EXITED, breaker, route, tagged, watch

log = logging.getLogger("cascade")
setups = logging.getLogger("cascade.fused")  # debug: each worker thread's set-up of the shared models


@dataclass
class Waiting:
    """A record in a stage's buffer, with its decoded image once stage 1 has decoded it, and the window and
    timestamp its outputs get (they may leave in another element's ``process`` or in ``finish_bundle``)."""

    record: Record
    window: Any
    timestamp: Any
    pixels: Optional[Any] = None


def _load(stage, classifier):
    """A stage's model, loaded once per process (the worker threads that share it log nothing more)."""
    model = classifier.load()
    log.info("stage %d: loaded %s on %s (pid %d, fused)", stage.number, stage.key, model.device, os.getpid())
    return model


class FusedCascadeFn(beam.DoFn):
    """Records -> ``Exit``s (main output) and dead letters (``dead_letter``), every stage inside this DoFn."""

    def __init__(self, plan: CascadePlan, task):
        self.stages = plan.stages
        self.task = task  # transforms.tasks: decode(classifier, records) and infer(classifier, model, decoded)
        self._handles = [shared.Shared() for _ in self.stages]  # models load once per process (setup)
        self._tag = uuid.uuid4().hex
        self._buffers: list[list[Waiting]] = []

    def setup(self):
        self._classifiers = [stage.classifier() for stage in self.stages]
        self._breakers = [breaker(stage) for stage in self.stages]
        self._models = []
        for stage, classifier, handle in zip(self.stages, self._classifiers, self._handles):
            self._models.append(handle.acquire(functools.partial(_load, stage, classifier),
                                               tag=f"{self._tag}/{stage.number}"))
        setups.debug("fused step set up in thread %s (pid %d)", threading.current_thread().name, os.getpid())

    def start_bundle(self):
        self._buffers = [[] for _ in self.stages]

    def process(self, record: Record, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        self._buffers[0].append(Waiting(record, window, timestamp))
        yield from self._drain(flush=False)

    def finish_bundle(self):
        yield from self._drain(flush=True)

    def _drain(self, flush: bool):
        """Run every stage whose buffer holds a full batch (and, with ``flush``, what any buffer holds), in
        stage order: a stage's escalations land in later buffers only."""
        for k, stage in enumerate(self.stages):
            while len(self._buffers[k]) >= stage.batch_size or (flush and self._buffers[k]):
                batch = self._buffers[k][:stage.batch_size]
                del self._buffers[k][:stage.batch_size]
                yield from self._run(k, batch)

    def _run(self, k: int, batch: list[Waiting]):
        stage, classifier = self.stages[k], self._classifiers[k]
        progress.add(stage.number, "in", len(batch))
        if k == 0:
            for waiting, pixels in zip(batch, self.task.decode(classifier, [w.record for w in batch])):
                waiting.pixels = pixels
                waiting.record = dataclasses.replace(waiting.record, data=b"")  # the pixels replace the bytes
        results = self.task.infer(classifier, self._models[k], [w.pixels for w in batch])
        for waiting, result in zip(batch, results):
            routed = route(waiting.record, result, stage)
            watch(self._breakers[k], routed)
            if isinstance(routed, Record):
                waiting.record = routed
                self._buffers[k + 1].append(waiting)
            else:
                yield tagged(routed, WindowedValue(routed, waiting.timestamp, (waiting.window,)))


class FusedCascade(beam.PTransform):
    """Records -> {exited: ``Exit``s, dead_letter}: the whole cascade as one step. It carries the stages'
    resource hints merged (a later stage's value replacing an earlier one's: the step runs every model)."""

    def __init__(self, plan: CascadePlan, task):
        super().__init__()
        self.plan = plan
        self.task = task
        hints = {k: v for stage in plan.stages for k, v in stage.resources}
        if hints:
            self.with_resource_hints(**hints)

    def expand(self, records):
        out = records | "Stages" >> beam.ParDo(FusedCascadeFn(self.plan, self.task)).with_outputs(DEAD, main=EXITED)
        return {EXITED: out[EXITED], DEAD: out[DEAD]}
