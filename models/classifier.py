"""One model behind one object, without Beam: encoded bytes (or decoded crops) in, per example either float32
logits or a ``Failure`` saying why not.

``Classifier`` owns what happens to a batch: decoding (PIL in a thread pool on the CPU, or nvJPEG next to a
CUDA model), normalising, the forward pass, and the bisection of a batch the model raises on, so that only
the examples that fail alone get a ``Failure``. ``LoadedModel`` is the part that holds the weights on the
device; it takes numpy arrays and bytes and returns numpy, so that one copy per machine can serve several
processes through a proxy that pickles arguments and results (Beam's ``share_model_across_processes``).
Pipelines wrap a ``Classifier`` in a thin RunInference model handler (``transforms.stage``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from models import inference, registry
from models.failures import Category
from models.preprocess import BadInput, DecodeConfig, decode_pool, gpu_decodable, load_batch, load_images


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


Example = np.ndarray | EncodedImage  # an (H, W, 3) uint8 crop, or bytes to decode


class LoadedModel:
    """A model loaded on its device: called with a batch of ``(H, W, 3)`` uint8 crops (a stacked array, or a
    list that may hold ``EncodedImage``s to decode on the device first), returns ``(N, C)`` float32 logits."""

    def __init__(self, module: torch.nn.Module, device: torch.device, spec: registry.ModelSpec, *,
                 channels_last: bool, precision: inference.Precision):
        self.module = module
        self.device = device
        self.spec = spec
        self.channels_last = channels_last
        self.precision = precision

    def __call__(self, batch: Sequence[Example]) -> np.ndarray:
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


@dataclass(frozen=True)
class Classifier:
    """One registry model at one resolution, with how to load and feed it.

    ``classify(model, batch)`` decodes the batch first: with ``decode.gpu`` on a CUDA device, the JPEGs nvJPEG
    can take are left to the model's device (``LoadedModel``); the others are decoded by PIL in a pool of
    ``threads`` threads (all cores when 0). An example that does not decode gets a ``Failure`` with the
    reason. If the model raises on a batch, the batch is retried split in halves down to single examples,
    so only the examples that fail alone get a ``Failure``; their neighbours are still classified.
    Non-finite logits fail their example too."""

    spec: registry.ModelSpec
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    device: str = "auto"
    precision: inference.Precision = inference.Precision.FP32
    channels_last: bool = True
    compile: bool = False
    threads: int = 0

    def load(self) -> LoadedModel:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        device = inference.resolve_device(self.device)
        module = inference.load(self.spec, device, channels_last=self.channels_last, compile=self.compile)
        return LoadedModel(module, device, self.spec, channels_last=self.channels_last, precision=self.precision)

    def classify(self, model, batch: Sequence[Example]) -> list[np.ndarray | Failure]:
        """``model`` (a ``LoadedModel``, or a proxy of one) over ``batch``: per example, logits or a Failure."""
        items = self._decode(batch)
        results: list = [Failure(str(x), x.category) if isinstance(x, BadInput) else None for x in items]
        ready = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(ready, self._infer(model, [items[i] for i in ready]) if ready else ()):
            results[i] = result
        return results

    def _decode(self, batch: Sequence[Example]) -> list[Example | BadInput]:
        on_gpu = self.decode.gpu and inference.resolve_device(self.device).type == "cuda"
        items = list(batch)
        cpu = [i for i, x in enumerate(items) if isinstance(x, EncodedImage)
               and not (on_gpu and gpu_decodable(x.data, self.decode.max_pixels))]
        threads = self.threads or os.cpu_count() or 1
        crops = load_images([items[i].data for i in cpu], self.spec.input, max_pixels=self.decode.max_pixels,
                            draft=self.decode.draft, pool=decode_pool(threads) if threads > 1 else None)
        for i, crop in zip(cpu, crops):
            items[i] = crop
        return items

    def _infer(self, model, batch: Sequence[Example]) -> list[np.ndarray | Failure]:
        try:
            logits = model(batch)
        except Exception as err:  # a bad batch must not fail the job: bisect down to the culprit
            if len(batch) == 1:
                if isinstance(err, BadInput):  # an encoded image that no decoder could read
                    return [Failure(str(err), err.category)]
                return [Failure(f"model {self.spec.key} failed: {failure_reason(err)}")]
            half = len(batch) // 2
            return self._infer(model, batch[:half]) + self._infer(model, batch[half:])
        return [row if np.isfinite(row).all() else
                Failure(f"model {self.spec.key} returned non-finite logits (NaN or inf)") for row in logits]
