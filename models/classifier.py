"""One model behind one object, without Beam: encoded bytes (or decoded images) in, per example either float32
logits or a ``Failure`` saying why not.

``Classifier`` owns what happens to a batch: decoding (PIL in a thread pool on the CPU, or nvJPEG next to a
CUDA model), normalising, the forward pass, and the bisection of a batch the model raises on, so that only
the examples that fail alone get a ``Failure``. ``LoadedModel`` is the part that holds the weights on the
device; it takes numpy arrays and bytes and returns numpy, so that one copy per machine can serve several
processes through a proxy that pickles arguments and results (Beam's ``share_model_across_processes``).
Pipelines wrap a ``Classifier`` in a thin RunInference model handler (``transforms.stage``), or call
``decode_once`` once per record and ``classify_pixels`` at each stage (``transforms.fused``).

Every stage of a run decodes for the same ``target`` (the largest size its stages resize to), so a stage's
input is the same whether it decodes the bytes itself (staged) or crops an image decoded earlier (fused).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from models import inference, onnxrt, registry
from models.failures import Category
from models.preprocess import (
    BadInput,
    DecodeConfig,
    Pixels,
    crop,
    decode_images,
    decode_pool,
    gpu_decodable,
    gpu_decode,
    load_batch,
    load_images,
)

log = logging.getLogger("cascade")


@dataclass(frozen=True)
class EncodedImage:
    """An image still encoded, as it waits in a batch: ``Classifier`` decodes the whole batch at once."""

    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Failure:
    """Stands in for the logits of an example that did not decode, or that the model failed on alone."""

    reason: str
    category: Category = Category.MODEL_ERROR


Example = np.ndarray | torch.Tensor | EncodedImage  # an (H, W, 3) uint8 crop (host or device), or bytes to decode


class LoadedModel:
    """A model loaded on its device: called with a batch of ``(H, W, 3)`` uint8 crops (a stacked array, or a
    list that may hold tensors already on the device and ``EncodedImage``s to decode on the device first),
    returns ``(N, C)`` float32 logits. ``target``: the draft target of the CPU fallback decode."""

    def __init__(self, module: torch.nn.Module, device: torch.device, spec: registry.ModelSpec, *,
                 channels_last: bool, precision: inference.Precision, target: Optional[int] = None,
                 session: Optional[onnxrt.OrtModel] = None):
        self.module = module
        self.device = device
        self.spec = spec
        self.channels_last = channels_last
        self.precision = precision
        self.target = target
        self.session = session  # set: the forward passes run in ONNX Runtime (checked against ``module``)

    @property
    def backend(self) -> inference.Backend:
        return inference.Backend.TORCH if self.session is None else inference.Backend.ONNXRUNTIME

    def __call__(self, batch: Sequence[Example]) -> np.ndarray:
        """Raises the ``BadInput`` of an encoded image that cannot be decoded, even on the CPU."""
        if self.session is not None and all(isinstance(x, np.ndarray) for x in batch):
            out = self.session(np.stack(batch))
            if out.shape != (len(batch), self.spec.num_classes):
                raise ValueError(f"model returned shape {tuple(out.shape)}, expected ({len(batch)}, "
                                 f"{self.spec.num_classes})")
            return out
        if not all(isinstance(x, np.ndarray) for x in batch):
            crops = iter(load_batch([x.data for x in batch if isinstance(x, EncodedImage)], self.spec.input,
                                    self.device, self.target))
            pixels = [next(crops) if isinstance(x, EncodedImage) else x if isinstance(x, torch.Tensor)
                      else torch.tensor(x, device=self.device)
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


_REFUSED: dict[str, str] = {}  # model key -> why it runs on torch where ONNX Runtime was chosen (logged once)


def _refused(key: str, why: str) -> None:
    if _REFUSED.get(key) != why:
        _REFUSED[key] = why
        log.warning("model %s runs on torch, not ONNX Runtime: %s", key, why)


_CHECKED: dict[str, LoadedModel] = {}  # repr(Classifier) -> its model, checked and kept for its first load()


def release_checked() -> None:
    """Drop the models ``Classifier.check(keep=True)`` kept that no ``load`` took (a run that ended early)."""
    _CHECKED.clear()


@dataclass(frozen=True)
class Classifier:
    """One registry model at one resolution, with how to load and feed it.

    ``classify(model, batch)`` decodes the batch first: with ``decode.gpu`` on a CUDA device, the JPEGs nvJPEG
    can take are left to the model's device (``LoadedModel``); the others are decoded by PIL in a pool of
    ``threads`` threads (all cores when 0). An example that does not decode gets a ``Failure`` with the
    reason. If the model raises on a batch, the batch is retried split in halves down to single examples,
    each level at half the size of the last, so only the examples that fail alone get a ``Failure``; their
    neighbours are still classified, at the batch size again once the culprits are set aside (``_infer``).
    Non-finite logits fail their example too. ``target``: the shorter side images are decoded for (the
    run's ``decode_target``; None: this model's own ``resize_to``). ``batch_size``: a smaller batch is padded
    to it (with copies of its first example), because an example's logits depend, in their last bits, on how
    many examples share its batch: padded, they do not depend on where bundles end or on the execution mode.
    It is bounded (``configs.schema.BOUNDS``), so padding never costs more than a full batch does."""

    spec: registry.ModelSpec
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    device: str = "auto"
    precision: inference.Precision = inference.Precision.FP32
    channels_last: bool = True
    compile: bool = False
    threads: int = 0
    target: Optional[int] = None
    batch_size: int = 0
    backend: inference.Backend = inference.Backend.AUTO

    def load(self) -> LoadedModel:
        """The model on its device; the one ``check(keep=True)`` loaded in this process, if any (once)."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        kept = _CHECKED.pop(repr(self), None)
        if kept is not None:
            return kept
        device = inference.resolve_device(self.device)
        module = inference.load(self.spec, device, channels_last=self.channels_last, compile=self.compile)
        session = None
        if self._backend(device) is inference.Backend.ONNXRUNTIME:
            session = self._session(module)
        return LoadedModel(module, device, self.spec, channels_last=self.channels_last, precision=self.precision,
                           target=self.target, session=session)

    def _backend(self, device: torch.device) -> inference.Backend:
        return inference.resolve_backend(self.backend, device, self.precision, self.compile)

    def _session(self, module: Optional[torch.nn.Module]) -> Optional[onnxrt.OrtModel]:
        """ONNX Runtime's session of this model, or None (logged once per process and model: why it runs on
        torch instead) where it cannot run there as it runs on torch."""
        session, why = onnxrt.session_for(self.spec, module, self.threads or os.cpu_count() or 1,
                                          build=lambda: inference.load(self.spec, "cpu", channels_last=False))
        if session is None:
            _refused(self.spec.key, why)
        return session

    def check_backend(self) -> Optional[str]:
        """Export and check the model for ONNX Runtime where this stage runs there (without loading it for
        the run): the reason it runs on torch instead, or None. Done once per model; the workers then find
        the checked export in the cache."""
        if self._backend(self._device()) is not inference.Backend.ONNXRUNTIME:
            return None
        return None if self._session(None) is not None else _REFUSED.get(self.spec.key)

    def check(self, keep: bool = False) -> None:
        """Load the model as ``load`` does and run it once on a blank input (``registry.check_output``).
        ``keep``: hold it for this process's first ``load`` of an equal classifier, so that a run whose
        workers are threads of this process builds each model once, not twice (``release_checked``)."""
        loaded = self.load()
        registry.check_output(self.spec, loaded.module)
        if keep:
            _CHECKED[repr(self)] = loaded

    def classify(self, model, batch: Sequence[Example]) -> list[np.ndarray | Failure]:
        """``model`` (a ``LoadedModel``, or a proxy of one) over ``batch``: per example, logits or a Failure."""
        return self._classify(model, self._decode(batch), list)

    def classify_pixels(self, model, pixels: Sequence[Pixels | BadInput]) -> list[np.ndarray | Failure]:
        """Images decoded by ``decode_once`` (for any stage of the run) -> this stage's crops, cut where the
        pixels are (host or device) -> per image, logits or a Failure (a ``BadInput`` fails its image)."""
        pool = self._pool()

        def crops(images):
            return list(pool.map(self._crop, images) if pool else map(self._crop, images))

        return self._classify(model, pixels, crops)

    def _crop(self, pixels: Pixels):
        return crop(pixels, self.spec.input)

    def _classify(self, model, items: Sequence, prepare) -> list[np.ndarray | Failure]:
        results: list = [Failure(str(x), x.category) if isinstance(x, BadInput) else None for x in items]
        ready = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(ready, self._infer(model, prepare([items[i] for i in ready])) if ready else ()):
            results[i] = result
        return results

    def decode_once(self, datas: Sequence[bytes]) -> list[Pixels | BadInput]:
        """Decode a batch once, for this and every later stage (``classify_pixels``): on a CUDA device with
        ``decode.gpu``, the JPEGs nvJPEG takes stay there as tensors; the others become PIL images, decoded
        in the pool's threads for the run's ``target``. What does not decode gets its ``BadInput``."""
        items: list = list(datas)
        gpu = [i for i, data in enumerate(items) if self._on_gpu() and gpu_decodable(data, self.decode.max_pixels)]
        for i, image in zip(gpu, gpu_decode([items[i] for i in gpu], self._device()) if gpu else ()):
            items[i] = image if image is not None else items[i]  # rejected by nvJPEG: PIL decodes it below
        cpu = [i for i, x in enumerate(items) if isinstance(x, bytes)]
        images = decode_images([items[i] for i in cpu], target=self._target(), max_pixels=self.decode.max_pixels,
                               pool=self._pool(), fast=self.decode.fast)
        for i, image in zip(cpu, images):
            items[i] = image
        return items

    def _device(self) -> torch.device:
        return inference.resolve_device(self.device)

    def _on_gpu(self) -> bool:
        return self.decode.gpu and self._device().type == "cuda"

    def _target(self) -> Optional[int]:
        return (self.target or self.spec.input.resize_to) if self.decode.draft else None

    def _pool(self):
        threads = self.threads or os.cpu_count() or 1
        return decode_pool(threads) if threads > 1 else None

    def _decode(self, batch: Sequence[Example]) -> list[Example | BadInput]:
        items = list(batch)
        cpu = [i for i, x in enumerate(items) if isinstance(x, EncodedImage)
               and not (self._on_gpu() and gpu_decodable(x.data, self.decode.max_pixels))]
        crops = load_images([items[i].data for i in cpu], self.spec.input, max_pixels=self.decode.max_pixels,
                            draft=self.decode.draft, pool=self._pool(), target=self.target, fast=self.decode.fast)
        for i, crop_ in zip(cpu, crops):
            items[i] = crop_
        return items

    def _size(self, n: int, depth: int) -> int:
        """The size a pass over ``n`` examples runs at, ``depth`` halvings into a failing batch's bisection:
        the stage's batch size halved ``depth`` times (rounded up; never below ``n``). So a partial batch runs
        at the batch size, as a full one does, and each bisection level really is half the size of the last."""
        return max(n, -(-self.batch_size // (1 << depth))) if self.batch_size else n

    def _forward(self, model, batch: Sequence[Example], size: int) -> np.ndarray:
        n = len(batch)
        if n < size:
            batch = [*batch, *[batch[0]] * (size - n)]
        return model(batch)[:n]

    def _infer(self, model, batch: Sequence[Example]) -> list[np.ndarray | Failure]:
        """Logits (or a Failure) per example of ``batch``; a batch the model raises on is bisected (``_bisect``).
        When bisection set records aside, the others run again at the batch size, in one pass: a poison
        record's neighbours get the logits they get in any other batch. If that pass fails too, the failure
        depends on the batch's size (memory): the logits of the smaller passes stand, and a warning says so."""
        try:
            logits = self._forward(model, batch, self._size(len(batch), 0))
        except Exception as err:  # a bad batch must not fail the job: bisect down to the culprit
            results = self._bisect(model, batch, err, 0)
            kept = [i for i, r in enumerate(results) if not isinstance(r, Failure)]
            if 0 < len(kept) < len(batch):
                try:
                    for i, row in zip(kept, self._checked(self._forward(model, [batch[i] for i in kept],
                                                                        self._size(len(kept), 0)))):
                        results[i] = row
                    return results
                except Exception:
                    pass
            if kept:
                _warn_smaller(self.spec.key, self.batch_size, err)
            return results
        return self._checked(logits)

    def _bisect(self, model, batch: Sequence[Example], err: Exception, depth: int) -> list[np.ndarray | Failure]:
        """``batch`` failed with ``err`` at ``depth``: its halves run at half that size, recursively, so only
        the examples that fail alone get a ``Failure``."""
        if len(batch) == 1:
            if isinstance(err, BadInput):  # an encoded image that no decoder could read
                return [Failure(str(err), err.category)]
            return [Failure(f"model {self.spec.key} failed: {failure_reason(err)}")]
        results = []
        for half in (batch[:len(batch) // 2], batch[len(batch) // 2:]):
            try:
                results += self._checked(self._forward(model, half, self._size(len(half), depth + 1)))
            except Exception as half_err:
                results += self._bisect(model, half, half_err, depth + 1)
        return results

    def _checked(self, logits: np.ndarray) -> list[np.ndarray | Failure]:
        return [row if np.isfinite(row).all() else
                Failure(f"model {self.spec.key} returned non-finite logits (NaN or inf)") for row in logits]


_WARNED: set = set()


def _warn_smaller(key: str, batch_size: int, err: Exception) -> None:
    """Once per model and batch size and process: batches of that size fail as a whole, smaller passes run."""
    if (key, batch_size) not in _WARNED:
        _WARNED.add((key, batch_size))
        log.warning("model %s: batches of %d fail (%s); their records ran in smaller passes, whose logits may "
                    "differ from full batches' in their last bits: lower the stage's batch_size", key,
                    batch_size, failure_reason(err))
