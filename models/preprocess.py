"""Decode encoded image bytes and turn them into a model's input, as its registry entry says.

Decoding is per record and defensive: anything Pillow can open becomes an upright 8-bit RGB image
(EXIF rotation applied, CMYK/palette/16-bit/grayscale converted, first frame of animations), and what
cannot be used raises ``BadInput`` with a reason a person understands. A pixel limit is checked from
the header, before any pixel is allocated.
"""

from __future__ import annotations

import functools
import io
import warnings
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.failures import Category
from models.registry import InputConfig

DEFAULT_MAX_PIXELS = 100_000_000  # the one default pixel limit of images and video frames (decode.max_pixels)


@dataclass
class DecodeConfig:
    """How encoded inputs are decoded: the ``decode`` block of a cascade config."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # 1..2^31; images declaring more are dead-lettered, never allocated
    max_bytes: int = 256 * 1024 * 1024  # 1..2^36 (64 GiB); larger files are dead-lettered unread
    draft: bool = True  # JPEG DCT-domain downscaling towards the stage's resize size
    gpu: bool = True  # on a CUDA device, decode JPEGs in batches with nvJPEG (torchvision); others on the CPU
    read_timeout_s: float = 300.0  # 0.01..86400; reading one input (file, URL) taking longer -> its dead letter
    # JPEGs decoded by libjpeg-turbo through simplejpeg (the same pixels as Pillow's, at the same DCT-domain
    # scale); false, or a file it refuses: Pillow decodes (decode_jpeg_fast)
    fast: bool = True

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


ORIENTATION_TAG = 0x0112  # EXIF
TORCH_INTERPOLATIONS = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                        "lanczos": "bicubic"}  # torch resamples tensors with no Lanczos; the closest it has


class BadInput(ValueError):
    """An input record that cannot be turned into a model input; the message is the dead-letter reason and
    ``category`` its ``dead_letter.category``."""

    def __init__(self, reason: str, category: Category = Category.DECODE_ERROR):
        super().__init__(reason)
        self.category = Category(category)

    def __reduce__(self):  # pickled with its category (results cross process boundaries)
        return type(self), (str(self), self.category)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        scale = 257 if arr.max(initial=0) > 255 else 1  # 16-bit samples -> 8-bit
        im = Image.fromarray(np.clip(arr // scale, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "RGBA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _open(data: bytes) -> Image.Image:
    """``Image.open`` without Pillow's process-wide decompression-bomb guard (2 x ``Image.MAX_IMAGE_PIXELS``),
    which would refuse large images before ``decode`` applies the config's own limit: only the header is
    read here, so nothing large is allocated. The guard is left as it is for the rest of the process."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # the same search Image.open makes, minus the guard
        prefix = data[:16]
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            try:
                accepted = not accept or accept(prefix)
                if accepted and not isinstance(accepted, str):
                    return factory(io.BytesIO(data), None)
            except (SyntaxError, IndexError, TypeError, ValueError, OSError):
                continue
        raise


