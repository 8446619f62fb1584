"""The one structured schema of every cascade config, and its loading and validation.

Load = defaults of the schema, merged with a YAML profile, merged with dotted overrides from the
command line; unknown keys and wrong types fail in OmegaConf, cross-field rules fail in ``validate``
with a ``ConfigError`` whose message starts with the offending key. All of it happens before any work.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models import registry
from models.committee import Aggregation, Confidence
from models.failures import BreakerConfig
from models.inference import Backend, Precision
from models.preprocess import INTERPOLATIONS, DecodeConfig
from models.video import Sampling, SamplingPlan

log = logging.getLogger("cascade.config")

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class ConfigError(ValueError):
    """An invalid config; the message names the key."""


class Execution(str, enum.Enum):
    """How the stages of a cascade run (docs/ARCHITECTURE.md, "Execution modes")."""

    FUSED = "fused"  # all stages in one step per worker: each record decoded once, escalations wait in buffers
    STAGED = "staged"  # one step per stage, escalated records re-batched through a shuffle (stages on other machines)


# Beam resource hints a stage may carry (``stages[i].resources``), with how their values are checked here;
# a test checks that Beam knows each name and parses the values these checks accept.
RESOURCE_HINTS = {
    "accelerator": r".+",  # e.g. "type:nvidia-l4;count:1;install-nvidia-driver"
    "min_ram": r"\d+(\.\d+)?\s*([KMGTP]i?B|B)?",  # e.g. "16GB", "32GiB"
    "cpu_count": r"[1-9]\d*",
}


@dataclass(frozen=True)
class Bound:
    """A numeric key's range: outside it the key cannot work (it overflows, divides by zero, or exhausts the
    memory or storage of a machine), so it is refused when the config loads, with ``why``. ``key`` is dotted;
    ``*`` stands for every stage (``stages.*``) or every user model (``models.*``); a key whose value is
    None (unset) is not checked."""

    key: str
    low: float
    high: float
    why: str
    low_open: bool = False  # the range is (low, high], not [low, high]

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high  # NaN: False

    def range_text(self) -> str:
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


MAX_BATCH = 4096  # images per forward pass: 4096 x 3 x 260^2 float32 inputs are 3.3 GB before any activation
MAX_TIMEOUT_S = 86_400.0  # one day; timers take no inf (OverflowError), and a read stalled longer is a dead one
# Every numeric key of the schema that a run reads, with the range in which it can work (docs/ROBUSTNESS.md,
# "Settings that cannot work"); a test checks that each is refused just outside its range, at inf and at NaN,
# and that every numeric key of the schema has a row here (CalibrationInfo's figures excepted: reports only).
BOUNDS: tuple[Bound, ...] = (
    Bound("stages.*.batch_size", 1, MAX_BATCH, "a partial batch is padded to it, so it is memory spent on "
          "every batch"),
    Bound("stages.*.resolution", 16, 4096, "the model's input side in pixels"),
    Bound("stages.*.threshold", 0, 1, "a confidence is in [0, 1]"),
    Bound("stages.*.escalate", 0, 1, "a share of the stage's records"),
    Bound("models.*.resolution", 16, 4096, "the model's input side in pixels"),
    Bound("models.*.crop_pct", 0, 1, "the share of the image's shorter side the crop keeps", low_open=True),
    Bound("models.*.num_classes", 1, 1_000_000, "logits per image"),
    Bound("decode.max_pixels", 1, 2**31, "pixels of one decoded image; 2^31 RGB pixels are 6.4 GB"),
    Bound("decode.max_bytes", 1, 2**36, "bytes of one input read into memory (64 GiB)"),
    Bound("decode.read_timeout_s", 0.01, MAX_TIMEOUT_S, "seconds one read may take; finite"),
    Bound("torch_threads", 0, 1024, "intra-op threads per worker process"),
    Bound("output_shards", 0, 10_000, "Parquet files per table; each shard is a file, and a temporary file per "
          "bundle, on the output's storage"),
    Bound("video.every_n", 1, 1_000_000, "frames between two sampled frames"),
    Bound("video.fps", 0.001, 1000, "sampled frames per second of video time; finite, and at least one frame "
          "per 1,000 s"),
    Bound("video.clips", 1, 1000, "views per video, all in one record"),
    Bound("video.crops", 1, 16, "crops per clip, all in one record"),
    Bound("video.max_frames", 1, 1_000_000, "frames kept per video while it decodes"),
    Bound("video.min_coverage", 0, 1, "a share of the video's declared length"),
    Bound("circuit_breaker.window", 0, 1_000_000, "records per stage and worker the breaker looks back over; "
          "0: off"),
    Bound("circuit_breaker.share", 0.5, 1, "the share of the window failing with one category that stops the "
          "job", low_open=True),
    Bound("shadow", 0, 1, "a share of the records"),
    Bound("limit", 0, 2**40, "inputs in a trial; 0: all"),
    Bound("read.in_flight", 1, 4096, "reads in flight at once per worker thread"),
    Bound("read.bytes_in_flight", 1, 2**40, "bytes those reads may hold at once"),
    Bound("read.attempts", 1, 20, "tries of an HTTP read failing transiently"),
    Bound("read.backoff_s", 0, 60, "seconds before the second try; finite"),
    Bound("read.retry_after_max_s", 0, 3600, "the longest Retry-After honoured, in seconds; finite"),
)


def _bound_values(cfg, parts: list[str], prefix: str = ""):
    """(dotted key, value) of every value ``parts`` names in ``cfg`` (``*``: every list item or dict key)."""
    if not parts:
        yield prefix, cfg
        return
    head, rest = parts[0], parts[1:]
    if cfg is None:
        return
    if head == "*":
        items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg)
        for name, item in items:
            yield from _bound_values(item, rest, f"{prefix}{name}.")
    else:
        yield from _bound_values(getattr(cfg, head), rest, f"{prefix}{head}." if rest else f"{prefix}{head}")


def check_bounds(cfg: "CascadeConfig") -> None:
    """Every ``BOUNDS`` row over ``cfg``: the first value outside its range fails, naming its key."""
    for bound in BOUNDS:
        for key, value in _bound_values(cfg, bound.key.split(".")):
            if value is not None and not bound.allows(value):
                raise ConfigError(f"{key}: must be in {bound.range_text()}, got {value} ({bound.why})")


class ModelSharing(str, enum.Enum):
    PROCESS = "process"  # one model per worker process (Beam's default)
    MACHINE = "machine"  # one model per machine, shared by its processes (Beam's large_model)


@dataclass
class StageConfig:
    model: str = MISSING  # registered model name (see models.registry) or a key of `models`
    resolution: Optional[int] = None  # input resolution, 16..4096; default: the model's own (another = self-cascade)
    batch_size: int = 32  # images per inference batch, 1..4096; every batch but a bundle's last is full
    threshold: float = 1.0  # in [0, 1]: exit when confidence >= threshold; 1 never exits; ignored on the last stage
    # a compute budget instead of a threshold: the share of the records reaching this stage to send on; the
    # threshold is then the run's quantile of this stage's confidences (Beam's approximate quantiles)
    escalate: Optional[float] = None
    precision: Precision = Precision.FP32  # autocast precision on CUDA; logits stay float32
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU and GPU)
    compile: bool = False  # torch.compile the model once per process
    resources: dict[str, str] = field(default_factory=dict)  # Beam resource hints of the stage's step (staged)
    backend: Optional[Backend] = None  # auto | torch | onnxruntime for this stage; unset: the run's `backend`


@dataclass
class ModelDef:
    """A user model from the config: a torchvision, timm or EfficientNet-Lite architecture with a state dict,
    or a TorchScript file. Preprocessing left unset comes from the architecture (timm's pretrained_cfg),
    else from the defaults below."""

    arch: str = MISSING  # "torchvision:<builder>", "timm:<name>", "efficientnet-lite:<0-4>" or "torchscript"
    weights: str = MISSING  # state dict (or TorchScript file) URL read through fsspec, or a local path
    resolution: Optional[int] = None  # 16..4096; default: the architecture's (timm), else 224
    crop_pct: Optional[float] = None  # in (0, 1]; default: the architecture's, else 0.875
    interpolation: Optional[str] = None  # default: the architecture's, else bicubic
    mean: Optional[list[float]] = None  # on the 0..255 scale; default: the architecture's, else 127
    std: Optional[list[float]] = None  # on the 0..255 scale; default: the architecture's, else 128
    num_classes: int = 1000  # 1..1,000,000
    class_names: Optional[str] = None  # URL of a text file, one name per line; default: ImageNet's if 1000


class Granularity(str, enum.Enum):
    FRAME = "frame"  # every sampled frame is a record; plus one row per video (mean of its frames' logits)
    VIDEO = "video"  # a video is the record: each stage runs on all its views, and it exits as a whole


@dataclass
class VideoConfig:
    """Inputs are videos (see docs/VIDEO.md)."""

    granularity: Granularity = Granularity.FRAME
    sampling: Sampling = Sampling.EVERY_N  # every_n | fps | uniform (uniform only, at video granularity)
    every_n: int = 30  # every_n: frames 0, n, 2n, ... of the decoded stream; 1..1,000,000
    fps: float = 1.0  # fps: frames per second of video time; 0.001..1000
    clips: int = 10  # uniform: K temporal positions, the centres of K equal segments; 1..1000
    crops: int = 1  # uniform: S square crops along the longer side per position (video granularity); 1..16
    max_frames: int = 5000  # sampled frames kept per video while it decodes, 1..1,000,000; more -> dead letter
    min_coverage: float = 0.9  # in [0, 1]: decoded frames must cover this share of the declared length


@dataclass
class CalibrationInfo:
    """What pipelines.calibrate measured on records it did not choose on; read by reports, never by routing."""

    target: Optional[str] = None  # what the cascade was calibrated for, e.g. match:lite2@260 or agree:lite2@260:0.97
    data: Optional[str] = None  # the records it was calibrated on
    heldout_records: Optional[int] = None
    heldout_groups: Optional[int] = None  # source images of those records (the unit of the split)
    heldout_accuracy: Optional[float] = None  # promise: accuracy >= heldout_accuracy - margin on data alike
    margin: Optional[float] = None
    heldout_gmacs: Optional[float] = None  # average GMACs per record on the held-out records
    gmacs_margin: Optional[float] = None  # the same standard errors as `margin`, on the average GMACs
    expected_exit_ratios: Optional[list[float]] = None  # share of records exiting at each stage (sums to 1)
    expected_escalated: Optional[list[float]] = None  # share of records sent past each stage but the last
    agreement_reference: Optional[str] = None  # label-free targets: the entry or ensemble agreed with
    heldout_agreement: Optional[float] = None  # share of held-out records predicted as the reference predicts
    agreement_margin: Optional[float] = None
    # the cascade these figures were measured for (``signature``): they describe a run only when it is the same
    cascade: Optional[str] = None


@dataclass
class ReadConfig:
    """Reading inputs' bytes, many at a time per worker thread (docs/READING.md); each read is bounded by
    decode.read_timeout_s and decode.max_bytes."""

    in_flight: int = 64  # reads in flight at once per reader (worker thread); ~in_flight / latency records/s
    bytes_in_flight: int = 64 * 1024 * 1024  # bytes those reads may hold at once (one larger input goes alone)
    attempts: int = 3  # tries of an HTTP read failing transiently (429/500/502/503/504, reset); 1: no retry
    backoff_s: float = 0.2  # wait before the second try, doubled before each next one (x0.5-1.5 jitter)
    retry_after_max_s: float = 10.0  # the longest server Retry-After honoured (a longer one waits this long)


@dataclass
class CascadeConfig:
    input: str = ""  # glob of image URLs, or a manifest (.csv / .parquet); empty: the embedded demo set
    output: str = "out/cascade"  # output folder (local path or URL)
    overwrite: bool = False  # allow replacing the outputs of an earlier run in `output`
    skip_done: bool = False  # add a run to `output`: skip the ids its committed runs have (predictions, dead letters)
    retry_dead_letters: bool = False  # with skip_done: an id only an earlier run's dead_letter has is tried again
    limit: int = 0  # classify only the first N inputs in listing order (a trial on a subset); 0: all of them
    stages: list[StageConfig] = field(default_factory=list)
    confidence: Confidence = Confidence.MAX_PROB
    # how a stage's answer is made: the committee of the stages so far (logits: mean of logits, the paper's;
    # probs: mean of probabilities), or last: the stage's own model alone (the early-exit cascade)
    aggregation: Aggregation = Aggregation.LOGITS
    # a share in [0, 1] of the records (chosen by a hash of the id: a rerun picks the same ones) that go through
    # every stage whatever their confidence; their rows keep the cascade's decision, with every stage's answer in
    # `stages`, and exit_stats measures each stage's agreement with the last stage on them (docs/CALIBRATION.md)
    shadow: float = 0.0
    models: dict[str, ModelDef] = field(default_factory=dict)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    read: ReadConfig = field(default_factory=ReadConfig)  # reads in flight, retries (docs/READING.md)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    model_sharing: ModelSharing = ModelSharing.PROCESS
    torch_threads: int = 0  # intra-op (and batch-decoding) threads per worker process, 0..1024; 0: cores / processes
    # what runs the forward passes: auto (ONNX Runtime on the CPU where the model exports and matches torch,
    # torch on CUDA), torch, or onnxruntime (CPU only, fp32; a model that cannot runs on torch, said at the start)
    backend: Backend = Backend.AUTO
    output_shards: int = 0  # Parquet files per table, 0..10,000; 0: let the runner decide
    # a stage whose records (nearly) all fail with one category stops the job, uncommitted (BreakerConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    video: Optional[VideoConfig] = None  # set: the inputs are videos, sampled and classified as it says
    calibration: Optional[CalibrationInfo] = None  # held-out figures of pipelines.calibrate (ignored by routing)
    # fused: all stages in one step, decode once; staged: a step per stage. Unset: fused where it can run, staged
    # where the config needs it (video granularity, a budget stage, model_sharing: machine; see execution_of)
    execution: Optional[Execution] = None


def profile_path(name_or_path: str) -> str:
    """A profile name (``lite_cascade``) or a YAML path."""
    if os.path.exists(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, f"{name_or_path.removesuffix('.yaml')}.yaml")
    if os.path.exists(candidate):
        return candidate
    profiles = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"config: no file {name_or_path!r} and no profile of that name; profiles: {', '.join(profiles)}")


def load(config: Optional[str] = None, overrides: Optional[list[str]] = None, **values: Any) -> CascadeConfig:
    """Schema defaults <- YAML profile <- ``values`` (non-None) <- dotted ``overrides``; then validated."""
    try:
        merged = OmegaConf.structured(CascadeConfig)
        if config:
            merged = OmegaConf.merge(merged, _load_yaml(profile_path(config)))
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            merged = OmegaConf.merge(merged, given)
        for override in overrides or ():
            key, sep, value = override.partition("=")
            if not sep:
                raise ConfigError(f"{override}: an override is key=value")
            parts = key.strip().split(".")
            if any(part.isdigit() for part in parts):
                # list items are addressed by index (stages.0.threshold): update in place, a dotlist cannot;
                # the index one past the end appends a new stage
                if parts[0] == "stages" and parts[1].isdigit() and int(parts[1]) == len(merged.stages):
                    merged.stages.append(OmegaConf.structured(StageConfig))
                try:
                    parsed = yaml.safe_load(value) if value.strip() else ""
                except yaml.YAMLError as err:
                    raise ConfigError(f"{override}: the value is not valid YAML: {_first_line(err)}") from None
                OmegaConf.update(merged, key.strip(), parsed, merge=True)
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{key or 'config'}: {err.msg if hasattr(err, 'msg') else err}") from None
    validate(cfg)
    return cfg


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _load_yaml(path: str) -> DictConfig:
    """A YAML config file as a mapping; syntax errors, duplicate keys and anything but a mapping at the top
    are ``ConfigError``s naming the file, never tracebacks."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:  # syntax errors and duplicate keys, with their line and column
        raise ConfigError(f"config: {path} is not valid YAML: {_first_line(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config: cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config: {path} must hold a mapping of keys (stages:, models:, ...) at the top, "
                          f"not a {type(loaded).__name__.removesuffix('Config').lower()}")
    return loaded


def to_yaml(cfg: CascadeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> CascadeConfig:
    """A config that ``to_yaml`` wrote (a run record's), loaded and validated as a YAML file is."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        fh.write(text)
        fh.flush()
        return load(fh.name)


def user_spec(name: str, mdef: ModelDef) -> registry.ModelSpec:
    """The registry spec of one of the config's own models (read only from the config: nothing is registered)."""
    try:
        registry.architecture(mdef.arch, name)
        base = registry.default_input(mdef.arch, mdef.resolution)
        given = {"resolution": mdef.resolution, "crop_pct": mdef.crop_pct, "interpolation": mdef.interpolation,
                 "mean": None if mdef.mean is None else tuple(mdef.mean),
                 "std": None if mdef.std is None else tuple(mdef.std)}
        spec = registry.ModelSpec(
            name=name, arch=mdef.arch, weights=mdef.weights,
            input=dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None}),
            num_classes=mdef.num_classes, class_names=_read_class_names(mdef),
        )
    except (ValueError, OSError) as err:
        raise ConfigError(f"models.{name}: {err}") from None
    return spec


