"""Robustness (issue 4): a corpus of bad and odd inputs, built on the fly, through the real pipeline.

One run mixes the corpus with a few good sample images, one run has the good images alone (both share a
module fixture and a one-stage Lite0 config, to stay cheap); a tiny TorchScript model that raises on a
magic input tests failing batches, and serves the other runs (count invariant, failed and killed runs);
safe loading, the output folder rules and the sink's retries need no pipeline run.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image

from configs import schema
from models import registry
from models.preprocess import BadInput, decode, load_image
from pipelines import cascade, common
from pipelines.common import read_table
from transforms.io import ReadBytes
from transforms.outputs import DEAD_LETTER_SCHEMA, WriteTable
from transforms.records import DeadLetter, Record
from transforms.stage import ClassifierHandler, InferenceFailure, StageRuntime

ROOT = Path(__file__).resolve().parent.parent

ONE_STAGE = "stages:\n  - {model: lite0, resolution: 224, batch_size: 8}\n"
MAX_PIXELS = 20_000_000  # set in the config: the bomb's reason must quote it
CLASSIFIED = "classified"
UNREADABLE = r"^(image could not be decoded: |not an image Pillow can identify)"


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1x1 PNG whose header then claims ``width`` x ``height`` (IHDR patched, its CRC fixed)."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """``upright`` stored turned a quarter left, with EXIF orientation 6 (display: turn it right)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)


def animated_gif(first: Image.Image) -> bytes:
    frames = [first.convert("P"), Image.new("RGB", first.size, "red").convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, duration=100)


def png_with_bad_crc(im: Image.Image) -> bytes:
    png = bytearray(encode(im, "PNG"))
    png[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(png)


def corpus(photo: Image.Image) -> dict[str, tuple[bytes | None, str | tuple[int, str]]]:
    """File name -> (bytes, None for a missing file; what must happen: CLASSIFIED or (stage, reason regex))."""
    small = photo.resize((160, 120))
    jpeg = encode(small, "JPEG", quality=90)
    gray16 = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    assert gray16.mode == "I;16"
    return {
        # issue list: bad inputs, each with its reason
        "missing.jpg": (None, (0, r"^file not found$")),
        "zero-bytes.jpg": (b"", (1, r"^empty file \(0 bytes\)$")),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], (1, r"^image could not be decoded: OSError: image file is "
                                                      r"truncated")),
        "text.jpg": (b"this is not a picture\n", (1, r"^not an image Pillow can identify")),
        "bomb.png": (bomb_png(), (1, rf"^image of 30000x30000 pixels exceeds the limit of {MAX_PIXELS} pixels "
                                    r"\(decode\.max_pixels\)$")),
        # issue list: odd but decodable, so classified whatever their mode
        "cmyk.jpg": (encode(small.convert("CMYK"), "JPEG"), CLASSIFIED),
        "gray16.png": (encode(gray16, "PNG"), CLASSIFIED),
        "palette-transparent.png": (encode(small.convert("P", palette=Image.Palette.ADAPTIVE), "PNG",
                                           transparency=0), CLASSIFIED),
        "gray-alpha.png": (encode(small.convert("LA"), "PNG"), CLASSIFIED),
        "gray.jpg": (encode(small.convert("L"), "JPEG"), CLASSIFIED),
        "animated.gif": (animated_gif(small), CLASSIFIED),
        "photo.webp": (encode(small, "WEBP"), CLASSIFIED),
        "exif-rotated.jpg": (exif_rotated_jpeg(small), CLASSIFIED),
        "café photo ü.jpg": (jpeg, CLASSIFIED),
        # resilience: more odd files
        "garbage-appended.jpg": (jpeg + b"\x00garbage" * 64, CLASSIFIED),
        "one-pixel.png": (encode(Image.new("RGB", (1, 1), "blue"), "PNG"), CLASSIFIED),
        "thin-1x5000.png": (encode(Image.new("RGB", (1, 5000), "green"), "PNG"), CLASSIFIED),
        "photo.tif": (encode(small, "TIFF"), CLASSIFIED),
        "photo.bmp": (encode(small, "BMP"), CLASSIFIED),
        "one-bit.png": (encode(small.convert("1"), "PNG"), CLASSIFIED),
        "float.tif": (encode(small.convert("F"), "TIFF"), CLASSIFIED),
        "bad-crc.png": (png_with_bad_crc(small), (1, UNREADABLE)),
        "truncated.png": (encode(small, "PNG")[:300], (1, UNREADABLE)),
    }