def draft_scale(width: int, height: int, target: int) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) Pillow's ``draft`` picks to decode a JPEG for a shorter side
    of at least ``target``: the largest that both sides hold whole (so an image is scaled only where it is at
    least twice the size needed)."""
    whole = min(width // target, height // target)
    return next(a for a in (8, 4, 2, 1) if whole >= a or a == 1)


@functools.lru_cache(maxsize=1)
def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def decode_jpeg_fast(data: bytes, im: Image.Image, target: Optional[int]) -> Optional[Image.Image]:
    """``im`` (an opened, unloaded JPEG) decoded by libjpeg-turbo through simplejpeg, to the very pixels
    Pillow's decode gives (the same library, the same DCT-domain scale as ``draft``, accurate DCT and
    fancy upsampling: tests/test_preprocess_fast.py compares them on the shared sample), about 1.4x faster
    with less Python. None where it does not apply and Pillow decodes: not a baseline or progressive RGB or
    grayscale JPEG, an EXIF orientation to apply, simplejpeg not installed, or a file it refuses (corrupt or
    truncated data Pillow may still read)."""
    simplejpeg = _simplejpeg()
    if simplejpeg is None or im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    try:
        if im.getexif().get(ORIENTATION_TAG, 1) != 1:
            return None
        width, height = im.size
        scale = draft_scale(width, height, target) if target and len(im.tile) == 1 else 1  # as ``draft``
        pixels = simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False,
                                        min_height=-(-height // scale), min_width=-(-width // scale))
    except Exception:  # simplejpeg raises ValueError on what libjpeg-turbo calls recoverable; Pillow decides
        return None
    if pixels.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None
    return Image.fromarray(pixels, "RGB")


def decode(data: bytes, *, target: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
           fast: bool = True) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    ``target``: the shorter side the caller will resize to; JPEGs are then decoded with DCT-domain
    downscaling (Pillow's ``draft``) to no less than that size, which is much cheaper than a full decode.
    ``fast``: JPEGs through ``decode_jpeg_fast`` where it applies (the same pixels).
    """
    if not data:
        raise BadInput("empty file (0 bytes)", Category.NOT_AN_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on some odd but readable files
            im = _open(data)
            width, height = im.size
            if width * height > max_pixels:
                raise BadInput(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                    "(decode.max_pixels)", Category.TOO_LARGE
                )
            if width < 1 or height < 1:
                raise BadInput(f"image has no pixels ({width}x{height})", Category.NOT_AN_IMAGE)
            if fast:
                fast_image = decode_jpeg_fast(data, im, target)
                if fast_image is not None:
                    return fast_image
            if target is not None and im.format == "JPEG":
                im.draft("RGB", (target, target))
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except BadInput:
        raise
    except UnidentifiedImageError:
        raise BadInput("not an image Pillow can identify (unknown or corrupt format)", Category.NOT_AN_IMAGE) from None
    except Exception as err:  # Pillow's plugins raise many types on corrupt data: OSError, SyntaxError, IndexError...
        raise BadInput(f"image could not be decoded: {type(err).__name__}: {err}") from None


def crop_side(width: int, height: int, cfg: InputConfig) -> float:
    """The side, in source pixels, of the centre square that becomes the model's input: ``resolution``
    pixels after resizing the shorter side to ``resize_to``."""
    scale = cfg.resize_to / min(width, height)
    return cfg.resolution / scale


def center_crop_resize(im: Image.Image, cfg: InputConfig) -> np.ndarray:
    """Resize the shorter side to ``cfg.resize_to`` and center-crop ``cfg.resolution``, in one resample
    of just the crop region; returns a ``(res, res, 3)`` uint8 array."""
    width, height = im.size
    side = crop_side(width, height, cfg)
    left = (width - side) / 2
    top = (height - side) / 2
    out = im.resize(
        (cfg.resolution, cfg.resolution),
        INTERPOLATIONS[cfg.interpolation],
        box=(left, top, left + side, top + side),
    )
    return np.asarray(out, dtype=np.uint8)


def load_image(data: bytes, cfg: InputConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True,
               target: Optional[int] = None, fast: bool = True) -> np.ndarray:
    """Encoded bytes -> the ``(res, res, 3)`` uint8 crop that ``cfg`` describes. ``target``: the shorter side
    the image is decoded for (``decode``'s draft target): the largest ``resize_to`` of the run's stages, so
    that every stage crops from the same decoded pixels (``decode_target``); default: ``cfg``'s own."""
    im = decode(data, target=(target or cfg.resize_to) if draft else None, max_pixels=max_pixels, fast=fast)
    return center_crop_resize(im, cfg)


def decode_target(cfgs: Sequence[InputConfig]) -> int:
    """The shorter side a run decodes every image for: the largest its stages resize to. A record is decoded
    once at that size and each stage crops its own input from the same pixels."""
    return max(cfg.resize_to for cfg in cfgs)


def crop_box(width: int, height: int, cfg: InputConfig) -> tuple[int, int, int]:
    """``center_crop_resize``'s square in whole source pixels, for torch, whose crops are whole pixels
    (PIL resamples the exact fractional box: the two differ by under half a source pixel)."""
    side = max(1, min(width, height, round(crop_side(width, height, cfg))))
    return (width - side) // 2, (height - side) // 2, side


def gpu_decodable(data: bytes, max_pixels: int) -> bool:
    """Whether nvJPEG (``load_batch``) can decode ``data`` as ``decode`` would, judged from the header
    alone: a baseline or progressive RGB or grayscale JPEG, upright, within the pixel limit. Anything else
    takes the CPU path, which knows every format and gives the dead-letter reasons."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            return (im.format == "JPEG" and im.mode in ("RGB", "L") and 0 < width * height <= max_pixels
                    and im.getexif().get(ORIENTATION_TAG, 1) == 1)
    except Exception:  # not even a header: the CPU path will say why
        return False


def gpu_decode(datas: Sequence[bytes], device: torch.device) -> list[Optional[torch.Tensor]]:
    """JPEG bytes -> ``(3, H, W)`` uint8 images on ``device``, decoded by torchvision in one batch (nvJPEG on
    CUDA), at full size (nvJPEG has no DCT-domain downscaling); None for a record the decoder rejects."""
    from torchvision.io import ImageReadMode, decode_jpeg  # only here: importing torchvision costs seconds

    encoded = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batch call: decode one by one
        images: list[Optional[torch.Tensor]] = []
        for data in encoded:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
        return images


def crop_tensor(image: torch.Tensor, cfg: InputConfig) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 image on a device -> its ``(res, res, 3)`` crop there: torch's antialiased filter
    of ``cfg``'s interpolation over ``crop_box``, the CPU path's filter over a box that differs from its own by
    under half a source pixel (a few grey levels on textured images, so logits differ slightly from the
    CPU path's)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resized_crop

    height, width = image.shape[-2:]
    left, top, side = crop_box(width, height, cfg)
    crop = resized_crop(image, top, left, side, side, [cfg.resolution, cfg.resolution],
                        interpolation=InterpolationMode(TORCH_INTERPOLATIONS[cfg.interpolation]), antialias=True)
    return crop.permute(1, 2, 0)


Pixels = Union[Image.Image, torch.Tensor]  # a decoded image: PIL on the CPU, or (3, H, W) uint8 on a device


def crop(pixels: Pixels, cfg: InputConfig) -> np.ndarray | torch.Tensor:
    """A decoded image -> the ``(res, res, 3)`` uint8 crop ``cfg`` describes, where the pixels are: PIL
    (``center_crop_resize``) or torch on the image's device (``crop_tensor``)."""
    return crop_tensor(pixels, cfg) if isinstance(pixels, torch.Tensor) else center_crop_resize(pixels, cfg)


def load_batch(datas: Sequence[bytes], cfg: InputConfig, device: torch.device,
               target: Optional[int] = None) -> list[torch.Tensor | BadInput]:
    """JPEG bytes -> ``(res, res, 3)`` uint8 crops on ``device``: ``gpu_decode`` then ``crop_tensor``; a
    record the batch decoder rejects is decoded alone on the CPU by ``load_image`` (at ``target``), and one
    that fails there too gets its ``BadInput`` instead of a crop."""
    out: list[torch.Tensor | BadInput] = []
    for data, image in zip(datas, gpu_decode(datas, device)):
        if image is not None:
            out.append(crop_tensor(image, cfg))
            continue
        try:
            out.append(torch.from_numpy(load_image(data, cfg, target=target)).to(device))
        except BadInput as err:
            out.append(err)
    return out


@functools.lru_cache(maxsize=None)
def decode_pool(threads: int) -> ThreadPoolExecutor:
    """The threads that decode batches in this process (one pool per size, shared by its stages)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="decode")


def decode_images(datas: Sequence[bytes], *, target: Optional[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                  pool: Optional[Executor] = None, fast: bool = True) -> list[Image.Image | BadInput]:
    """``decode`` over a batch (draft ``target``; None: full decode), in ``pool``'s threads when given; a
    record that cannot be used gets its ``BadInput`` instead of an image."""

    def one(data: bytes) -> Image.Image | BadInput:
        try:
            return decode(data, target=target, max_pixels=max_pixels, fast=fast)
        except BadInput as err:
            return err

    return list(pool.map(one, datas) if pool is not None else map(one, datas))


def load_images(datas: Sequence[bytes], cfg: InputConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True,
                pool: Optional[Executor] = None, target: Optional[int] = None,
                fast: bool = True) -> list[np.ndarray | BadInput]:
    """``load_image`` over a batch, in ``pool``'s threads when given (Pillow releases the GIL while it
    decodes and resamples); a record that cannot be used gets its ``BadInput`` instead of a crop."""

    def one(data: bytes) -> np.ndarray | BadInput:
        try:
            return load_image(data, cfg, max_pixels=max_pixels, draft=draft, target=target, fast=fast)
        except BadInput as err:
            return err

    return list(pool.map(one, datas) if pool is not None else map(one, datas))


def to_model_input(batch: torch.Tensor, cfg: InputConfig) -> torch.Tensor:
    """A ``(N, H, W, 3)`` uint8 batch -> normalized ``(N, 3, H, W)`` float32, on the batch's device."""
    x = batch.permute(0, 3, 1, 2).float()
    mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
