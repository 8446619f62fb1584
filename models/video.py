"""Decode a video into the frames (or views) a cascade classifies, streamed with PyAV; and write the small
synthetic videos used by the demo, the tests and the benchmark.

Decoding is streamed packet by packet from a file object (fsspec: local, ``gs://``, ...): only one decoded
frame is alive at a time, and only the sampled frames are kept, downscaled to the largest size any stage
resizes to and JPEG-encoded. They are kept until the stream has decoded to its end, so that a video that
turns out truncated or corrupt half-way becomes one dead letter instead of some predictions and a dead
letter. Memory per video in flight is therefore bounded by the number of sampled frames (``max_frames``),
not by the video's length or resolution. No Beam here.
"""

from __future__ import annotations

import enum
import io
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Optional

import av
import numpy as np
from PIL import Image

from models.failures import Category
from models.preprocess import DEFAULT_MAX_PIXELS, BadInput

JPEG_QUALITY = 95  # sampled frames travel JPEG-encoded: small, and decoded again by the image path
CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mkv": "libx264"}


class Sampling(str, enum.Enum):
    """Which frames of a video become records."""

    EVERY_N = "every_n"  # frames 0, n, 2n, ... of the decoded stream
    FPS = "fps"  # n frames per second of video time (the first frame at or after each instant)
    UNIFORM = "uniform"  # K uniformly spaced temporal positions (clip centres) x S spatial crops


class BadVideo(BadInput):
    """A video that cannot be sampled; the message is the dead-letter reason."""


@dataclass(frozen=True)
class SamplingPlan:
    mode: Sampling = Sampling.EVERY_N
    every_n: int = 30
    fps: float = 1.0
    clips: int = 10  # K temporal positions (uniform)
    crops: int = 1  # S square crops along the longer side per position (uniform)
    max_frames: int = 5000  # sampled frames kept per video; more is refused
    min_coverage: float = 0.9  # decoded frames must cover this share of the declared duration/frame count

    @property
    def views(self) -> int:
        """Views per video with uniform sampling (fixed, so a video's cost is known up front)."""
        return self.clips * self.crops


@dataclass(frozen=True)
class SampledFrame:
    index: int  # position in the decoded stream, 0-based
    timestamp_s: float  # presentation time in seconds
    views: tuple[bytes, ...]  # JPEG-encoded: the whole frame, or ``crops`` square crops


class _Selector:
    """Says, frame by frame, how many samples a decoded frame fills."""

    def take(self, index: int, t: Fraction) -> int:
        raise NotImplementedError

    def left(self) -> int:
        """Samples still unfilled when the stream ends (filled with the last frame)."""
        return 0


class _EveryN(_Selector):
    def __init__(self, n: int):
        self.n = n

    def take(self, index: int, t: Fraction) -> int:
        return int(index % self.n == 0)


class _Fps(_Selector):
    def __init__(self, fps: float):
        self.step = 1 / Fraction(fps).limit_denominator(1_000_000)
        self.next: Optional[Fraction] = None

    def take(self, index: int, t: Fraction) -> int:
        if self.next is None:
            self.next = t
        if t < self.next:
            return 0
        while self.next <= t:
            self.next += self.step
        return 1


class _Uniform(_Selector):
    """Targets at the centres of K equal segments of the stream's span; each takes the frame on screen at
    that instant (a frame can serve several targets in a very short video)."""

    def __init__(self, clips: int, start: Fraction, span: Fraction, period: Fraction):
        self.targets = [start + (k + Fraction(1, 2)) * span / clips for k in range(clips)]
        self.period = period
        self.next = 0

    def take(self, index: int, t: Fraction) -> int:
        first = self.next
        while self.next < len(self.targets) and (self.targets[self.next] < t + self.period
                                                 or self.targets[self.next] <= t):
            self.next += 1
        return self.next - first

    def left(self) -> int:
        return len(self.targets) - self.next


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Optional[Fraction]:
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base
    if container.duration:
        return Fraction(container.duration, av.time_base)
    return None


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Downscale so that the shorter side is ``short_side``; never upscale."""
    scale = short_side / min(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _views(frame: av.VideoFrame, short_side: int, crops: int) -> tuple[bytes, ...]:
    """The frame downscaled (one swscale pass) and JPEG-encoded; with crops > 1, that many squares of the
    shorter side's size spaced evenly along the longer side (the 3-crop protocol for S = 3)."""
    width, height = _scaled_size(frame.width, frame.height, short_side)
    im = frame.to_image(width=width, height=height, interpolation="AREA")
    if crops == 1:
        return (_jpeg(im),)
    side = min(width, height)
    offsets = np.linspace(0, max(width, height) - side, crops).round().astype(int)
    boxes = [(o, 0, o + side, side) if width >= height else (0, o, side, o + side) for o in offsets]
    return tuple(_jpeg(im.crop(box)) for box in boxes)


