"""The plan of a run: what each stage does, built once from a validated config by ``build_plan`` and then
the only description of the cascade that the pipeline passes around.

A ``StagePlan`` is one stage, complete: the model spec at the stage's resolution, its threshold (None on
the last stage, where every record exits), its cost per record, its batch size and precision, and the
run-wide settings. The ``TaskKind`` says what a record is (an image, a video frame, a whole video); the
Beam side of each task is in ``transforms.tasks``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Optional

from configs.schema import (
    CascadeConfig,
    ConfigError,
    Execution,
    Granularity,
    ModelSharing,
    execution_of,
    sampling_plan,
    stage_backend,
    stage_specs,
)
from models import registry
from models.classifier import Classifier
from models.committee import Aggregation, Confidence
from models.failures import BreakerConfig
from models.inference import Backend, Precision
from models.preprocess import DecodeConfig, decode_target
from models.video import SamplingPlan


class TaskKind(str, enum.Enum):
    """The unit the cascade decides on (see transforms/tasks.py and docs/ARCHITECTURE.md)."""

    IMAGES = "images"  # a record is an image
    VIDEO_FRAMES = "video_frames"  # a record is a sampled frame; plus one row per video
    VIDEO_CLIPS = "video_clips"  # a record is a video, decided on the mean over its views


@dataclass(frozen=True)
class RunSettings:
    """What every stage of a run shares."""

    confidence: Confidence = Confidence.MAX_PROB
    aggregation: Aggregation = Aggregation.LOGITS
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    device: str = "auto"
    model_sharing: ModelSharing = ModelSharing.PROCESS
    torch_threads: int = 0  # 0: as many as the process has cores
    decode_target: Optional[int] = None  # the shorter side every stage decodes for: the largest stage's resize_to
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)  # when a stage's failures stop the job
    shadow: float = 0.0  # share of the records (by a hash of the id) that go through every stage


@dataclass(frozen=True)
class StagePlan:
    number: int  # 1-based
    spec: registry.ModelSpec  # at the stage's resolution
    threshold: Optional[float]  # exit when confidence >= threshold; None on the last stage (all exit)
    gmacs: float  # multiply-adds x1e9 per record (all its views)
    batch_size: int
    precision: Precision
    channels_last: bool
    compile: bool
    settings: RunSettings
    escalate: Optional[float] = None  # set: the threshold is the run's quantile of this share (a budget)
    resources: tuple[tuple[str, str], ...] = ()  # Beam resource hints of the stage's step
    backend: Backend = Backend.AUTO  # what runs its forward passes (models.inference.resolve_backend)

    @property
    def resource_hints(self) -> dict[str, str]:
        return dict(self.resources)

    @property
    def is_last(self) -> bool:
        return self.threshold is None

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def resolution(self) -> int:
        return self.spec.input.resolution

    def classifier(self) -> Classifier:
        """The stage's model behind its Beam-free interface (bytes in, logits or a reason out)."""
        s = self.settings
        return Classifier(self.spec, decode=s.decode, device=s.device, precision=self.precision,
                          channels_last=self.channels_last, compile=self.compile, threads=s.torch_threads,
                          target=s.decode_target, batch_size=self.batch_size, backend=self.backend)

    def summary(self) -> dict:
        """The stage as the run manifest records it."""
        return {"number": self.number, "model": self.key, "resolution": self.resolution,
                "threshold": self.threshold, "escalate": self.escalate, "gmacs": self.gmacs}


@dataclass(frozen=True)
class CascadePlan:
    task: TaskKind
    stages: tuple[StagePlan, ...]
    settings: RunSettings
    video: Optional[SamplingPlan] = None  # how videos are sampled, for the video tasks
    run_id: str = ""  # the run's id (pipelines.common.new_run_id), written in every row of its tables
    execution: Execution = Execution.FUSED

    @property
    def views(self) -> int:
        """Model inputs per record: 1 for an image or a frame, clips x crops for a video."""
        return self.video.views if self.task is TaskKind.VIDEO_CLIPS else 1


def task_kind(cfg: CascadeConfig) -> TaskKind:
    if cfg.video is None:
        return TaskKind.IMAGES
    return {Granularity.FRAME: TaskKind.VIDEO_FRAMES,
            Granularity.VIDEO: TaskKind.VIDEO_CLIPS}[Granularity(cfg.video.granularity)]


def build_plan(cfg: CascadeConfig, *, torch_threads: Optional[int] = None, check_models: bool = False,
               keep_models: bool = False) -> CascadePlan:
    """The plan of ``cfg`` (already validated). ``check_models`` builds each model with its weights and runs
    it once, so that a checkpoint that does not fit (shapes, class count) fails here, before any work, with a
    ``ConfigError`` naming the stage. ``keep_models``: the check loads each model as its stage will (on its
    device) and keeps it for the stage's first load in this process (``Classifier.check``): for runs whose
    workers are threads of this process. ``torch_threads`` replaces the config's value (the runner decides)."""
    specs = stage_specs(cfg)
    settings = RunSettings(Confidence(cfg.confidence), Aggregation(cfg.aggregation), cfg.decode, cfg.device,
                           ModelSharing(cfg.model_sharing),
                           cfg.torch_threads if torch_threads is None else torch_threads,
                           decode_target([spec.input for spec in specs]), cfg.circuit_breaker, cfg.shadow)
    kind = task_kind(cfg)
    video = None if cfg.video is None else sampling_plan(cfg.video)
    views = video.views if kind is TaskKind.VIDEO_CLIPS else 1
    stages = []
    for i, (stage, spec) in enumerate(zip(cfg.stages, specs)):
        last = i == len(cfg.stages) - 1
        planned = StagePlan(i + 1, spec, None if last else stage.threshold, 0.0,
                            stage.batch_size, Precision(stage.precision), stage.channels_last, stage.compile,
                            settings, None if last else stage.escalate,
                            tuple(sorted((k, str(v)) for k, v in stage.resources.items())),
                            stage_backend(cfg, stage))
        if check_models:
            try:
                if keep_models:
                    planned.classifier().check(keep=True)
                else:
                    registry.check_output(spec, registry.build(spec))
                    planned.classifier().check_backend()  # exported and checked once, for the workers
            except Exception as err:  # any way a model fails to build or run once is the config's, found before work
                raise ConfigError(f"stages.{i}.model: {err or type(err).__name__}") from None
        stages.append(replace(planned, gmacs=registry.gmacs(spec) * views))  # measured once the model is known good
    return CascadePlan(kind, tuple(stages), settings, video, execution=execution_of(cfg))
