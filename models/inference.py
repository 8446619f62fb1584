"""Running one model on a batch of preprocessed images: the code the pipeline's model handler and the
plain-PyTorch references (tests, benchmarks) share, so that they compute the very same logits."""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import numpy as np
import torch

from models import registry
from models.preprocess import to_model_input


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


_AUTOCAST = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(spec: registry.ModelSpec, device: str = "auto", *, channels_last: bool = True,
         compile: bool = False) -> torch.nn.Module:
    """``spec``'s model with its weights, in eval mode, on ``device``, in the memory format to feed it."""
    model = registry.build(spec).to(resolve_device(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def forward(model: torch.nn.Module, spec: registry.ModelSpec, images: Sequence[np.ndarray], *,
            channels_last: bool = True, precision: Precision | str = Precision.FP32,
            device: Optional[torch.device] = None) -> np.ndarray:
    """``(res, res, 3)`` uint8 crops -> ``(N, C)`` float32 logits (autocast in ``precision``, logits in fp32)."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    host = torch.from_numpy(np.stack(images))
    if device.type == "cuda":
        host = host.pin_memory()
    x = to_model_input(host.to(device, non_blocking=True), spec.input)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _AUTOCAST.get(Precision(precision))
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
    out = logits.float().cpu().numpy()
    if out.shape != (len(images), spec.num_classes):
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected ({len(images)}, {spec.num_classes})")
    return out
