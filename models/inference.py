"""Running one model on a batch of preprocessed images: the code the pipeline's model handler and the
plain-PyTorch references (tests, benchmarks) share, so that they compute the very same logits."""

from __future__ import annotations

import ctypes
import enum
import functools
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.fx
from torch.nn.utils.fusion import fuse_conv_bn_weights

from models import registry
from models.preprocess import to_model_input


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Backend(str, enum.Enum):
    """What runs a stage's forward passes (docs/SCALING.md, "Inference backends")."""

    AUTO = "auto"  # ONNX Runtime on the CPU (where the model exports and matches torch), torch on CUDA
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime's CPU execution provider; a model that cannot, runs on torch


def resolve_backend(backend: Backend | str, device: torch.device, precision: Precision | str = Precision.FP32,
                    compile: bool = False) -> Backend:
    """The backend a stage runs on: ``auto`` is ONNX Runtime on the CPU in fp32 without ``compile`` (faster
    there for the same decisions: benchmarks/README.md), torch elsewhere; ONNX Runtime runs on the CPU only,
    so a stage whose device is CUDA runs on torch whatever was asked (``validate`` refuses the explicit case)."""
    backend = Backend(backend)
    if backend is Backend.TORCH or device.type != "cpu":
        return Backend.TORCH
    if backend is Backend.AUTO and (Precision(precision) is not Precision.FP32 or compile):
        return Backend.TORCH
    return Backend.ONNXRUNTIME


_AUTOCAST = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
log = logging.getLogger("cascade")

# glibc's malloc parameters (malloc.h: M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD) and what they are set to
_MALLOPT = ((-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20))
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a forward pass frees for the next one, once per process.

    By default glibc hands each large block (an activation tensor, a decoded image) back to the kernel when
    it is freed and gets it again, zeroed page by page, for the next batch: on this project's CPU machine a
    sixth of a model run's time was the kernel's (page faults), and models ran 15-25 % slower than with the
    blocks kept (benchmarks/README.md). Blocks under 32 MB now come from the heap (``M_MMAP_THRESHOLD``), and
    the heap keeps up to 1 GiB free (``M_TRIM_THRESHOLD``) and grows 64 MiB at a time (``M_TOP_PAD``): the
    process's peak memory is what it was, it is simply not returned between batches. PyTorch's CPU tuning
    guide makes the same point with jemalloc or tcmalloc; this is glibc's own switch, with no library to
    install. Left alone where the user chose (``MALLOC_*`` or ``GLIBC_TUNABLES`` with malloc settings in the
    environment, or a preloaded allocator) and where the C library is not glibc. Returns whether it was set."""
    if (any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or os.environ.get("LD_PRELOAD")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent on macOS; musl's accepts nothing (returns 0)
    except (AttributeError, OSError):
        return False
    done = all(mallopt(param, value) == 1 for param, value in _MALLOPT)
    log.debug("glibc malloc keeps freed memory for the next batch: %s", done)
    return done


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every convolution (subclasses too, such as TF-style "same" padding convs) one graph node."""

    def is_leaf_module(self, module: torch.nn.Module, qualname: str) -> bool:
        return isinstance(module, torch.nn.Conv2d) or super().is_leaf_module(module, qualname)


_INPLACE_ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardtanh, torch.nn.SiLU, torch.nn.Hardswish)


