"""ONNX Runtime as an inference backend on the CPU: a model exported once, checked against torch, then run
through ONNX Runtime's CPU execution provider.

``session_for(spec, module, threads)`` gives an ``OrtModel`` (uint8 ``(N, H, W, 3)`` crops in, float32
``(N, C)`` logits out: the normalisation of ``models.preprocess.to_model_input`` is part of the exported
graph) or, where the model cannot run there as torch runs it, None and the reason, logged once naming the
model. The export is cached in ``cache_dir()`` (the user's cache, never beside the weights) under a key of
the spec's identity (architecture, input, classes), the SHA-256 of its weights file and the versions of
torch, onnx and onnxruntime; the verdict of the check is cached with it, so a worker that finds the file
loads it without exporting or checking again.

The check: the exported model's logits against torch's (``models.inference.forward``, fp32) on the plan's
check input (a blank image, as ``registry.check_output``) and on ``CHECK_IMAGES`` real photos (those that
ship inside scikit-image), in one batch: every logit within ``TOLERANCE`` x max(1, largest |logit|) of
torch's, and the same class for every image. A model that does not export (data-dependent control flow
that tracing refuses, an operator ONNX lacks) or does not match runs on torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from importlib import metadata
from typing import Optional

import numpy as np
import torch

from models import registry

log = logging.getLogger("cascade")

TOLERANCE = 1e-3  # largest |logit difference| allowed, relative to the largest |logit| (at least 1)
CHECK_IMAGES = 4  # real photos in the check, besides the blank image
OPSET = 17
FORMAT = 1  # the exported graph's layout (uint8 NHWC in, normalised inside); a change makes new cache keys


def available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (which torch's exporter needs) are installed: found, not imported
    (onnx is imported only to export a model, the first time)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def cache_dir() -> str:
    """Where exported models are kept (``$XDG_CACHE_HOME``, else ``~/.cache``): the user's, never the weights'."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "cascade-inference", "onnx")


def _file_sha256(url: str) -> str:
    """The SHA-256 of a weights file, hashed once per process while its size and modification time hold."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(registry.resolve_weights(url))
    info = fs.info(path)
    stamp = (info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("updated") or ""))
    return _hash(fs, path, stamp)


@functools.lru_cache(maxsize=64)
def _hash(fs, path: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    """An installed package's version from its metadata: importing onnx only for it took 0.8 s of every start."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise ImportError(f"{package} is not installed") from None


def cache_key(spec: registry.ModelSpec) -> str:
    """The export's name: the spec's identity, its weights' hash and the tools' versions."""
    identity = dataclasses.asdict(dataclasses.replace(spec, class_names=(), weights=""))
    identity.update(weights_sha256=_file_sha256(spec.weights), torch=torch.__version__, onnx=_version("onnx"),
                    onnxruntime=_version("onnxruntime"), opset=OPSET, format=FORMAT)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"{spec.name}@{spec.input.resolution}-{digest}"


