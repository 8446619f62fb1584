"""Video inputs: the streamed reader alone, and both granularities end to end through the real pipeline
(FnApiRunner, Parquet, EfficientNet-Lite0 -> Lite2) on videos encoded here with PyAV from labelled images."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from configs import schema
from configs.plan import build_plan
from models.video import BadVideo, Sampling, SamplingPlan, pan_zoom_frames, read_video, write_video
from pipelines import cascade
from pipelines.folder import RunFolder

SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-sample"
FPS = 10
SIZE = (480, 360)
EXTENSIONS = (".mp4", ".webm", ".avi")


def encode(image_path: str, path: Path, frames: int) -> str:
    with Image.open(image_path) as im:
        assert write_video(str(path), pan_zoom_frames(im, frames, SIZE), FPS) == frames
    return str(path)


def write_manifest(path: Path, rows: list[tuple[str, int | None]]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        writer.writerows([(uri, "" if label is None else label) for uri, label in rows])
    return str(path)


def broken_videos(folder: Path, good: str) -> dict[str, str]:
    """Broken inputs of every kind -> a word their dead-letter reason must contain; ``good`` is an mp4."""
    folder.mkdir(exist_ok=True)
    out = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (folder / name).write_bytes(data)
        out[str(folder / name)] = reason

    data = Path(good).read_bytes()
    put("notes.mp4", b"this is a text file, not a video\n" * 20, "not a readable video")
    put("empty.webm", b"", "empty file")
    put("cut.mp4", data[: len(data) // 2], "not a readable video")  # index (moov) at the end: lost
    mdat = data.find(b"mdat")  # the box of the coded frames: its payload zeroed, its index kept
    end = mdat - 4 + int.from_bytes(data[mdat - 4: mdat], "big")
    put("zeroed.mp4", data[: mdat + 4] + bytes(end - mdat - 4) + data[end:], "no decodable frame")
    for ext in (".webm", ".avi"):  # these containers decode up to the cut: caught by the declared length
        whole = Path(encode(str(SAMPLE / "images" / "n01440764_tench.JPEG"), folder / f"whole{ext}", 30))
        put(f"cut{ext}", whole.read_bytes()[: whole.stat().st_size // 2], "truncated")
        whole.unlink()
    write_video(str(folder / "zero_frames.avi"), [])
    out[str(folder / "zero_frames.avi")] = "zero-length"
    out[str(folder / "missing.mp4")] = "file not found"
    os.mkfifo(folder / "pipe.mp4")  # nobody writes to it: reading it would block for ever
    out[str(folder / "pipe.mp4")] = "not a regular file: a FIFO"
    return out


@pytest.fixture(scope="module")
def sample() -> list[tuple[str, int]]:
    if not (SAMPLE / "labels.csv").exists():
        pytest.skip(f"the shared ImageNet sample is absent ({SAMPLE}); it lies beside the checkout in CI")
    with open(SAMPLE / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[3::25]  # 20 images, one per class
    return [(str(SAMPLE / r["path"]), int(r["class_index"])) for r in rows]


@pytest.fixture(scope="module")
def videos(sample, tmp_path_factory) -> dict:
    """One 3-second pan-and-zoom video per sample image (mp4, webm and avi in turn), plus broken files."""
    folder = tmp_path_factory.mktemp("videos")
    good = [(encode(image, folder / f"v{i:02d}{EXTENSIONS[i % 3]}", 30), label)
            for i, (image, label) in enumerate(sample)]
    return {"folder": folder, "good": good, "broken": broken_videos(folder / "broken", good[0][0])}


def run(output: Path, *args: str) -> dict:
    manifest = cascade.run([*args, "--output", str(output), "--runner=FnApiRunner"])
    assert manifest["invariant_holds"]
    return manifest


def rows(output: Path, table: str) -> list[dict]:
    return RunFolder(str(output)).read(table).to_pylist() if RunFolder(str(output)).count_rows(table) else []


def accuracy(table: list[dict], key: str = "pred_class") -> float:
    return sum(r["label"] == r[key] for r in table) / len(table)


# --- the reader alone -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("plan, expected", [
    (SamplingPlan(Sampling.EVERY_N, every_n=7), [0, 7, 14, 21]),
    (SamplingPlan(Sampling.FPS, fps=2.5), [0, 4, 8, 12, 16, 20]),
    (SamplingPlan(Sampling.UNIFORM, clips=4, crops=3), [2, 8, 14, 20]),  # on screen at 4 segments' centres
])
def test_sampling_picks_the_planned_frames(tmp_path, sample, ext, plan, expected):
    path = encode(sample[0][0], tmp_path / f"v{ext}", 23)
    with open(path, "rb") as fh:
        frames = read_video(fh, plan, short_side=297)
    assert [f.index for f in frames] == expected
    assert [f.timestamp_s for f in frames] == pytest.approx([i / FPS for i in expected])
    views = [Image.open(io.BytesIO(v)) for v in frames[0].views]
    assert len(views) == (plan.crops if plan.mode is Sampling.UNIFORM else 1)
    # downscaled so that the shorter side is the largest any stage resizes to; crops are squares of it
    assert all(min(v.size) == 297 for v in views)
    assert views[0].size == ((396, 297) if len(views) == 1 else (297, 297))


def test_reads_through_fsspec_file_objects(tmp_path, sample):
    """The reader only needs a seekable file object: what fsspec gives for gs://, s3://, memory://..."""
    path = encode(sample[1][0], tmp_path / "v.webm", 20)
    with fsspec.open("memory://videos/v.webm", "wb") as fh:
        fh.write(Path(path).read_bytes())
    with fsspec.open("memory://videos/v.webm", "rb") as fh:
        frames = read_video(fh, SamplingPlan(Sampling.EVERY_N, every_n=5), short_side=256)
    assert [f.index for f in frames] == [0, 5, 10, 15]