def _read_class_names(mdef: ModelDef) -> tuple[str, ...]:
    if mdef.class_names:
        import fsspec

        with fsspec.open(mdef.class_names, "rt", encoding="utf-8") as fh:
            return tuple(line.strip() for line in fh if line.strip())
    return registry.imagenet_class_names() if mdef.num_classes == 1000 else ()


def stage_spec(cfg: CascadeConfig, index: int) -> registry.ModelSpec:
    """Stage ``index``'s model at the stage's resolution: one of the config's own models, else a registered one."""
    stage = cfg.stages[index]
    if stage.model in cfg.models:
        return user_spec(stage.model, cfg.models[stage.model]).at(stage.resolution)
    try:
        return registry.get(stage.model, stage.resolution)
    except ValueError as err:
        raise ConfigError(f"stages.{index}.model: {err}; or a key of models ({', '.join(cfg.models)})"
                          if cfg.models else f"stages.{index}.model: {err}") from None


def stage_specs(cfg: CascadeConfig) -> list[registry.ModelSpec]:
    """The spec of each stage, at the stage's resolution."""
    return [stage_spec(cfg, i) for i in range(len(cfg.stages))]


def signature(cfg: CascadeConfig) -> str:
    """What decides a cascade's exits, in one line: each stage's model, resolution and threshold (or budget),
    the confidence function and the aggregation. Two configs of one signature route every record alike."""
    stages = []
    last = len(cfg.stages) - 1
    for i, (spec, stage) in enumerate(zip(stage_specs(cfg), cfg.stages)):
        rule = ("" if i == last else f" escalate {stage.escalate:.6g}" if stage.escalate is not None
                else f" >= {stage.threshold:.6f}")
        stages.append(f"{spec.key}{rule}")
    confidence = Confidence(cfg.confidence).name.lower()
    aggregation = Aggregation(cfg.aggregation).name.lower()
    return f"{' -> '.join(stages)}; confidence {confidence}; aggregation {aggregation}"