def write_manifest(path: Path, rows: list[dict]) -> str:
    """A manifest CSV with columns id, uri, label (uris relative to the manifest's folder allowed)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "uri", "label"])
        for row in rows:
            writer.writerow([row.get("id", ""), row["uri"], row.get("label", "")])
    return str(path)


def run(tmp: Path, out: Path, source: str, *args: str, config: str = ONE_STAGE) -> dict:
    (tmp / "config.yaml").write_text(config)
    return cascade.run(["--config", str(tmp / "config.yaml"), "--input", source, "--output", str(out),
                        "--runner=FnApiRunner", f"decode.max_pixels={MAX_PIXELS}", *args])


def rows_by(out: Path, table: str, key: str = "uri") -> dict:
    return {r[key]: r for r in read_table(str(out), table).to_pylist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_subset):
    """The corpus mixed with good images (and duplicate ids) in one run; the good images alone in another."""
    tmp = tmp_path_factory.mktemp("robust")
    good = [{"id": f"good{i}", "uri": r["uri"], "label": r["label"]} for i, r in enumerate(sample_subset[:3])]
    files = corpus(Image.open(good[0]["uri"]).convert("RGB"))
    bad = []
    for name, (data, _) in files.items():
        if data is not None:
            (tmp / name).write_bytes(data)
        bad.append({"id": name, "uri": name})  # relative to the manifest: spaces, accents and all
    bad.append({"id": "file-url", "uri": f"file://{tmp / 'café photo ü.jpg'}"})  # the same file as a URL
    bad.append({"id": "percent-encoded", "uri": f"file://{tmp}/caf%C3%A9%20photo%20%C3%BC.jpg"})  # not decoded
    bad.append({"id": "unknown-protocol", "uri": "nosuchfs://bucket/a.jpg"})
    shutil.copy(good[1]["uri"], tmp / "first.jpg")
    shutil.copy(good[2]["uri"], tmp / "second.jpg")
    duplicates = [
        {"id": "twice", "uri": "first.jpg"},  # kept: listed first with id "twice"
        {"id": "twice", "uri": "second.jpg"},  # dead letter: same id
        {"uri": good[0]["uri"]},  # no id, so the id is the uri (good0's own row has id "good0"): classified
        {"uri": good[0]["uri"]},  # the same uri again without id: a duplicate id
    ]
    mixed_rows = good[:1] + bad[: len(bad) // 2] + good[1:] + duplicates + bad[len(bad) // 2:]
    mixed = run(tmp, tmp / "mixed", write_manifest(tmp / "mixed.csv", mixed_rows))
    clean = run(tmp, tmp / "clean", write_manifest(tmp / "clean.csv", good))
    return {"tmp": tmp, "good": good, "files": files, "rows": mixed_rows, "mixed": mixed, "clean": clean}


def test_every_input_ends_in_exactly_one_table(runs):
    out, rows = runs["tmp"] / "mixed", runs["rows"]
    predictions = read_table(str(out), "predictions").to_pylist()
    dead = read_table(str(out), "dead_letter").to_pylist()
    assert runs["mixed"]["counts"] == {"inputs_listed": len(rows), "predictions": len(predictions),
                                       "dead_letters": len(dead), "exit_stats_predictions": len(predictions),
                                       "exit_stats_dead_letters": len(dead)}
    assert runs["mixed"]["invariant_holds"]
    resolved = collections.Counter(r["uri"] if "://" in r["uri"] else os.path.join(runs["tmp"], r["uri"]) for r in rows)
    assert collections.Counter(r["uri"] for r in predictions + dead) == resolved
    assert len({r["id"] for r in predictions}) == len(predictions)  # ids are keys


def test_each_bad_input_has_its_stage_and_reason(runs):
    dead = rows_by(runs["tmp"] / "mixed", "dead_letter", "id")
    for name, (_, expected) in runs["files"].items():
        if expected == CLASSIFIED:
            assert name not in dead, (name, dead.get(name))
            continue
        stage, reason = expected
        assert name in dead, name
        assert dead[name]["stage"] == stage, (name, dead[name])
        assert re.search(reason, dead[name]["error"]), (name, dead[name]["error"])
    assert (dead["percent-encoded"]["stage"], dead["percent-encoded"]["error"]) == (0, "file not found")
    assert (dead["unknown-protocol"]["stage"], dead["unknown-protocol"]["error"]) == (
        0, "could not read: ValueError: Protocol not known: nosuchfs")


def test_a_protocol_whose_package_is_absent_is_a_dead_letter(monkeypatch):
    def absent(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "open", absent)
    (out,) = ReadBytes(100).process(Record(id="a", uri="s3://bucket/a.jpg"))
    assert out.value == DeadLetter("a", "s3://bucket/a.jpg", 0,
                                   "could not read: ImportError: Install s3fs to access S3")


def test_decodable_inputs_are_classified(runs):
    predictions = rows_by(runs["tmp"] / "mixed", "predictions", "id")
    for name, (_, expected) in runs["files"].items():
        if expected == CLASSIFIED:
            assert predictions[name]["exit_stage"] == 1, name
            assert 0 < predictions[name]["confidence"] <= 1, name
    # the EXIF-rotated copy of good0 is rotated upright before inference: same class as the photo itself
    assert predictions["exif-rotated.jpg"]["pred_class"] == predictions["café photo ü.jpg"]["pred_class"]
    assert predictions["file-url"]["uri"] == f"file://{runs['tmp'] / 'café photo ü.jpg'}"
    assert predictions["file-url"]["pred_class"] == predictions["café photo ü.jpg"]["pred_class"]


def test_duplicate_ids_keep_the_first_listed_and_dead_letter_the_others(runs):
    out, tmp, good = runs["tmp"] / "mixed", runs["tmp"], runs["good"]
    predictions = rows_by(out, "predictions", "id")
    dead = [r for r in read_table(str(out), "dead_letter").to_pylist() if r["error"].startswith("duplicate id")]
    assert predictions["twice"]["uri"] == str(tmp / "first.jpg")
    assert predictions[good[0]["uri"]]["uri"] == good[0]["uri"]
    assert sorted((d["id"], d["uri"], d["stage"]) for d in dead) == sorted(
        [("twice", str(tmp / "second.jpg"), 0), (good[0]["uri"], good[0]["uri"], 0)])
    twice = next(d for d in dead if d["id"] == "twice")
    assert twice["error"] == (f"duplicate id 'twice': an earlier input has it ({tmp / 'first.jpg'}) and is the one "
                              "kept; give each input its own id")


def test_good_predictions_are_unchanged_by_bad_neighbours(runs):
    clean = rows_by(runs["tmp"] / "clean", "predictions", "id")
    mixed = rows_by(runs["tmp"] / "mixed", "predictions", "id")
    assert clean.keys() == {g["id"] for g in runs["good"]}
    for rid, row in clean.items():
        assert mixed[rid]["pred_class"] == row["pred_class"], rid
        assert mixed[rid]["top5_classes"] == row["top5_classes"], rid
        assert mixed[rid]["confidence"] == pytest.approx(row["confidence"], abs=1e-5), rid
    assert runs["clean"]["counts"]["dead_letters"] == 0


# ---- decoding, without the pipeline ---------------------------------------------------------------------

def test_exif_orientation_is_applied_before_the_crop(sample_subset):
    upright = Image.open(sample_subset[0]["uri"]).convert("RGB").resize((200, 120))
    cfg = registry.get("lite0").input
    got = load_image(exif_rotated_jpeg(upright), cfg).astype(np.float64)
    want = load_image(encode(upright, "JPEG", quality=95), cfg).astype(np.float64)
    turned = load_image(encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95), cfg)
    assert decode(exif_rotated_jpeg(upright)).size == (200, 120)
    assert np.abs(got - want).mean() < 3  # JPEG noise only
    assert np.abs(got - turned).mean() > 10 * np.abs(got - want).mean()


def test_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    def no_decode(self):
        raise AssertionError("pixels were decoded")

    bomb = bomb_png()
    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(BadInput, match="30000x30000 pixels exceeds the limit of 1000 pixels"):
        decode(bomb, max_pixels=1000)


# ---- failing batches --------------------------------------------------------------------------------------

POISON_RGB = (13, 17, 19)  # a solid image of this colour makes the model raise


class Poisoned(torch.nn.Module):
    """A tiny 10-class model (channel means -> linear) that raises on any batch holding the poison image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 10)
        self.register_buffer("poison", (torch.tensor(POISON_RGB, dtype=torch.float32) - 127.0) / 128.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        if bool(((means - self.poison).abs() < 0.004).all(dim=1).any()):
            raise RuntimeError("poisoned input in this batch")
        return self.fc(means * 4.0)


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("poison") / "poisoned.pt"
    torch.jit.script(Poisoned().eval()).save(str(path))
    return str(path)


def poisoned_config(weights: str) -> str:
    return (f"models:\n  poisoned: {{arch: torchscript, weights: '{weights}', num_classes: 10, resolution: 32}}\n"
            "stages:\n  - {model: poisoned, batch_size: 8}\n")


def test_a_failing_batch_is_bisected_down_to_the_poisonous_record(poisoned_model):
    cfg = schema.load(None, ["models.poisoned.arch=torchscript", f"models.poisoned.weights={poisoned_model}",
                             "models.poisoned.num_classes=10", "models.poisoned.resolution=32",
                             "stages.0.model=poisoned", "stages.0.batch_size=8", "device=cpu"])
    spec = schema.stage_specs(cfg)[0]
    handler = ClassifierHandler(spec, cfg.stages[0], StageRuntime(device="cpu"), 1)
    model = handler.load_model()
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    batch.insert(5, np.full((32, 32, 3), POISON_RGB, dtype=np.uint8))
    results = handler.run_inference(batch, model)
    assert [isinstance(r.inference, InferenceFailure) for r in results] == [i == 5 for i in range(8)]
    assert results[5].inference.reason == "model poisoned@32 failed: RuntimeError: poisoned input in this batch"
    alone = [model(np.stack([x])) for i, x in enumerate(batch) if i != 5]
    for got, want in zip([r.inference for i, r in enumerate(results) if i != 5], alone):
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-6)