def _fresh_and_private(node, modules: dict) -> bool:
    """Whether ``node`` is a new tensor (a conv or batch norm output) that only one op reads."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.users) == 1
            and isinstance(modules[node.target], (torch.nn.Conv2d, torch.nn.BatchNorm2d)))


def _absorb_static_padding(conv: torch.nn.Module) -> None:
    """A convolution that zero-pads in a separate module first (the static "same" padding of TF ports such
    as efficientnet_lite_pytorch's ``Conv2dStaticSamePadding``) pads in the convolution itself: one copy of
    the activation map fewer. Symmetric padding moves as it is; padding with one more zero on the far side
    (strided "same" convolutions on even sizes) too, with the kernel grown by a zero tap; other padding stays."""
    pad = getattr(conv, "static_padding", None)
    if not (isinstance(conv, torch.nn.Conv2d) and isinstance(pad, torch.nn.ZeroPad2d)
            and conv.padding_mode == "zeros" and tuple(conv.padding) == (0, 0)):
        return
    left, right, top, bottom = pad.padding
    if right - left not in (0, 1) or bottom - top not in (0, 1):
        return
    if (right, bottom) != (left, top):
        # one more zero on the far side: the same as one more zero on both sides with the kernel grown by a
        # zero tap at its near side (output o then reads one row/column earlier, and that one weighs 0)
        grow_h, grow_w = bottom - top, right - left
        with torch.no_grad():
            conv.weight = torch.nn.Parameter(torch.nn.functional.pad(conv.weight, (grow_w, 0, grow_h, 0)))
        conv.kernel_size = tuple(conv.weight.shape[-2:])
    conv.padding = (bottom, right)
    conv.static_padding = torch.nn.Identity()


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode model with each BatchNorm that follows a convolution folded into that convolution's
    weights, separate zero padding done by the convolution itself, and activations made in-place where
    nothing else reads their input: the same logits (to float rounding) for two passes fewer over most
    activation maps, and fewer allocations. A model that
    ``torch.fx`` cannot trace (TorchScript, data-dependent control flow) is returned unchanged."""
    try:
        graph = torch.fx.GraphModule(model, _ConvLeafTracer().trace(model))
    except Exception:  # tracing fails in many ways on arbitrary user models; they just run unfused
        return model
    modules = dict(graph.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for node in list(graph.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        conv_node = node.args[0] if bn is not None and node.args else None
        if not (isinstance(bn, torch.nn.BatchNorm2d) and not bn.training and bn.track_running_stats
                and isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module"
                and isinstance(modules[conv_node.target], torch.nn.Conv2d)
                and len(conv_node.users) == 1 and len(calls[conv_node.target]) == 1 and len(calls[node.target]) == 1):
            continue
        conv = modules[conv_node.target]
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        node.replace_all_uses_with(conv_node)
        graph.graph.erase_node(node)
    for module in modules.values():
        _absorb_static_padding(module)
    for target, nodes in calls.items():
        module = modules[target]
        if isinstance(module, _INPLACE_ACTIVATIONS) and all(_fresh_and_private(n.args[0], modules) for n in nodes):
            module.inplace = True
    graph.graph.lint()
    graph.recompile()
    graph.delete_all_unused_submodules()
    return graph


def load(spec: registry.ModelSpec, device: str = "auto", *, channels_last: bool = True,
         compile: bool = False) -> torch.nn.Module:
    """``spec``'s model with its weights, in eval mode with batch norms folded (``fold_batch_norms``), on
    ``device``, in the memory format to feed it."""
    keep_freed_memory()
    model = fold_batch_norms(registry.build(spec).eval()).to(resolve_device(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def forward(model: torch.nn.Module, spec: registry.ModelSpec, images: Sequence[np.ndarray] | torch.Tensor, *,
            channels_last: bool = True, precision: Precision | str = Precision.FP32,
            device: Optional[torch.device] = None) -> np.ndarray:
    """``(res, res, 3)`` uint8 crops (or an ``(N, res, res, 3)`` uint8 tensor, already on the device) ->
    ``(N, C)`` float32 logits (autocast in ``precision``, logits in fp32)."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    if isinstance(images, torch.Tensor):
        pixels = images.to(device)
    else:
        host = torch.from_numpy(np.stack(images))
        pixels = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    x = to_model_input(pixels, spec.input)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _AUTOCAST.get(Precision(precision))
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(x)
    out = logits.float().cpu().numpy()
    if out.shape != (len(images), spec.num_classes):
        raise ValueError(f"model returned shape {tuple(out.shape)}, expected ({len(images)}, {spec.num_classes})")
    return out