def _open(fh: BinaryIO) -> av.container.InputContainer:
    if not fh.read(1):
        raise BadVideo("empty file (0 bytes)", Category.NOT_AN_IMAGE)
    fh.seek(0)
    try:
        return av.open(fh, mode="r")
    except (av.FFmpegError, ValueError) as err:
        raise BadVideo(f"not a readable video (unknown format, or header damaged or truncated): {err}",
                       Category.NOT_AN_IMAGE) from None


def _measured_duration(fh: BinaryIO) -> Optional[Fraction]:
    """Span of the first video stream's packets, from a demux-only pass (no decoding), for containers
    that declare no duration."""
    fh.seek(0)
    first = end = None
    try:
        with av.open(fh, mode="r") as container:
            for packet in container.demux(container.streams.video[0]):
                if packet.pts is not None and packet.time_base:
                    t = packet.pts * packet.time_base
                    first = t if first is None else min(first, t)
                    end = max(end or t, t + (packet.duration or 0) * packet.time_base)
    except av.FFmpegError as err:
        raise BadVideo(f"corrupt or truncated video: demuxing failed: {err}") from None
    fh.seek(0)
    return None if first is None else end - first


def read_video(fh: BinaryIO, plan: SamplingPlan, *, short_side: int,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> list[SampledFrame]:
    """Decode ``fh`` to its end and return the sampled frames, or raise ``BadVideo`` saying why not:
    not a video, no video stream, zero-length stream, no decodable frame, corrupt or truncated, too big."""
    container = _open(fh)
    try:
        stream = _video_stream(container, max_pixels)
        declared = _duration(container, stream)
        span = declared
        if plan.mode is Sampling.UNIFORM and not declared:  # targets need a duration: measure it first
            container.close()
            span = _measured_duration(fh)
            container = av.open(fh, mode="r")
            stream = _video_stream(container, max_pixels)
        return _decode(container, stream, plan, short_side, declared, span)
    finally:
        container.close()


def _video_stream(container: av.container.InputContainer, max_pixels: int) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise BadVideo("no video stream (audio only, or not a video)", Category.NOT_AN_IMAGE)
    stream = container.streams.video[0]
    if stream.width * stream.height > max_pixels:
        raise BadVideo(f"video of {stream.width}x{stream.height} pixels exceeds the limit of {max_pixels} "
                       "pixels (decode.max_pixels)", Category.TOO_LARGE)
    stream.thread_type = "AUTO"
    return stream


def _decode(container, stream, plan: SamplingPlan, short_side: int, declared: Optional[Fraction],
            span: Optional[Fraction]) -> list[SampledFrame]:
    tb = stream.time_base or Fraction(1, 1)
    start = Fraction(stream.start_time or 0) * tb
    declared_frames = stream.frames or None
    rate = stream.average_rate or stream.guessed_rate
    period = Fraction(1) / Fraction(rate) if rate else Fraction(0)
    if plan.mode is Sampling.EVERY_N:
        selector = _EveryN(plan.every_n)
    elif plan.mode is Sampling.FPS:
        selector = _Fps(plan.fps)
    elif not span:
        raise BadVideo("zero-length video stream (no duration and no timed packet)")
    else:
        selector = _Uniform(plan.clips, start, span, period)
    crops = plan.crops if plan.mode is Sampling.UNIFORM else 1
    frames: list[SampledFrame] = []
    packets = decoded = 0
    last = None
    last_t = start
    try:
        for packet in container.demux(stream):
            packets += packet.size > 0
            for frame in packet.decode():
                t = frame.pts * tb if frame.pts is not None else start + decoded * period
                n = selector.take(decoded, t)
                if n:
                    if len(frames) + n > plan.max_frames:
                        raise BadVideo(f"more than {plan.max_frames} sampled frames (video.max_frames); "
                                       "sample sparser or raise the limit", Category.TOO_LARGE)
                    views = _views(frame, short_side, crops)
                    frames.extend([SampledFrame(decoded, float(t), views)] * n)
                last, last_t = frame, t
                decoded += 1
    except av.FFmpegError as err:
        if decoded == 0:
            raise BadVideo(f"no decodable frame ({packets} packets read): {err}") from None
        raise BadVideo(f"corrupt or truncated video: decoding failed after {decoded} frames "
                       f"({float(last_t - start):.2f} s): {err}") from None
    if packets == 0:
        raise BadVideo("zero-length video stream (no frames)")
    if decoded == 0:
        raise BadVideo(f"no decodable frame ({packets} packets read)")
    covered = last_t - start + period
    if declared_frames and decoded < plan.min_coverage * declared_frames:
        raise BadVideo(f"truncated video: decoded {decoded} of {declared_frames} declared frames")
    if declared and covered < plan.min_coverage * declared:
        raise BadVideo(f"truncated video: decoded frames cover {float(covered):.2f} s of "
                       f"{float(declared):.2f} s declared")
    if selector.left():
        tail = SampledFrame(decoded - 1, float(last_t), _views(last, short_side, crops))
        frames.extend([tail] * selector.left())
    return frames


def pan_zoom_frames(image: Image.Image, n_frames: int, size: tuple[int, int],
                    zoom: float = 0.8) -> Iterator[np.ndarray]:
    """A slow pan (left to right) and zoom (in to ``zoom`` of the view) over ``image``: ``n_frames`` RGB
    arrays of ``size`` (width, height)."""
    image = image.convert("RGB")
    width, height = size
    aspect = width / height
    full_w, full_h = (image.width, image.width / aspect) if image.width / image.height <= aspect else (
        image.height * aspect, image.height)
    for i in range(n_frames):
        u = i / max(1, n_frames - 1)
        w, h = full_w * (1 - (1 - zoom) * u), full_h * (1 - (1 - zoom) * u)
        left = (image.width - w) * (0.25 + 0.5 * u)
        top = (image.height - h) / 2
        yield np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)))