class _Pixels(torch.nn.Module):
    """``module`` fed uint8 ``(N, H, W, 3)`` crops, normalised inside the graph (``to_model_input``)."""

    def __init__(self, module: torch.nn.Module, spec: registry.ModelSpec):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(spec.input.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.input.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module((pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std)


def export(module: torch.nn.Module, spec: registry.ModelSpec) -> bytes:
    """The ONNX graph of ``module`` (eval mode, on the CPU) with a dynamic batch axis. TorchScript's exporter
    (``dynamo=False``): on torch 2.11 to 2.14 it needs only the ``onnx`` package, where the dynamo exporter
    also needs ``onnxscript``."""
    res = spec.input.resolution
    example = torch.zeros(2, res, res, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings; the check decides
        torch.onnx.export(_Pixels(module, spec).eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


class OrtModel:
    """An ONNX Runtime session of one exported model: uint8 ``(N, H, W, 3)`` -> float32 ``(N, C)`` logits.
    ``threads``: intra-op threads of each call (the worker's thread budget); calls from several threads at
    once are safe (ONNX Runtime's ``run`` is), each then runs on its caller's thread when ``threads`` is 1."""

    def __init__(self, model: bytes, threads: int, key: str = ""):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # threads that spin between calls take the cores the decoding threads and other workers need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.threads = threads
        self.key = key

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})[0]


def check_inputs(spec: registry.ModelSpec) -> np.ndarray:
    """The check's batch: the plan's blank input (all pixels 127, which normalise to about 0 as
    ``check_output``'s zeros do) and the crops of up to ``CHECK_IMAGES`` photos shipped in scikit-image."""
    from models.preprocess import BadInput, load_image

    crops = [np.full((spec.input.resolution,) * 2 + (3,), 127, dtype=np.uint8)]
    try:
        import skimage

        folder = os.path.join(os.path.dirname(skimage.__file__), "data")
        photos = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    except (ImportError, OSError):
        photos = []
    for name in photos:
        if len(crops) > CHECK_IMAGES:
            break
        try:
            with open(os.path.join(folder, name), "rb") as fh:
                crops.append(load_image(fh.read(), spec.input))
        except (BadInput, OSError):
            continue
    return np.stack(crops)


def compare(want: np.ndarray, got: np.ndarray) -> Optional[str]:
    """Why ``got`` (ONNX Runtime's logits) is not ``want`` (torch's) within the tolerance; None if it is."""
    if got.shape != want.shape:
        return f"returns logits of shape {got.shape}, torch {want.shape}"
    if not np.isfinite(got).all():
        return "returns non-finite logits where torch does not"
    diff = float(np.abs(got.astype(np.float64) - want).max())
    allowed = TOLERANCE * max(1.0, float(np.abs(want).max()))
    if diff > allowed:
        return f"logits differ from torch's by up to {diff:.3g} (allowed {allowed:.3g})"
    moved = int((got.argmax(1) != want.argmax(1)).sum())
    if moved:
        return f"{moved} of {len(want)} check images change class"
    return None


def _verdict(module: torch.nn.Module, spec: registry.ModelSpec) -> tuple[Optional[bytes], dict]:
    """Export ``module`` and check it: (the graph, the verdict) or (None, the verdict saying why not)."""
    from models import inference

    try:
        model = export(module, spec)
    except Exception as err:  # an export fails in many ways on arbitrary models; each means "run on torch"
        return None, {"ok": False, "reason": f"does not export to ONNX: {type(err).__name__}: "
                                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
    pixels = check_inputs(spec)
    try:
        want = inference.forward(module, spec, torch.from_numpy(pixels), channels_last=False,
                                 device=torch.device("cpu"))
        got = OrtModel(model, 1)(pixels)
    except Exception as err:
        return None, {"ok": False, "reason": f"ONNX Runtime cannot run the export: {type(err).__name__}: {err}"}
    reason = compare(want, got)
    diff = float(np.abs(got.astype(np.float64) - want).max()) if got.shape == want.shape else None
    return (None if reason else model), {"ok": reason is None, "reason": reason, "max_abs_diff": diff,
                                         "tolerance": TOLERANCE, "images": len(pixels)}


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=os.path.dirname(path), delete=False) as fh:
        fh.write(data)
    os.replace(fh.name, path)


def session_for(spec: registry.ModelSpec, module: Optional[torch.nn.Module], threads: int,
                build=None) -> tuple[Optional[OrtModel], Optional[str]]:
    """``spec``'s model in ONNX Runtime with ``threads`` intra-op threads, exported from ``module`` (or from
    ``build()``, called only when no checked export is cached) and checked; or (None, why not)."""
    if not available():
        return None, "onnxruntime (or onnx) is not installed: pip install onnxruntime onnx"
    try:
        key = cache_key(spec)
    except Exception as err:  # weights that cannot be read again: torch has them already
        return None, f"cannot hash the weights for the export cache: {type(err).__name__}: {err}"
    folder = cache_dir()
    model_path, verdict_path = os.path.join(folder, key + ".onnx"), os.path.join(folder, key + ".json")
    verdict: dict = {}
    with contextlib.suppress(OSError, ValueError):
        with open(verdict_path) as fh:
            verdict = json.load(fh)
    model = None
    if verdict.get("ok") is True:
        with contextlib.suppress(OSError):
            with open(model_path, "rb") as fh:
                model = fh.read()
    if model is None and verdict.get("ok") is not False:
        module = module if module is not None else build()
        model, verdict = _verdict(module, spec)
        try:  # a read-only home only costs the next process the export again
            if model is not None:
                _write(model_path, model)
            _write(verdict_path, json.dumps(verdict, indent=1).encode())
        except OSError:
            pass
    if model is None:
        return None, verdict.get("reason") or "the cached export was refused"
    try:
        return OrtModel(model, threads, key), None
    except Exception as err:
        return None, f"ONNX Runtime cannot load the export: {type(err).__name__}: {err}"