def test_a_short_video_still_gives_every_uniform_view(tmp_path, sample):
    path = encode(sample[0][0], tmp_path / "short.mp4", 3)
    with open(path, "rb") as fh:
        frames = read_video(fh, SamplingPlan(Sampling.UNIFORM, clips=10, crops=1), short_side=256)
    assert len(frames) == 10 and {f.index for f in frames} == {0, 1, 2}


def test_broken_videos_raise_their_reason(videos):
    for uri, reason in videos["broken"].items():
        if reason in ("file not found", "not a regular file: a FIFO"):  # the reader's, not the decoder's
            continue
        with open(uri, "rb") as fh, pytest.raises(BadVideo, match=reason):
            read_video(fh, SamplingPlan(Sampling.EVERY_N, every_n=5), short_side=256)


def test_more_sampled_frames_than_the_limit_are_refused(videos):
    with open(videos["good"][0][0], "rb") as fh, pytest.raises(BadVideo, match="video.max_frames"):
        read_video(fh, SamplingPlan(Sampling.EVERY_N, every_n=1, max_frames=10), short_side=256)


def test_video_config_rules():
    for profile, granularity in (("video_frames", "frame"), ("video_clips", "video")):
        cfg = schema.load(profile)
        assert cfg.video.granularity.value == granularity and len(cfg.stages) == 2
    assert build_plan(schema.load("video_clips")).views == 30
    assert schema.load("lite_cascade").video is None
    with pytest.raises(schema.ConfigError, match="video.sampling"):
        schema.load("video_clips", ["video.sampling=fps"])
    with pytest.raises(schema.ConfigError, match="video.crops"):
        schema.load("video_frames", ["video.crops=3"])
    with pytest.raises(schema.ConfigError, match="video.fps"):
        schema.load("video_frames", ["video.fps=0"])


# --- end to end ---------------------------------------------------------------------------------------------

def test_video_granularity_matches_images_and_dead_letters_broken_videos(videos, sample, tmp_path):
    clips, crops = 3, 2
    good, broken = videos["good"], videos["broken"]
    manifest = write_manifest(tmp_path / "videos.csv", good + [(uri, 0) for uri in broken])
    out = tmp_path / "clips"
    result = run(out, "--config", "video_clips", "--input", manifest, f"video.clips={clips}", f"video.crops={crops}")

    predictions, dead = rows(out, "predictions"), rows(out, "dead_letter")
    assert sorted(r["uri"] for r in predictions) == sorted(uri for uri, _ in good)
    assert sorted(d["uri"] for d in dead) == sorted(broken)
    for d in dead:
        assert broken[d["uri"]] in d["error"], d
    per_view = [s["gmacs"] / (clips * crops) for s in result["stages"]]
    for r in predictions:  # cost per video = views x the GMACs of each model it went through
        assert r["gmacs"] == pytest.approx(clips * crops * sum(per_view[: r["exit_stage"]]))
    stats = rows(out, "exit_stats")
    assert stats[0]["predictions"] == len(good) and stats[0]["dead_letters"] == len(broken)

    images = tmp_path / "images"
    run(images, "--config", "video_clips", "video=null", "--input",
        write_manifest(tmp_path / "images.csv", sample))
    video_acc, image_acc = accuracy(predictions), accuracy(rows(images, "predictions"))
    print(f"video-level accuracy {video_acc:.1%} vs image-level {image_acc:.1%} on {len(sample)} images")
    assert abs(video_acc - image_acc) <= 0.15 + 1e-9  # at most 3 of the 20 decided otherwise