def pan_zoom_videos(photos: Iterable[str], folder: str, seconds: float = 3.0, fps: int = 10) -> list[str]:
    """A short pan-and-zoom video in ``folder`` over each colour photo of ``photos`` that PIL can open
    (mp4, webm and avi in turn); returns their paths."""
    paths = []
    for photo in photos:
        try:
            im = Image.open(photo)
            im.load()
        except OSError:  # not a plain photo (e.g. a multipage TIFF)
            continue
        if im.mode != "RGB" or min(im.size) < 128:
            continue
        stem = os.path.splitext(os.path.basename(photo))[0]
        path = os.path.join(folder, f"{stem}{('.mp4', '.webm', '.avi')[len(paths) % 3]}")
        write_video(path, pan_zoom_frames(im, int(seconds * fps), (320, 240)), fps)
        paths.append(path)
    return paths


def write_video(path: str, frames: Iterable[np.ndarray], fps: int = 10, codec: str | None = None) -> int:
    """Encode RGB frames to ``path`` (codec from the extension: mp4/mkv H.264, webm VP9, avi MPEG-4 Part 2,
    fast settings); returns the number of frames written (0 writes a zero-length stream)."""
    codec = codec or CODECS[path[path.rfind("."):].lower()]
    frames = iter(frames)
    first = next(frames, None)
    count = 0
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.pix_fmt = "yuv420p"
        stream.height, stream.width = (240, 320) if first is None else first.shape[:2]
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "20"}
        elif codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
        elif codec == "mpeg4":
            stream.codec_context.qscale = 3
        if first is None:
            container.start_encoding()
        else:
            for array in itertools.chain([first], frames):
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
                count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count