def calibration_mismatch(cfg: CascadeConfig) -> Optional[str]:
    """Why the config's ``calibration:`` figures do not describe a run of this config (None when they do): its
    stages, models, resolutions, thresholds, confidence or aggregation are not the calibrated ones."""
    cal = cfg.calibration
    if cal is None:
        return "the config has no calibration block"
    if not cal.cascade:
        return "the calibration block does not record the cascade it was measured for (calibration.cascade)"
    mine = signature(cfg)
    if mine != cal.cascade:
        return f"this config's cascade ({mine}) is not the calibrated one ({cal.cascade})"
    return None


def sampling_plan(video: VideoConfig) -> SamplingPlan:
    return SamplingPlan(Sampling(video.sampling), video.every_n, video.fps, video.clips, video.crops,
                        video.max_frames, video.min_coverage)


def validate_video(video: VideoConfig) -> None:
    granularity, sampling = Granularity(video.granularity), Sampling(video.sampling)
    if granularity is Granularity.VIDEO and sampling is not Sampling.UNIFORM:
        raise ConfigError("video.sampling: video granularity needs uniform sampling (a fixed number of views "
                          f"per video, clips x crops), got {sampling.value}")
    if granularity is Granularity.FRAME and video.crops != 1:
        raise ConfigError(f"video.crops: spatial crops are views of a video (granularity video); got {video.crops}")