def test_non_finite_logits_fail_only_their_record(poisoned_model):
    class NaNOnSecond:
        def __call__(self, batch):
            out = np.zeros((len(batch), 10), dtype=np.float32)
            out[1:2] = np.nan
            return out

    spec = registry.ModelSpec("fake", registry.TORCHSCRIPT, poisoned_model, registry.InputConfig(32), num_classes=10)
    handler = ClassifierHandler(spec, schema.StageConfig(model="fake"), StageRuntime(), 1)
    results = handler.run_inference([np.zeros((32, 32, 3), np.uint8)] * 3, NaNOnSecond())
    assert [isinstance(r.inference, InferenceFailure) for r in results] == [False, True, False]
    assert "non-finite logits" in results[1].inference.reason


def test_poisonous_record_is_dead_lettered_and_its_neighbours_predicted_once(tmp_path, sample_subset,
                                                                           poisoned_model):
    Image.new("RGB", (50, 40), POISON_RGB).save(tmp_path / "poison.png")
    rows = [{"id": f"good{i}", "uri": r["uri"]} for i, r in enumerate(sample_subset[:6])]
    rows.insert(3, {"id": "poison", "uri": str(tmp_path / "poison.png")})
    manifest = run(tmp_path, tmp_path / "out", write_manifest(tmp_path / "m.csv", rows),
                   config=poisoned_config(poisoned_model))
    dead = read_table(str(tmp_path / "out"), "dead_letter").to_pylist()
    predictions = read_table(str(tmp_path / "out"), "predictions").to_pylist()
    assert [(d["id"], d["stage"], d["error"]) for d in dead] == [
        ("poison", 1, "model poisoned@32 failed: RuntimeError: poisoned input in this batch")]
    assert sorted(p["id"] for p in predictions) == [f"good{i}" for i in range(6)]
    assert manifest["invariant_holds"] and manifest["counts"]["inputs_listed"] == 7
    stats = read_table(str(tmp_path / "out"), "exit_stats").to_pylist()
    assert (stats[0]["records_in"], stats[0]["records_exited"], stats[0]["records_failed"]) == (7, 6, 1)


