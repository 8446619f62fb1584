"""Peak memory of the streamed video reader: a 10-minute 720p video next to a 1-minute one.

    python benchmarks/video_memory.py [--fps 24] [--keep DIR]

Generates both videos in a temporary folder (H.264, 1280x720: 10 s of a slow pan over a photo from
scikit-image are encoded once, then their packets are repeated with shifted timestamps, so making a
10-minute file costs seconds, while reading it still decodes every one of its frames). Each video is read
by ``models.video.read_video`` in a fresh process, with the two samplings of the video profiles (uniform
10 x 3 views; 1 frame per second), and that process's peak RSS is printed beside a process that only
imported the same modules. Memory grows with the frames kept (30 views, or 1 JPEG per second of video,
about 40 KB each at 297 px), not with the length or resolution of the video.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLINGS = {"uniform 10x3": dict(mode="uniform", clips=10, crops=3), "fps 1": dict(mode="fps", fps=1.0)}
SHORT_SIDE = 297  # the largest resize of the video profiles' stages (Lite2@260 / 0.875)


def generate(path: str, minutes: float, fps: int, segment_s: int = 10) -> None:
    """Write an H.264 720p video of ``minutes`` by encoding ``segment_s`` seconds once and repeating them."""
    import av
    import numpy as np
    import skimage.data
    from PIL import Image

    wide = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((2560, 720)))
    segment = path + ".segment.mp4"
    with av.open(segment, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28", "g": str(fps * segment_s)}
        for i in range(fps * segment_s):
            x = round(i * 1280 / (fps * segment_s))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(wide[:, x: x + 1280]), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(segment) as src, av.open(path, "w") as out:
        source = src.streams.video[0]
        packets = [p for p in src.demux(source) if p.size]
        stream = out.add_stream_from_template(source)
        span = max(p.pts + p.duration for p in packets) - min(p.pts for p in packets)
        for k in range(round(minutes * 60 / segment_s)):
            for p in packets:
                copy = av.Packet(bytes(p))
                copy.pts, copy.dts, copy.duration = p.pts + k * span, p.dts + k * span, p.duration
                copy.time_base, copy.stream = p.time_base, stream
                copy.is_keyframe = p.is_keyframe
                out.mux(copy)
    os.remove(segment)


def child(path: str, sampling: str) -> None:
    """Read one video (or nothing, for ``sampling == 'none'``) and print frames, seconds and peak RSS."""
    sys.path.insert(0, ROOT)
    from models.video import Sampling, SamplingPlan, read_video

    started = time.perf_counter()
    frames, decoded = [], None
    if sampling != "none":
        options = dict(SAMPLINGS[sampling])
        plan = SamplingPlan(Sampling(options.pop("mode")), **options)
        with open(path, "rb") as fh:
            frames = read_video(fh, plan, short_side=SHORT_SIDE)
        import av

        with av.open(path) as c:
            decoded = c.streams.video[0].frames
    kept = sum(len(v) for f in frames for v in f.views)
    print(json.dumps({"frames": decoded, "views_kept": sum(len(f.views) for f in frames),
                      "kept_mb": kept / 2**20, "seconds": time.perf_counter() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(path: str, sampling: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path, sampling], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fps", type=int, default=24, help="frame rate of the generated videos")
    parser.add_argument("--keep", default=None, help="generate into this folder and keep the videos")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        videos = {}
        for minutes in (1, 10):
            path = os.path.join(folder, f"pan_{minutes}min_720p.mp4")
            started = time.perf_counter()
            generate(path, minutes, args.fps)
            videos[minutes] = path
            print(f"generated {minutes:>2}-minute 1280x720 H.264 at {args.fps} fps: "
                  f"{os.path.getsize(path) / 2**20:.1f} MB in {time.perf_counter() - started:.1f} s")
        base = measure(videos[1], "none")
        print(f"\nbaseline (imports only): peak RSS {base['peak_rss_mb']:.0f} MB")
        print(f"{'sampling':<14}{'video':>8}{'frames':>16}{'views kept':>12}{'kept MB':>9}"
              f"{'decode s':>10}{'peak RSS MB':>13}{'over baseline':>15}")
        for sampling in SAMPLINGS:
            for minutes, path in videos.items():
                r = measure(path, sampling)
                print(f"{sampling:<14}{minutes:>6} m{r['frames']:>16}{r['views_kept']:>12}"
                      f"{r['kept_mb']:>9.1f}{r['seconds']:>10.1f}{r['peak_rss_mb']:>13.0f}"
                      f"{r['peak_rss_mb'] - base['peak_rss_mb']:>+15.0f}")


if __name__ == "__main__":
    main()