def staged_needs(cfg: CascadeConfig) -> list[str]:
    """Why ``cfg`` cannot run fused, each reason a message naming the key (empty: it can)."""
    needs = []
    if cfg.video is not None and Granularity(cfg.video.granularity) is Granularity.VIDEO:
        needs.append("execution: fused runs image and frame records; video granularity (a video's views decided "
                     "together) runs staged: set execution: staged")
    budgeted = next((i for i, stage in enumerate(cfg.stages) if stage.escalate is not None), None)
    if budgeted is not None:
        needs.append(f"execution: fused routes each batch as it runs; stages.{budgeted}.escalate (a share of the "
                     "whole run's records) needs every confidence first: set execution: staged")
    if ModelSharing(cfg.model_sharing) is ModelSharing.MACHINE:
        needs.append("execution: fused keeps the decoded images next to each process's models; model_sharing: "
                     "machine needs execution: staged")
    return needs


def execution_of(cfg: CascadeConfig) -> Execution:
    """The config's execution mode: as set, else fused where it can run and staged where it cannot."""
    if cfg.execution is not None:
        return Execution(cfg.execution)
    return Execution.STAGED if staged_needs(cfg) else Execution.FUSED


def stage_backend(cfg: CascadeConfig, stage: StageConfig) -> Backend:
    """The backend a stage asks for: its own ``backend``, else the run's."""
    return Backend(stage.backend if stage.backend is not None else cfg.backend)