# ---- safe loading: checked per stage before any work -------------------------------------------------------

def user_model_config(arch: str, weights: str, num_classes: int) -> schema.CascadeConfig:
    return schema.load(None, [f"models.mine.arch={arch}", f"models.mine.weights={weights}",
                              f"models.mine.num_classes={num_classes}", "models.mine.resolution=32",
                              "stages.0.model=mine"])


def test_a_checkpoint_with_another_class_count_fails_up_front_naming_the_stage(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    cfg = user_model_config("torchvision:resnet18", str(tmp_path / "ten.pt"), 1000)
    with pytest.raises(SystemExit, match=r"^invalid config: stages\.0\.model: model 'mine': checkpoint .*ten\.pt' "
                                         r"does not fit torchvision:resnet18 with num_classes=1000: 2 shape "
                                         r"mismatches: fc\.weight is \(10, 512\) in the checkpoint but \(1000, 512\) "
                                         r"in the model"):
        cascade.stage_infos(cfg)


def test_a_torchscript_model_with_another_class_count_fails_up_front(poisoned_model):
    cfg = user_model_config("torchscript", poisoned_model, 1000)
    with pytest.raises(SystemExit, match=r"^invalid config: stages\.0\.model: model 'mine': returns shape \(1, 10\) "
                                         r"for one image, but its entry says num_classes=1000"):
        cascade.stage_infos(cfg)


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save({**state, "extra": RunsCode(str(marker))}, tmp_path / "evil.pt")
    cfg = user_model_config("torchvision:resnet18", str(tmp_path / "evil.pt"), 10)
    with pytest.raises(SystemExit, match=r"^invalid config: stages\.0\.model: weights at .*evil\.pt' are not plain "
                                         r"tensors and were refused \(torch\.load weights_only=True"):
        cascade.stage_infos(cfg)
    assert not marker.exists()


# ---- the count invariant ----------------------------------------------------------------------------------

def counts(**changes) -> dict:
    base = {"inputs_listed": 10, "predictions": 7, "dead_letters": 3, "exit_stats_predictions": 7,
            "exit_stats_dead_letters": 3}
    return {**base, **changes}


@pytest.mark.parametrize("changes, problem", [
    ({}, None),
    ({"inputs_listed": None}, None),  # a runner without metrics: the tables are still compared
    ({"inputs_listed": 11}, "11 inputs listed but 10 = predictions + dead letters written"),
    ({"predictions": 8}, "tables disagree: predictions 8 vs 7 tallied, dead letters 3 vs 3 tallied"),
    ({"exit_stats_dead_letters": 2}, "tables disagree: predictions 7 vs 7 tallied, dead letters 3 vs 2 tallied"),
])
def test_check_invariant(changes, problem):
    assert cascade.check_invariant(counts(**changes)) == problem


def test_a_broken_invariant_fails_the_run_with_a_clear_message(tmp_path, monkeypatch, capsys, poisoned_model):
    (tmp_path / "text.jpg").write_text("not a picture")
    real = cascade.listed_inputs
    monkeypatch.setattr(cascade, "listed_inputs", lambda result, name="inputs_listed": real(result, name) + 1)
    with pytest.raises(SystemExit, match=r"^COUNT INVARIANT VIOLATED: 2 inputs listed but 1 = predictions \+ "
                                         r"dead letters written$"):
        run(tmp_path, tmp_path / "out", str(tmp_path / "*.jpg"), config=poisoned_config(poisoned_model))
    assert "records: 1 inputs -> 0 predictions + 1 dead letters" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["invariant_holds"] is False


# ---- outputs: all or nothing ------------------------------------------------------------------------------

def test_a_failed_run_leaves_no_manifest(tmp_path, monkeypatch, poisoned_model):
    """manifest.json marks a complete run: a run that dies after (some of) its tables leaves none."""
    (tmp_path / "text.jpg").write_text("not a picture")

    def broken(acc, stages):
        raise RuntimeError("killed while tallying")

    monkeypatch.setattr("transforms.outputs.exit_stats_rows", broken)
    with pytest.raises(Exception, match="killed while tallying"):
        run(tmp_path, tmp_path / "out", str(tmp_path / "*.jpg"), config=poisoned_config(poisoned_model))
    assert not (tmp_path / "out" / common.MANIFEST).exists()


KILLED_IN_THE_SINK = """
import os, signal
from apache_beam.io import parquetio
from pipelines import cascade

write = parquetio._ParquetSink.write_record

def write_then_die(self, writer, table):  # the process is killed with a table file half written
    write(self, writer, table)
    os.kill(os.getpid(), signal.SIGKILL)

parquetio._ParquetSink.write_record = write_then_die
cascade.main()
"""


def test_a_killed_run_leaves_no_file_that_looks_complete(tmp_path, sample_subset, poisoned_model):
    """SIGKILL while a table file is being written: no manifest.json, the half-written file only in Beam's
    temporary folder (which readers of <table>/*.parquet do not see); --overwrite then gives a whole run."""
    (tmp_path / "config.yaml").write_text(poisoned_config(poisoned_model))
    manifest = write_manifest(tmp_path / "m.csv", [{"uri": r["uri"]} for r in sample_subset[:2]] + [{"uri": "x.jpg"}])
    args = ["--config", str(tmp_path / "config.yaml"), "--input", manifest, "--output", str(tmp_path / "out"),
            "--runner=FnApiRunner"]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_THE_SINK, *args], cwd=ROOT, capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    out = tmp_path / "out"
    assert not (out / common.MANIFEST).exists()
    assert list(out.glob("*/beam-temp-*/*")), "the half-written file should sit in a temporary folder"
    for table in common.TABLES:
        for f in common.table_files(str(out), table)[1]:  # what was finalized before the kill is whole
            assert pq.ParquetFile(f).metadata.num_rows >= 0
    rerun = cascade.run([*args, "--overwrite"])
    assert rerun["invariant_holds"] and rerun["counts"]["inputs_listed"] == 3
    assert not list(out.glob("*/beam-temp-*"))