def test_frame_granularity_writes_one_row_per_sampled_frame(videos, sample, tmp_path):
    every_n = 7
    lengths = {encode(image, tmp_path / f"f{n}{ext}", n): (n, label)  # videos of 30, 23 and 15 frames
               for (image, label), n, ext in zip(sample, (30, 23, 15), EXTENSIONS)}
    broken = {uri: reason for uri, reason in videos["broken"].items() if reason in ("truncated", "empty file")}
    manifest = write_manifest(tmp_path / "frames.csv",
                              [(uri, label) for uri, (_, label) in lengths.items()] + [(u, 0) for u in broken])
    out = tmp_path / "frames"
    run(out, "--config", "video_frames", "--input", manifest, "video.sampling=every_n", f"video.every_n={every_n}")

    frames = rows(out, "predictions")
    for uri, (n, _) in lengths.items():
        mine = sorted(r["frame_index"] for r in frames if r["video_id"] == uri)
        assert mine == list(range(0, n, every_n)) and len(mine) == math.ceil(n / every_n)
        assert all(r["timestamp_s"] == pytest.approx(r["frame_index"] / FPS) for r in frames if r["video_id"] == uri)
    assert len(frames) == sum(math.ceil(n / every_n) for n, _ in lengths.values())
    per_video = {r["video_id"]: r for r in rows(out, "video_predictions")}
    assert set(per_video) == set(lengths)
    for uri, (n, label) in lengths.items():
        mine = [r for r in frames if r["video_id"] == uri]
        assert per_video[uri]["frames"] == len(mine) and per_video[uri]["label"] == label
        assert per_video[uri]["gmacs"] == pytest.approx(sum(r["gmacs"] for r in mine))
    dead = rows(out, "dead_letter")
    assert sorted(d["uri"] for d in dead) == sorted(broken) and all(d["stage"] == 0 for d in dead)
    assert not {r["uri"] for r in frames} & set(broken)
    assert os.path.exists(out / "manifest.json")


def test_scoring_videos_gives_the_logits_the_cascade_decides_on(videos, tmp_path):
    """pipelines.score at video granularity: one row per video, the mean over its views, so calibration sees
    what a video_clips stage routes by; a broken video is a dead letter of reading."""
    import numpy as np

    from models import committee
    from pipelines import score

    good, broken = videos["good"][:3], next(iter(videos["broken"]))
    manifest = write_manifest(tmp_path / "v.csv", good + [(broken, 0)])
    views = ["video.clips=2", "video.crops=1"]
    scored = score.run(["--config", "video_clips", "--models", "lite0@224", "--input", manifest, "--output",
                        str(tmp_path / "scores"), "--runner=FnApiRunner", *views])
    assert scored["invariant_holds"] and scored["counts"]["read_dead_letters"] == 1
    table = {r["uri"]: r for r in rows(tmp_path / "scores", "scores")}
    assert sorted(table) == sorted(uri for uri, _ in good)
    run(tmp_path / "cascade", "--config", "video_clips", "--input", manifest, "stages=[{model: lite0}]", *views)
    for r in rows(tmp_path / "cascade", "predictions"):
        logits = np.asarray(table[r["uri"]]["logits"], dtype=np.float64)
        assert table[r["uri"]]["gmacs"] == pytest.approx(r["gmacs"])  # 2 views x Lite0's GMACs
        assert r["pred_class"] == int(np.argmax(logits))
        assert r["confidence"] == pytest.approx(float(committee.confidence(logits)), abs=1e-5)


def test_scoring_refuses_frame_granularity(tmp_path):
    from pipelines import score

    with pytest.raises(SystemExit, match="video.granularity: scoring takes images, or videos at granularity video"):
        score.run(["--config", "video_frames", "--models", "lite0@224", "--input", str(tmp_path / "m.csv"),
                   "--output", str(tmp_path / "out")])