def _backend_problem(cfg: CascadeConfig, stage: StageConfig) -> str:
    """Why an explicit ``onnxruntime`` cannot run the stage ("" where it can, and always for auto/torch)."""
    if stage_backend(cfg, stage) is not Backend.ONNXRUNTIME:
        return ""
    if cfg.device not in ("auto", "cpu"):
        return f"onnxruntime runs on the CPU; device is {cfg.device} (use backend: torch or auto there)"
    if Precision(stage.precision) is not Precision.FP32:
        return f"onnxruntime runs in fp32; the stage's precision is {Precision(stage.precision).value}"
    if stage.compile:
        return "onnxruntime runs an exported graph; compile: true is torch's (set one of them)"
    from models import onnxrt

    if not onnxrt.available():
        return "onnxruntime (or onnx) is not installed: pip install onnxruntime onnx, or use backend: auto"
    return ""


def validate(cfg: CascadeConfig) -> None:
    """Cross-field rules, each failing with the key it concerns."""
    if not cfg.stages:
        raise ConfigError("stages: at least one stage is needed")
    check_bounds(cfg)
    for name, mdef in cfg.models.items():
        if mdef.interpolation is not None and mdef.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"models.{name}.interpolation: {mdef.interpolation!r} is not one of {sorted(INTERPOLATIONS)}"
            )
        if (mdef.mean is not None and len(mdef.mean) != 3) or (mdef.std is not None and (
                len(mdef.std) != 3 or min(mdef.std) <= 0)):
            raise ConfigError(f"models.{name}.mean/std: need 3 values each, std > 0")
        user_spec(name, mdef)
    classes = None
    for i, stage in enumerate(cfg.stages):
        key = f"stages.{i}"
        spec = stage_spec(cfg, i)
        if stage.escalate is not None:
            if i == len(cfg.stages) - 1:
                raise ConfigError(f"{key}.escalate: the last stage escalates nothing (every record exits there)")
            if stage.threshold != 1.0:  # a budget given on a calibrated profile: the budget decides
                log.warning("%s.threshold=%s is replaced by %s.escalate=%s: the threshold is the run's quantile of "
                            "that share", key, stage.threshold, key, stage.escalate)
        if i == len(cfg.stages) - 1 and stage.threshold != 1.0:
            # accepted so that sweeps like "every threshold 0" stay one command; it decides nothing
            log.warning("%s.threshold=%s is ignored: the last stage exits every record (a cascade has one fewer "
                        "threshold than stages)", key, stage.threshold)
        if classes is not None and spec.num_classes != classes:
            raise ConfigError(
                f"{key}.model: {spec.name} has {spec.num_classes} classes but stage 0 has {classes}; "
                "the stages of a cascade must share one label space"
            )
        classes = spec.num_classes
        backend_problem = _backend_problem(cfg, stage)
        if backend_problem:
            raise ConfigError(f"{key}.backend: {backend_problem}" if stage.backend is not None
                              else f"backend: {backend_problem} (stage {i})")
        for hint, value in stage.resources.items():
            if hint not in RESOURCE_HINTS:
                raise ConfigError(f"{key}.resources.{hint}: not a resource hint; known: {', '.join(RESOURCE_HINTS)}")
            if not re.fullmatch(RESOURCE_HINTS[hint], str(value).strip()):
                raise ConfigError(f"{key}.resources.{hint}: {value!r} is not a valid value")
    if not DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device: {cfg.device!r} is not one of auto, cpu, cuda, cuda:N (N a GPU index)")
    if not cfg.output:
        raise ConfigError("output: an output folder is needed")
    if cfg.video is not None:
        validate_video(cfg.video)
    if cfg.skip_done and cfg.overwrite:
        raise ConfigError("skip_done: --overwrite removes the earlier runs whose ids --skip_done skips; give one")
    if cfg.retry_dead_letters and not cfg.skip_done:
        raise ConfigError("retry_dead_letters: retries the dead letters of earlier runs, with skip_done")
    if cfg.skip_done and cfg.video is not None and Granularity(cfg.video.granularity) is Granularity.FRAME:
        raise ConfigError("skip_done: at frame granularity a listed video becomes frame rows, whose ids are not "
                          "the listed ones; skip done videos with a manifest of the others")
    if Aggregation(cfg.aggregation) is Aggregation.LAST:
        idle = next((i for i, st in enumerate(cfg.stages[:-1]) if st.threshold >= 1.0 and st.escalate is None), None)
        if idle is not None:
            raise ConfigError(f"aggregation: last takes each stage's answer from its own model, so stages.{idle} "
                              f"(threshold {cfg.stages[idle].threshold}: no record exits there) would run for "
                              f"nothing; give stages.{idle}.threshold < 1, remove the stage, or aggregate "
                              "(aggregation: logits)")
    needs = staged_needs(cfg)
    if cfg.execution is not None and Execution(cfg.execution) is Execution.FUSED and needs:
        raise ConfigError(needs[0])