def test_overwrite_removes_the_manifest_before_the_tables(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for table in common.TABLES:
        (out / table).mkdir(parents=True)
        (out / table / "part-00000-of-00001.parquet").write_bytes(b"old")
    (out / common.MANIFEST).write_text("{}")
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        common.prepare_output(str(out), overwrite=False)
    removed = []
    fs_type = type(fsspec.filesystem("file"))
    real_rm = fs_type.rm
    monkeypatch.setattr(fs_type, "rm", lambda self, path, *a, **k: (removed.append(Path(path).name),
                                                                     real_rm(self, path, *a, **k)))
    run_id = common.prepare_output(str(out), overwrite=True)
    assert removed[:4] == [common.MANIFEST, *common.TABLES]
    assert os.listdir(out) == [common.RUNNING]  # this run's lock
    common.release_output(str(out), run_id)
    assert os.listdir(out) == []


def test_a_manifest_without_a_uri_column_is_refused_before_any_work(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(SystemExit, match=r"^invalid input: manifest .*m\.csv: needs a column named one of "
                                         r"\('uri', 'path'\); has \['file', 'label'\]$"):
        run(tmp_path, tmp_path / "out", str(tmp_path / "m.csv"))
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match=r"^output: cannot write to .*a-file/out: "):
        common.prepare_output(str(tmp_path / "a-file" / "out"), overwrite=False)


class FailOnce:
    """Makes the Parquet sink raise once, after it has written (part of) a bundle: a worker lost mid-bundle."""

    def __init__(self, real, after: int):
        self.real, self.after, self.written, self.failed = real, after, 0, False

    def __call__(self, sink, writer, value):
        self.real(sink, writer, value)
        self.written += 1
        if not self.failed and self.written == self.after:
            self.failed = True
            raise RuntimeError("worker lost mid-bundle")


def test_a_retried_bundle_writes_no_duplicate_rows(tmp_path, monkeypatch):
    """The bundle-based DirectRunner retries a failed bundle, as Dataflow does: the file sink writes each
    attempt to its own temporary file and finalizes only the committed ones, so no row appears twice."""
    from apache_beam.io import parquetio
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner

    fail = FailOnce(parquetio._ParquetSink.write_record, after=1)
    monkeypatch.setattr(parquetio._ParquetSink, "write_record", lambda s, w, v: fail(s, w, v))
    attempts, open_writer = [], parquetio._ParquetSink.open_writer
    monkeypatch.setattr(parquetio._ParquetSink, "open_writer",
                        lambda s, init, uid: (attempts.append(uid), open_writer(s, init, uid))[1])
    rows = [{"id": str(i), "uri": f"u{i}", "stage": 1, "error": "e"} for i in range(10)]
    with beam.Pipeline(runner=BundleBasedDirectRunner()) as p:
        _ = p | beam.Create(rows) | WriteTable(str(tmp_path), "dead_letter", DEAD_LETTER_SCHEMA, 1)
    assert fail.failed and len(set(attempts)) == 2  # the failed attempt wrote to a temporary file of its own
    assert sorted(r["id"] for r in read_table(str(tmp_path), "dead_letter").to_pylist()) == sorted(
        r["id"] for r in rows)
    assert os.listdir(tmp_path / "dead_letter") == ["part-00000-of-00001.parquet"]  # temporary files gone
