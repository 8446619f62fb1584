"""Robustness (issue 4): a corpus of bad and odd inputs, built on the fly, through the real pipeline.

One run mixes the corpus with a few good sample images, one run has the good images alone (both share a
module fixture and a one-stage Lite0 config, to stay cheap); a tiny TorchScript model that raises on a
magic input tests failing batches, and serves the other runs (count invariant, failed and killed runs);
safe loading, the output folder rules and the sink's retries need no pipeline run.
"""

from __future__ import annotations

import argparse
import collections
import csv
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import apache_beam as beam
import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import transforms.io as io_module
import transforms.manifests as manifests
from configs import schema
from models import registry
from models.classifier import Classifier, Failure, LoadedModel
from models.inference import Precision
from models.preprocess import BadInput, decode, load_image
from pipelines import cascade, common, folder, job, summary
from pipelines.folder import RunFolder
from tests.conftest import scripted, torchscript_config
from transforms.fetch import with_timeout
from transforms.io import (
    DEAD,
    ExpandSource,
    FirstOfId,
    PackById,
    ReadBytes,
    ReadInputs,
)
from transforms.manifests import check_source, manifest_entries
from transforms.outputs import WriteTable
from transforms.records import CATEGORIES, DeadLetter, Record
from transforms.tables import ALL_TABLE_NAMES, DEAD_LETTER

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
    """File name -> (bytes, None for a missing file; what must happen: CLASSIFIED or (stage, reason regex,
    category regex))."""
    small = photo.resize((160, 120))
    jpeg = encode(small, "JPEG", quality=90)
    gray16 = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    assert gray16.mode == "I;16"
    return {
        # issue list: bad inputs, each with its reason
        "missing.jpg": (None, (0, r"^file not found$", "not_found")),
        "zero-bytes.jpg": (b"", (1, r"^empty file \(0 bytes\)$", "not_an_image")),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], (1, r"^image could not be decoded: OSError: image file is "
                                                      r"truncated", "decode_error")),
        "text.jpg": (b"this is not a picture\n", (1, r"^not an image Pillow can identify", "not_an_image")),
        "bomb.png": (bomb_png(), (1, rf"^image of 30000x30000 pixels exceeds the limit of {MAX_PIXELS} pixels "
                                    r"\(decode\.max_pixels\)$", "too_large")),
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
        "bad-crc.png": (png_with_bad_crc(small), (1, UNREADABLE, "decode_error|not_an_image")),
        "truncated.png": (encode(small, "PNG")[:300], (1, UNREADABLE, "decode_error|not_an_image")),
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
    return {r[key]: r for r in RunFolder(str(out)).read(table).to_pylist()}


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
    predictions = RunFolder(str(out)).read("predictions").to_pylist()
    dead = RunFolder(str(out)).read("dead_letter").to_pylist()
    assert runs["mixed"]["counts"] == {"inputs_listed": len(rows), "predictions": len(predictions),
                                       "dead_letters": len(dead), "exit_stats_predictions": len(predictions),
                                       "exit_stats_dead_letters": len(dead)}
    assert runs["mixed"]["invariant_holds"]
    resolved = collections.Counter(manifests.join_uri(str(runs["tmp"]), r["uri"]) for r in rows)  # normalised
    assert collections.Counter(r["uri"] for r in predictions + dead) == resolved
    assert len({r["id"] for r in predictions}) == len(predictions)  # ids are keys


def test_each_bad_input_has_its_stage_reason_and_category(runs):
    dead = rows_by(runs["tmp"] / "mixed", "dead_letter", "id")
    for name, (_, expected) in runs["files"].items():
        if expected == CLASSIFIED:
            assert name not in dead, (name, dead.get(name))
            continue
        stage, reason, category = expected
        assert name in dead, name
        assert dead[name]["stage"] == stage, (name, dead[name])
        assert re.search(reason, dead[name]["error"]), (name, dead[name]["error"])
        assert re.fullmatch(category, dead[name]["category"]), (name, dead[name])
        if dead[name]["error"].startswith("not an image"):
            assert dead[name]["category"] == "not_an_image"
    assert [dead["percent-encoded"][k] for k in ("stage", "error", "category")] == [0, "file not found", "not_found"]
    assert [dead["unknown-protocol"][k] for k in ("stage", "error", "category")] == [
        0, "could not read: ValueError: Protocol not known: nosuchfs", "read_error"]
    twice = [d for d in dead.values() if d["error"].startswith("duplicate id")]
    assert twice and {d["category"] for d in twice} == {"duplicate_id"}


def test_decodable_inputs_are_classified(runs):
    predictions = rows_by(runs["tmp"] / "mixed", "predictions", "id")
    for name, (_, expected) in runs["files"].items():
        if expected == CLASSIFIED:
            assert predictions[name]["exit_stage"] == 1, name
            assert 0 < predictions[name]["confidence"] <= 1, name
    # the EXIF-rotated copy of good0 is rotated upright before inference: same class as the photo itself
    assert predictions["exif-rotated.jpg"]["pred_class"] == predictions["café photo ü.jpg"]["pred_class"]
    assert predictions["file-url"]["uri"] == str(runs["tmp"] / "café photo ü.jpg")  # a file:// URL is its path
    assert predictions["file-url"]["pred_class"] == predictions["café photo ü.jpg"]["pred_class"]


def test_duplicate_ids_keep_the_first_listed_and_dead_letter_the_others(runs):
    out, tmp, good = runs["tmp"] / "mixed", runs["tmp"], runs["good"]
    predictions = rows_by(out, "predictions", "id")
    dead = [r for r in RunFolder(str(out)).read("dead_letter").to_pylist() if r["error"].startswith("duplicate id")]
    assert predictions["twice"]["uri"] == str(tmp / "first.jpg")
    assert predictions[good[0]["uri"]]["uri"] == good[0]["uri"]
    assert sorted((d["id"], d["uri"], d["stage"]) for d in dead) == sorted(
        [("twice", str(tmp / "second.jpg"), 0), (good[0]["uri"], good[0]["uri"], 0)])
    twice = next(d for d in dead if d["id"] == "twice")
    assert twice["error"] == (f"duplicate id 'twice': an earlier input has it ({tmp / 'first.jpg'}) and is the one "
                              "kept; give each input its own id")


def test_listing_in_batches_and_packs_keeps_every_row_and_the_first_of_each_id(tmp_path, monkeypatch):
    """Row groups read in several batches, inputs packed in several flushes: every row is listed once, row
    numbers follow the file, and a duplicate id whose copies fall in different batches and packs keeps the
    first listed."""
    monkeypatch.setattr(manifests, "MANIFEST_BATCH_ROWS", 4)
    monkeypatch.setattr(io_module, "PACK_INPUTS", 5)
    ids = [f"r{i}" for i in range(23)] + ["r3", "r17"]  # r3 and r17 again, in later batches and packs
    uris = [str(tmp_path / f"{i}.jpg") for i in range(len(ids))]
    for uri in uris:
        Path(uri).write_bytes(b"x")
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ids, "uri": uris}), path, row_group_size=10)
    listed, dead, records = read_inputs_in_process(path)
    assert listed == len(ids) == len(dead) + len(records)
    assert sorted(r.id for r in records) == sorted(set(ids))
    kept = {r.id: r.uri for r in records}
    assert kept["r3"] == uris[3] and kept["r17"] == uris[17]
    assert sorted(d.uri for d in dead) == sorted([uris[23], uris[24]])
    rows = [n for n, _, _, _ in manifests.manifest_rows(path, ["id", "uri"], (1, 3))]
    assert rows == list(range(11, 26))  # row groups 1-2 numbered as in the whole file


def test_good_predictions_are_unchanged_by_bad_neighbours(runs):
    clean = rows_by(runs["tmp"] / "clean", "predictions", "id")
    mixed = rows_by(runs["tmp"] / "mixed", "predictions", "id")
    assert clean.keys() == {g["id"] for g in runs["good"]}
    for rid, row in clean.items():
        assert mixed[rid]["pred_class"] == row["pred_class"], rid
        assert [t["class"] for t in mixed[rid]["top5"]] == [t["class"] for t in row["top5"]], rid
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
    return scripted(Poisoned(), tmp_path_factory.mktemp("poison") / "poisoned.pt")


def poisoned_config(weights: str) -> str:
    return torchscript_config("poisoned", weights, "  - {model: poisoned, batch_size: 8}\n")


def test_a_failing_batch_is_bisected_down_to_the_poisonous_record(poisoned_model):
    cfg = schema.load(None, ["models.poisoned.arch=torchscript", f"models.poisoned.weights={poisoned_model}",
                             "models.poisoned.num_classes=10", "models.poisoned.resolution=32",
                             "stages.0.model=poisoned", "stages.0.batch_size=8", "device=cpu"])
    spec = schema.stage_specs(cfg)[0]
    classifier = Classifier(spec, device="cpu")
    model = classifier.load()
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    batch.insert(5, np.full((32, 32, 3), POISON_RGB, dtype=np.uint8))
    results = classifier.classify(model, batch)
    assert [isinstance(r, Failure) for r in results] == [i == 5 for i in range(8)]
    assert results[5].reason == "model poisoned@32 failed: RuntimeError: poisoned input in this batch"
    alone = [model(np.stack([x])) for i, x in enumerate(batch) if i != 5]
    for got, want in zip([r for i, r in enumerate(results) if i != 5], alone):
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-6)


class SizeLimited(torch.nn.Module):
    """A tiny 10-class model that runs out of memory, as a real one does under a memory limit, on any batch of
    more than ``limit`` images; it records the size of every pass."""

    def __init__(self, limit: int, poison: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 10)
        self.limit, self.poison, self.sizes = limit, poison, []
        self.register_buffer("poison_mean", (torch.tensor(POISON_RGB, dtype=torch.float32) - 127.0) / 128.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise RuntimeError(f"DefaultCPUAllocator: not enough memory: you tried to allocate {x.shape[0]} images")
        means = x.mean(dim=(2, 3))
        if self.poison and bool(((means - self.poison_mean).abs() < 0.004).all(dim=1).any()):
            raise RuntimeError("poisoned input in this batch")
        return self.fc(means * 4.0)


def _size_limited(limit: int, batch_size: int, poison: bool = False):
    spec = registry.ModelSpec("limited", registry.TORCHSCRIPT, "unused.pt", registry.InputConfig(32), num_classes=10)
    module = SizeLimited(limit, poison)
    loaded = LoadedModel(module, torch.device("cpu"), spec, channels_last=False, precision=Precision.FP32)
    return Classifier(spec, device="cpu", batch_size=batch_size), loaded, module


@pytest.mark.parametrize("n", [16, 5], ids=["full-batch", "partial-batch"])
def test_bisection_halves_really_get_smaller_under_a_memory_limit(n):
    """Issue 22: each half of a failing batch was padded back to the batch size, so under a memory limit every
    record became a model_error. Now each bisection level runs at half the size of the last (16, 8, 4): every
    record of a batch the model cannot take whole is classified, with the logits it gets alone."""
    classifier, loaded, module = _size_limited(limit=4, batch_size=16)
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    results = classifier.classify(loaded, batch)
    assert not any(isinstance(r, Failure) for r in results), results
    assert set(module.sizes) == {16, 8, 4} and module.sizes[0] == 16  # the batch size, then halves, quarters
    assert len(module.sizes) <= 1 + 2 + 4  # one pass per node of the bisection tree down to the size that fits
    for got, x in zip(results, batch):
        np.testing.assert_allclose(got, loaded(np.stack([x]))[0], rtol=1e-5, atol=1e-6)


def test_a_poison_records_neighbours_run_again_at_the_batch_size():
    """Bisection sets the poison record aside at smaller sizes; its neighbours then run once more at the batch
    size, so that their logits are those of any full batch (both execution modes write identical rows)."""
    classifier, loaded, module = _size_limited(limit=8, batch_size=8, poison=True)
    rng = np.random.default_rng(2)
    batch = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    batch.insert(3, np.full((32, 32, 3), POISON_RGB, dtype=np.uint8))
    results = classifier.classify(loaded, batch)
    assert [isinstance(r, Failure) for r in results] == [i == 3 for i in range(8)]
    assert module.sizes[0] == 8 and module.sizes[-1] == 8 and set(module.sizes[1:-1]) <= {4, 2, 1}
    clean = [x for i, x in enumerate(batch) if i != 3]
    full = loaded([*clean, clean[0]])[:7]  # the neighbours in one padded batch of the batch size
    np.testing.assert_array_equal(np.stack([r for i, r in enumerate(results) if i != 3]), full)


def test_a_batch_failing_at_every_size_fails_each_record_once():
    classifier, loaded, module = _size_limited(limit=0, batch_size=4)
    results = classifier.classify(loaded, [np.zeros((32, 32, 3), np.uint8)] * 3)
    assert all(isinstance(r, Failure) and "not enough memory" in r.reason for r in results)
    assert module.sizes == [4, 2, 2, 1, 1]  # 3 records: the batch size, then halves at 2, then 1 each


def test_non_finite_logits_fail_only_their_record(poisoned_model):
    class NaNOnSecond:
        def __call__(self, batch):
            out = np.zeros((len(batch), 10), dtype=np.float32)
            out[1:2] = np.nan
            return out

    spec = registry.ModelSpec("fake", registry.TORCHSCRIPT, poisoned_model, registry.InputConfig(32), num_classes=10)
    results = Classifier(spec).classify(NaNOnSecond(), [np.zeros((32, 32, 3), np.uint8)] * 3)
    assert [isinstance(r, Failure) for r in results] == [False, True, False]
    assert "non-finite logits" in results[1].reason


def test_poisonous_record_is_dead_lettered_and_its_neighbours_predicted_once(tmp_path, sample_subset,
                                                                           poisoned_model):
    Image.new("RGB", (50, 40), POISON_RGB).save(tmp_path / "poison.png")
    rows = [{"id": f"good{i}", "uri": r["uri"]} for i, r in enumerate(sample_subset[:6])]
    rows.insert(3, {"id": "poison", "uri": str(tmp_path / "poison.png")})
    manifest = run(tmp_path, tmp_path / "out", write_manifest(tmp_path / "m.csv", rows),
                   config=poisoned_config(poisoned_model))
    dead = RunFolder(str(tmp_path / "out")).read("dead_letter").to_pylist()
    predictions = RunFolder(str(tmp_path / "out")).read("predictions").to_pylist()
    assert [(d["id"], d["stage"], d["error"]) for d in dead] == [
        ("poison", 1, "model poisoned@32 failed: RuntimeError: poisoned input in this batch")]
    assert sorted(p["id"] for p in predictions) == [f"good{i}" for i in range(6)]
    assert manifest["invariant_holds"] and manifest["counts"]["inputs_listed"] == 7
    stats = {s["stage"]: s for s in RunFolder(str(tmp_path / "out")).read("exit_stats").to_pylist()}
    assert (stats[1]["records_in"], stats[1]["records_exited"], stats[1]["records_failed"]) == (7, 6, 1)
    assert dead[0]["category"] == "model_error"


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
        job.checked_plan(cfg)


def test_a_torchscript_model_with_another_class_count_fails_up_front(poisoned_model):
    cfg = user_model_config("torchscript", poisoned_model, 1000)
    with pytest.raises(SystemExit, match=r"^invalid config: stages\.0\.model: model 'mine': returns shape \(1, 10\) "
                                         r"for one image, but its entry says num_classes=1000"):
        job.checked_plan(cfg)


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
        job.checked_plan(cfg)
    assert not marker.exists()


# ---- the count invariant ----------------------------------------------------------------------------------

def counts(**changes) -> summary.RunCounts:
    base = {"inputs_listed": 10, "predictions": 7, "dead_letters": 3, "exit_stats_predictions": 7,
            "exit_stats_dead_letters": 3}
    return summary.RunCounts(**{**base, **changes})


@pytest.mark.parametrize("changes, problem", [
    ({}, None),
    ({"inputs_listed": None}, None),  # a runner without metrics: the tables are still compared
    ({"inputs_listed": 11}, "11 inputs listed but 10 = predictions + dead letters written"),
    ({"predictions": 8}, "tables disagree: predictions 8 vs 7 tallied, dead letters 3 vs 3 tallied"),
    ({"exit_stats_dead_letters": 2}, "tables disagree: predictions 7 vs 7 tallied, dead letters 3 vs 2 tallied"),
])
def test_check_invariant(changes, problem):
    assert counts(**changes).problem() == problem


def test_a_broken_invariant_fails_the_run_with_a_clear_message(tmp_path, monkeypatch, capsys, poisoned_model):
    (tmp_path / "text.jpg").write_text("not a picture")
    real = summary.metric
    monkeypatch.setattr(summary, "metric", lambda result, name="inputs_listed": real(result, name) + 1)
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

    def broken(*args):
        raise RuntimeError("killed while tallying")

    monkeypatch.setattr("transforms.outputs.exit_stats_rows", broken)
    with pytest.raises(Exception, match="killed while tallying"):
        run(tmp_path, tmp_path / "out", str(tmp_path / "*.jpg"), config=poisoned_config(poisoned_model))
    assert not (tmp_path / "out" / folder.MANIFEST).exists()
    assert RunFolder(str(tmp_path / "out")).committed_runs() == []


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
    assert not (out / folder.MANIFEST).exists()
    assert list(out.glob("*/beam-temp-*/*")), "the half-written file should sit in a temporary folder"
    for table in ALL_TABLE_NAMES:
        for f in out.glob(f"{table}/*.parquet"):  # what was finalized before the kill is whole
            assert pq.ParquetFile(f).metadata.num_rows >= 0
    assert RunFolder(str(out)).committed_runs() == [] and len(RunFolder(str(out)).incomplete_runs()) == 1
    with pytest.raises(SystemExit, match=r"holds an incomplete run: the run that locked it .* ended without "
                                         r"committing .*an incomplete run \d{8}T\d{6}Z-[0-9a-f]{6} .*no runs/\S+\.json"
                                         r".*--overwrite"):
        cascade.run(args)
    from pipelines import report

    with pytest.raises(SystemExit, match=r"^report: .* holds no committed run .*an incomplete run"):
        report.run(["--run", str(out)])
    rerun = cascade.run([*args, "--overwrite"])
    assert rerun["invariant_holds"] and rerun["counts"]["inputs_listed"] == 3
    assert not list(out.glob("*/beam-temp-*"))
    assert RunFolder(str(out)).committed_runs() == [rerun["run_id"]] and RunFolder(str(out)).incomplete_runs() == {}


def test_a_manifest_without_a_uri_column_is_refused_before_any_work(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(SystemExit, match=r"^invalid input: manifest .*m\.csv: needs a column named one of "
                                         r"\('uri', 'path'\); has \['file', 'label'\]$"):
        run(tmp_path, tmp_path / "out", str(tmp_path / "m.csv"))
    assert not (tmp_path / "out").exists()





RUN = "20261128T101500Z-abc123"


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
    rows = [{"run_id": RUN, "id": str(i), "uri": f"u{i}", "stage": 1, "category": "model_error", "error": "e"}
            for i in range(10)]
    with beam.Pipeline(runner=BundleBasedDirectRunner()) as p:
        prefix = RunFolder(str(tmp_path)).table_prefix(DEAD_LETTER.name, RUN)
        _ = p | beam.Create(rows) | WriteTable(prefix, DEAD_LETTER, num_shards=1)
    assert fail.failed and len(set(attempts)) == 2  # the failed attempt wrote to a temporary file of its own
    assert sorted(r["id"] for r in RunFolder(str(tmp_path)).read("dead_letter", [RUN]).to_pylist()) == sorted(
        r["id"] for r in rows)
    assert os.listdir(tmp_path / "dead_letter") == [f"{RUN}-00000-of-00001.parquet"]  # temporary files gone


# ---- issue 13: one bad row never stops the job; bad settings stop it before any work -----------------------

class Flat(torch.nn.Module):
    """A 10-class model with no multiply-add torch's FLOP counter counts: 0 GMACs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 4)[:, :10]


class AwkwardServer(http.server.BaseHTTPRequestHandler):
    """HTTP answers a real server may give: a JPEG, a 500 after a good HEAD, a body shorter than its
    Content-Length, 403, 404, and a stall longer than the read timeout."""

    jpeg = b""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head: bool):
        name = self.path.rsplit("/", 1)[-1]
        status, length, body = {"ok.jpg": (200, len(self.jpeg), self.jpeg), "head-ok-get-500.jpg": (200, 100, None),
                                "short.jpg": (200, 1000, b"\xff\xd8" * 5), "forbidden.jpg": (403, 0, b""),
                                "stall.jpg": (200, 100, None)}.get(name, (404, 0, b""))
        if name == "head-ok-get-500.jpg" and not head:
            status, length, body = 500, 0, b""
        if name == "stall.jpg" and not head:
            time.sleep(READ_TIMEOUT_S + 3)
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
            self.close_connection = True


@pytest.fixture(scope="module")
def server(sample_subset):
    AwkwardServer.jpeg = Path(sample_subset[0]["uri"]).read_bytes()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AwkwardServer)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    yield f"http://127.0.0.1:{srv.server_address[1]}", f"http://127.0.0.1:{closed}"
    srv.shutdown()


READ_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory) -> str:
    return scripted(Flat(), tmp_path_factory.mktemp("flat") / "flat.pt")


def tiny_config(weights: str) -> str:
    return torchscript_config("flat", weights, "  - {model: flat, batch_size: 8}\n")


def csv_line(*fields) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(fields)
    return buf.getvalue().encode()


# id -> what must happen: CLASSIFIED, or (category, reason regex)
AWKWARD = {
    "good": CLASSIFIED,
    "no-label": CLASSIFIED,
    "integral-float-label": CLASSIFIED,  # 2.0 is class 2 (pandas writes int columns with gaps as floats)
    "after-quote-1": CLASSIFIED,
    "after-quote-2": CLASSIFIED,
    "trailing-space": CLASSIFIED,  # "space.jpg " exists: the space is part of the name
    "without-the-space": ("not_found", r"^file not found$"),
    "beyond-int32": CLASSIFIED,  # a label that is no class index: unlabelled, the reason in label_error
    "out-of-range": CLASSIFIED,
    "negative": CLASSIFIED,
    "fractional": CLASSIFIED,
    "boolean": CLASSIFIED,
    "fifo": ("not_a_regular_file", r"^not a regular file: a FIFO \(named pipe\)$"),
    "folder": ("not_a_regular_file", r"^not a regular file: a folder$"),
    "http-ok": CLASSIFIED,
    "http-500": ("http_error", r"^HTTP error 500 Internal Server Error$"),
    "http-short": ("http_error", r"^HTTP error: the body ended early \(ClientPayloadError"),
    "http-403": ("permission_denied", r"^permission denied \(HTTP 403 Forbidden\)$"),
    "http-404": ("not_found", r"^file not found \(HTTP 404 Not Found\)$"),
    "http-refused": ("http_error", r"^connection failed: ClientConnectorError: Cannot connect to host"),
    "http-stall": ("timeout", rf"^timeout: reading took longer than {READ_TIMEOUT_S} s \(decode\.read_timeout_s\)$"),
}
# id -> the label_error of its prediction (None: no problem; -1 is the usual "unlabelled" marker)
LABEL_ERRORS = {
    "good": None, "no-label": None, "integral-float-label": None, "negative": None,
    "beyond-int32": r"^3000000000 is outside the model's classes 0\.\.9$",
    "out-of-range": r"^10 is outside the model's classes 0\.\.9$",
    "fractional": r"^2\.7 is not an integer$",
    "boolean": r"^'true' is not an integer$",
}
# rows without a usable id: their dead letters are keyed by manifest#line
BROKEN_LINES = {
    "unbalanced quote": r"^bad manifest row: line \d+: malformed CSV: a quoted field that opens on this line does "
                        r"not close properly \(not UTF-8 text",
    "not UTF-8 after 120 KB": r"^bad manifest row: line \d+: not UTF-8 text \(byte 0xff at byte 4\)$",
    "longer than the csv field limit": r"^bad manifest row: line \d+: malformed CSV \(field larger than field limit "
                                       r"\(131072\)\)$",
    "more fields than the header": r"^bad manifest row: line \d+: 4 fields but the header has 3",
}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory, sample_subset, server, flat_model):
    """One run of a manifest holding every awkward row of issue 13 (bad labels, broken lines deep in the file,
    a FIFO, a folder, HTTP failures, a trailing space) among good images, with the 0-GMACs model."""
    tmp = tmp_path_factory.mktemp("awkward")
    http_ok, http_closed = server
    shutil.copy(sample_subset[0]["uri"], tmp / "good.jpg")
    shutil.copy(sample_subset[1]["uri"], tmp / "space.jpg ")
    os.mkfifo(tmp / "pipe.jpg")
    (tmp / "folder.jpg").mkdir()
    uris = {"good": "good.jpg", "no-label": "good.jpg", "integral-float-label": "good.jpg",
            "after-quote-1": "good.jpg", "after-quote-2": "good.jpg", "trailing-space": "space.jpg ",
            "without-the-space": "space.jpg", "beyond-int32": "good.jpg", "out-of-range": "good.jpg",
            "negative": "good.jpg", "fractional": "good.jpg", "boolean": "good.jpg", "fifo": "pipe.jpg",
            "folder": "folder.jpg", "http-ok": f"{http_ok}/ok.jpg", "http-500": f"{http_ok}/head-ok-get-500.jpg",
            "http-short": f"{http_ok}/short.jpg", "http-403": f"{http_ok}/forbidden.jpg",
            "http-404": f"{http_ok}/missing.jpg", "http-refused": f"{http_closed}/a.jpg",
            "http-stall": f"{http_ok}/stall.jpg"}
    labels = {"good": "3", "integral-float-label": "2.0", "beyond-int32": "3000000000", "out-of-range": "10",
              "negative": "-1", "fractional": "2.7", "boolean": "true"}
    lines = [csv_line("id", "uri", "label")]
    for rid in ("good", "no-label", "integral-float-label", "beyond-int32"):
        lines.append(csv_line(rid, uris[rid], labels.get(rid, "")))
    lines.append(b'"unbalanced.jpg,0\n')
    lines += [csv_line(rid, uris[rid], "") for rid in ("after-quote-1", "after-quote-2")]
    lines.append(b"\n")  # an empty line is not a row
    lines += [csv_line(f"pad{i}-" + "x" * 2000, "missing.jpg", "") for i in range(60)]  # ~120 KB of rows
    lines.append(b"id,\xff.jpg,1\n")
    lines.append(b"id,long.jpg," + b"9" * 140_000 + b"\n")
    lines.append(b"a,b.jpg,1,extra\n")
    lines += [csv_line(rid, uris[rid], labels.get(rid, "")) for rid in AWKWARD if rid not in
              {"good", "no-label", "integral-float-label", "beyond-int32", "after-quote-1", "after-quote-2"}]
    (tmp / "awkward.csv").write_bytes(b"".join(lines).replace(b"\n", b"\r\n", 3))  # some CRLF lines too
    physical = [line for line in (tmp / "awkward.csv").read_bytes().split(b"\n")[1:] if line.strip(b"\r")]
    started = time.time()
    manifest = run(tmp, tmp / "out", str(tmp / "awkward.csv"), f"decode.read_timeout_s={READ_TIMEOUT_S}",
                   config=tiny_config(flat_model))
    return {"tmp": tmp, "manifest": manifest, "physical_rows": len(physical), "seconds": time.time() - started}


def test_awkward_rows_end_as_one_prediction_or_one_dead_letter_each(awkward):
    out, manifest = awkward["tmp"] / "out", awkward["manifest"]
    predictions = rows_by(out, "predictions", "id")
    dead = RunFolder(str(out)).read("dead_letter").to_pylist()
    assert manifest["invariant_holds"]
    assert manifest["counts"]["inputs_listed"] == len(predictions) + len(dead) == awkward["physical_rows"]
    by_id = {d["id"]: d for d in dead}
    for rid, expected in AWKWARD.items():
        if expected == CLASSIFIED:
            assert rid in predictions, (rid, by_id.get(rid))
            continue
        category, reason = expected
        assert re.search(reason, by_id[rid]["error"]), (rid, by_id[rid]["error"])
        assert DeadLetter(rid, by_id[rid]["uri"], 0, by_id[rid]["error"]).category == category, rid
    assert predictions["integral-float-label"]["label"] == 2 and predictions["no-label"]["label"] is None
    for rid, label_error in LABEL_ERRORS.items():
        row = predictions[rid]
        assert (row["label_error"] is None) == (label_error is None), (rid, row["label_error"])
        assert label_error is None or (re.search(label_error, row["label_error"]) and row["label"] is None), rid
    stats = RunFolder(str(out)).read("exit_stats").to_pylist()
    assert sum(s["label_errors"] for s in stats) == sum(e is not None for e in LABEL_ERRORS.values())
    assert predictions["trailing-space"]["uri"].endswith("space.jpg ")
    broken = [d["error"] for d in dead if d["id"].startswith(str(awkward["tmp"] / "awkward.csv#"))]
    for what, reason in BROKEN_LINES.items():
        assert sum(bool(re.search(reason, e)) for e in broken) == 1, (what, broken)
    assert awkward["seconds"] < 120  # the stalled server and the FIFO hold nothing


def test_a_model_of_zero_counted_gmacs_completes_with_its_manifest(awkward):
    assert awkward["manifest"]["stages"][0]["gmacs"] == 0
    assert (awkward["tmp"] / "out" / folder.MANIFEST).exists()
    assert not (awkward["tmp"] / "out" / folder.RUNNING).exists()  # the lock is released


@pytest.mark.parametrize("column, values, reasons", [
    (pa.array([float("inf"), float("nan"), 2.5, 3.0]), [None, None, None, 3],
     [r"inf is not an integer", None, r"2\.5 is not an integer", None]),
    (pa.array([[1], [2, 3]]), [None, None], [r"a list \(\[1\]\) is not a class index", r"a list \(\[2, 3\]\)"]),
    (pa.array([{"a": 1}, {"a": 2}]), [None, None], [r"a dict \(\{'a': 1\}\) is not a class index", r"a dict"]),
    (pa.array([True, False]), [None, None], [r"True is a boolean, not a class index", r"False is a boolean"]),
    (pa.array([2**40, 7], pa.int64()), [None, 7], [r"1099511627776 is outside the model's classes", None]),
], ids=["floats", "lists", "structs", "booleans", "int64"])
def test_parquet_labels_of_any_type_are_checked_row_by_row_and_never_cost_the_row(tmp_path, column, values, reasons):
    ids = [f"r{i}" for i in range(len(column))]
    pq.write_table(pa.table({"id": ids, "uri": [f"{i}.jpg" for i in ids], "label": column}), tmp_path / "m.parquet",
                   row_group_size=1)
    out = [e for _, e in manifest_entries(str(tmp_path / "m.parquet"), 10)]
    for entry, value, reason in zip(out, values, reasons):
        assert isinstance(entry, Record) and entry.label == value, entry  # a label never costs the row
        assert entry.id == entry.uri.rsplit("/", 1)[-1].removesuffix(".jpg")  # the manifest's own id
        assert (entry.label_error is None) == (reason is None), entry
        assert reason is None or re.search(rf"^{reason}", entry.label_error), entry.label_error


def test_a_corrupt_parquet_row_group_is_one_dead_letter_per_row(tmp_path):
    pq.write_table(pa.table({"uri": [f"{i}.jpg" for i in range(6)]}), tmp_path / "m.parquet", row_group_size=3,
                   compression="NONE")
    data = bytearray((tmp_path / "m.parquet").read_bytes())
    first = pq.ParquetFile(tmp_path / "m.parquet").metadata.row_group(1).column(0).data_page_offset
    data[first:first + 12] = b"\xff" * 12  # the second row group's page header
    (tmp_path / "m.parquet").write_bytes(bytes(data))
    out = [e for _, e in manifest_entries(str(tmp_path / "m.parquet"))]
    assert [type(e).__name__ for e in out] == ["Record"] * 3 + ["DeadLetter"] * 3
    assert all(re.match(r"^bad manifest row: row [456]: its row group 1 could not be read", e.error) for e in out[3:])


def test_reading_any_input_fails_only_that_input(tmp_path, server):
    """Exceptions that are not OSError (aiohttp's) and inputs that would block are that input's dead letter."""
    http_ok, http_closed = server
    os.mkfifo(tmp_path / "fifo")
    reader = ReadBytes(1000, timeout_s=READ_TIMEOUT_S)
    for uri, reason in [(f"{http_ok}/head-ok-get-500.jpg", "HTTP error 500"), (str(tmp_path / "fifo"),
                        "not a regular file: a FIFO"), (f"{http_closed}/x.jpg", "connection failed"),
                        ("s3://bucket/a.jpg", "could not read: ImportError: Install s3fs to access S3")]:
        (out,) = read_bytes(reader, [Record(id="a", uri=uri)])
        assert out.value.error.startswith(reason), out.value


def read_bytes(reader: ReadBytes, records: list[Record]) -> list:
    """A bundle of ``records`` through ``reader`` as a runner drives it: what it emits, while and after."""
    reader.start_bundle()
    out = [o for record in records for o in reader.process(record)]
    for o in reader.finish_bundle():
        out.append(beam.pvalue.TaggedOutput(o.tag, o.value.value) if isinstance(o, beam.pvalue.TaggedOutput)
                   else o.value)
    return out


def test_the_read_timeout_holds_neither_the_job_nor_the_process():
    started = time.time()
    with pytest.raises(TimeoutError, match=r"^timeout: reading took longer than 0\.2 s"):
        with_timeout(lambda: time.sleep(30), 0.2, "x")
    assert time.time() - started < 5


@pytest.mark.parametrize("argv, named", [
    (["--ouput", "elsewhere"], "--ouput: unknown flag (did you mean --output?)"),
    (["stages.0.threshold:0.5"], "stages.0.threshold:0.5: neither a flag nor a key=value override"),
    (["--runer=DirectRunner"], "--runer=DirectRunner: unknown flag (did you mean --runner?)"),
    (["threshold"], "threshold: neither a flag nor a key=value override"),
], ids=["flag-typo", "override-without-equals", "beam-flag-typo", "stray-word"])
def test_typos_on_the_command_line_are_refused_before_any_work(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        cascade.parse(["--input", "x.csv", *argv])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_beam_flags_and_overrides_still_split():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    args, overrides, beam_args = common.split_argv(parser, [
        "--output", "o", "--runner=FnApiRunner", "--project", "p", "stages.0.threshold=0.5", "--direct_num_workers",
        "2", "--experiments=a=b", "stages.2={model: lite2, resolution: 300}"])
    assert args.output == "o"
    assert overrides == ["stages.0.threshold=0.5", "stages.2={model: lite2, resolution: 300}"]
    assert beam_args == ["--runner=FnApiRunner", "--project", "p", "--direct_num_workers", "2", "--experiments=a=b"]


@pytest.mark.parametrize("text, message", [
    ("stages: [ {model: lite0\n", r"^invalid config: config: .*c\.yaml is not valid YAML: while parsing .* line 2"),
    ("stages: []\nstages: []\n", r"^invalid config: config: .*c\.yaml is not valid YAML: .*found duplicate key stages"),
    ("- {model: lite0}\n", r"^invalid config: config: .*c\.yaml must hold a mapping .* not a list$"),
], ids=["syntax-error", "duplicate-key", "top-level-list"])
def test_yaml_mistakes_are_invalid_config_lines(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(SystemExit, match=message):
        cascade.parse(["--config", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("device, ok", [("cuda:abc", False), ("cuda:-1", False), ("gpu", False), ("cuda:1", True),
                                        ("cpu", True)])
def test_device_is_validated_when_the_config_loads(device, ok):
    if ok:
        assert schema.load("lite_cascade", [f"device={device}"]).device == device
    else:
        with pytest.raises(schema.ConfigError, match=rf"^device: '{re.escape(device)}' is not one of auto, cpu"):
            schema.load("lite_cascade", [f"device={device}"])


def earlier_run(out: Path) -> dict:
    run_id = "20261128T101500Z-3fa2c1"
    files = {out / folder.MANIFEST: b'{"run_id": "%s"}' % run_id.encode(),
             out / folder.RUNS / f"{run_id}.json": b'{"run_id": "%s"}' % run_id.encode(),
             out / "predictions" / f"{run_id}-00000-of-00001.parquet": b"x"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.parametrize("weights", ["missing.pt", "ten.pt"], ids=["missing-weights", "wrong-shapes"])
def test_a_failed_overwrite_never_loses_the_earlier_run(tmp_path, sample_subset, weights):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    files = earlier_run(tmp_path / "out")
    config = (f"models:\n  mine: {{arch: 'torchvision:resnet18', weights: '{tmp_path / weights}', num_classes: 1000,"
              " resolution: 32}\nstages:\n  - {model: mine}\n")
    with pytest.raises(SystemExit, match=r"^invalid config: stages\.0\.model: "):
        run(tmp_path, tmp_path / "out", sample_subset[0]["uri"], "--overwrite", config=config)
    assert {path: path.read_bytes() for path in files} == files
    assert sorted(os.listdir(tmp_path / "out")) == [folder.MANIFEST, "predictions", folder.RUNS]


FULL_DISK = """
import resource, signal, sys
from pipelines import folder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    folder.write_json(sys.argv[1], "manifest.json", {"counts": "x" * 5000})
except OSError as err:
    print("OSError", err.errno)
"""


def test_a_full_disk_while_writing_the_manifest_leaves_the_old_or_none(tmp_path):
    (tmp_path / folder.MANIFEST).write_text('{"earlier": true}')
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.decode().startswith("OSError 27"), done.stderr.decode()[-2000:]  # EFBIG
    assert os.listdir(tmp_path) == [folder.MANIFEST]  # no temporary file left behind
    assert (tmp_path / folder.MANIFEST).read_text() == '{"earlier": true}'  # never a truncated manifest


def test_an_output_path_with_glob_characters_is_refused_before_any_work(tmp_path, sample_subset):
    with pytest.raises(SystemExit, match=r"^output: '.*run\[1\]' contains \[, glob characters that Beam's file "
                                         r"sinks cannot finalize"):
        run(tmp_path, tmp_path / "run[1]", sample_subset[0]["uri"])
    assert not (tmp_path / "run[1]").exists()


def test_a_run_into_a_folder_another_run_holds_is_refused(tmp_path, sample_subset, flat_model):
    holder = folder.new_run_id()
    with RunFolder(str(tmp_path / "out")).hold(holder):  # a run in progress (this live process)
        with pytest.raises(SystemExit, match=r"^output folder .*out is locked by another run \(run_id " + holder):
            run(tmp_path, tmp_path / "out", sample_subset[0]["uri"], config=tiny_config(flat_model))
        assert os.listdir(tmp_path / "out") == [folder.RUNNING]
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("source, message", [
    ("empty/*.jpg", r"the glob matches no file$"),
    ("empty", r"empty is a folder; give a glob of its files \(e\.g\. '.*empty/\*\.jpg'"),
    ("absent.jpg", r"absent\.jpg: no such file$"),
    ("absent.csv", r"absent\.csv: no such file$"),
    ("fifo.csv", r"fifo\.csv: not a regular file$"),
    ("utf16.csv", r"utf16\.csv: header \(line 1\): not UTF-8 text"),
], ids=["glob-matching-nothing", "folder", "missing-file", "missing-manifest", "fifo-manifest", "utf16-manifest"])
def test_an_input_that_cannot_list_anything_is_refused_before_any_work(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "utf16.csv").write_bytes("uri\na.jpg\n".encode("utf-16"))
    with pytest.raises(SystemExit, match=r"^invalid input: .*" + message):
        run(tmp_path, tmp_path / "out", str(tmp_path / source))
    assert not (tmp_path / "out").exists()


def test_a_manifest_without_rows_fails_the_run_without_a_manifest(tmp_path, flat_model):
    (tmp_path / "m.csv").write_text("uri,label\n\n")
    with pytest.raises(SystemExit, match=r"^no inputs: .*m\.csv listed nothing"):
        run(tmp_path, tmp_path / "out", str(tmp_path / "m.csv"), config=tiny_config(flat_model))
    assert not (tmp_path / "out" / folder.MANIFEST).exists() and not (tmp_path / "out" / folder.RUNNING).exists()


def test_a_file_name_that_is_not_utf8_is_classified_under_an_escaped_uri_and_id(tmp_path, sample_subset, flat_model):
    (tmp_path / "img").mkdir()
    shutil.copy(sample_subset[0]["uri"], tmp_path / "img" / "ok.jpg")
    shutil.copy(sample_subset[1]["uri"], os.path.join(os.fsencode(tmp_path), b"img", b"caf\xe9.jpg"))
    with open(os.path.join(os.fsencode(tmp_path), b"img", b"not an image \xff.jpg"), "wb") as fh:
        fh.write(b"text")
    manifest = run(tmp_path, tmp_path / "out", str(tmp_path / "img" / "*.jpg"), config=tiny_config(flat_model))
    assert manifest["invariant_holds"] and manifest["counts"]["predictions"] == 2
    rows = RunFolder(str(tmp_path / "out")).read("predictions").to_pylist()
    assert sorted((r["id"], r["uri"]) for r in rows) == [(f"{tmp_path}/img/caf\\xe9.jpg",) * 2,
                                                          (f"{tmp_path}/img/ok.jpg",) * 2]
    (dead,) = RunFolder(str(tmp_path / "out")).read("dead_letter").to_pylist()
    assert dead["uri"] == dead["id"] == f"{tmp_path}/img/not an image \\xff.jpg" and dead["stage"] == 1


def test_skip_done_skips_every_row_an_earlier_run_has_whatever_its_verdict(tmp_path, sample_subset, flat_model):
    """Day 1 lists a bad label, a duplicate id, a broken line, a missing file and a file name spelt two ways;
    day 2 runs the same manifest, reached by another spelling of its path, with --skip_done: every row is
    skipped (the ids, uri-derived ones included, are the same), nothing is written twice."""
    shutil.copy(sample_subset[0]["uri"], tmp_path / "a.jpg")
    (tmp_path / "d").mkdir()
    (tmp_path / "m.csv").write_text('id,uri,label\n1,a.jpg,-1\n2,a.jpg,99\n2,a.jpg,1\n"broken,a.jpg\n'
                                    '3,missing.jpg,1\n,a.jpg,1\n,./d/../a.jpg,2\n', newline="")
    first = run(tmp_path, tmp_path / "out", str(tmp_path / "m.csv"), config=tiny_config(flat_model))
    assert first["counts"]["predictions"] == 3 and first["counts"]["dead_letters"] == 4
    categories = sorted(RunFolder(str(tmp_path / "out")).read("dead_letter").column("category").to_pylist())
    assert categories == ["bad_manifest_row", "duplicate_id", "duplicate_id", "not_found"]
    second = run(tmp_path, tmp_path / "out", str(tmp_path / "d" / ".." / "m.csv"), "--skip_done",
                 config=tiny_config(flat_model))
    assert second["counts"]["inputs_skipped"] == second["counts"]["inputs_listed"] == 7 and second["invariant_holds"]
    assert second["counts"]["predictions"] == second["counts"]["dead_letters"] == 0


def test_pkg_weights_never_import_the_module_a_config_names(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_weights_mod.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for url in ("pkg:sneaky_weights_mod/w.pt", "pkg:torch/../../etc/passwd", "pkg:os.path/x"):
        with pytest.raises(ValueError, match=r"^weights 'pkg:"):
            registry.resolve_weights(url)
    assert not marker.exists()
    assert Path(registry.resolve_weights(registry.get("lite0").weights)).is_file()  # packaged weights still load
    # a module whose distribution has another name (PIL, shipped by pillow) is found by the full scan
    assert Path(registry.resolve_weights("pkg:PIL/__init__.py")).samefile(Path(PIL.__file__))


def test_torch_floor_excludes_the_weights_only_bypass():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps  # CVE-2025-32434: torch.load(weights_only=True) bypass in torch <= 2.5.1


# ---- fuzzing ReadInputs: generated manifests and files, the invariant on every one -------------------------

CSV_CASES, PARQUET_CASES, PIPELINE_CASES = 1200, 400, 6
FUZZ_MAX_BYTES = 1000
FUZZ_NAMES = ["good.jpg", "junk.bin", "empty.jpg", "fifo", "folder", "loop", "big.bin", "missing.jpg", " good.jpg",
              "good.jpg ", "café.jpg", "", "   ", "/abs/missing.jpg", "nosuch://x", "nul\x00.jpg", "../good.jpg",
              "file:///nonexistent/a.jpg", "a,b.jpg", 'quo"te.jpg', "line\nbreak.jpg"]
LABEL_TEXT = ["1", "2.0", "2.7", "true", " 3 ", "1e3", "nan", "inf", "-0", "9", "10", "3000000000", "", "0x1", "١"]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """The files generated manifests point at: good, junk, empty, oversized, a FIFO, a folder, a symlink loop."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "good.jpg").write_bytes(encode(Image.new("RGB", (8, 8), "red"), "JPEG"))
    (d / "junk.bin").write_bytes(np.random.default_rng(0).bytes(500))
    (d / "empty.jpg").write_bytes(b"")
    (d / "big.bin").write_bytes(b"\0" * (FUZZ_MAX_BYTES + 1))
    os.mkfifo(d / "fifo")
    (d / "folder").mkdir()
    os.symlink(d / "loop", d / "loop")
    return d


def physical_rows(source: str) -> int:
    """Rows of a manifest: a Parquet file's from its footer; a CSV's counted by Python's csv module where it
    reads the file (records after the header), else by the rule that every non-empty physical line is part
    of exactly one record or dead letter (``tests.test_manifests`` checks both)."""
    if source.endswith(".parquet"):
        return pq.ParquetFile(source).metadata.num_rows
    try:
        with open(source, newline="", encoding="utf-8-sig") as fh:
            return max(sum(1 for fields in csv.reader(fh, strict=True) if fields) - 1, 0)
    except (csv.Error, UnicodeDecodeError):
        return manifests.count_inputs(source)[0]


def read_inputs_in_process(source: str) -> tuple[int, list[DeadLetter], list[Record]]:
    """ReadInputs' three steps applied in order without a runner (the shuffle by id is a dict):
    (inputs listed, dead letters, records read)."""
    listed = list(ExpandSource(num_classes=10).process(source))
    dead = [e.value for e in listed if isinstance(e, beam.pvalue.TaggedOutput)]
    packer, groups = PackById(), collections.defaultdict(list)
    packer.start_bundle()
    packed = [out for e in listed if not isinstance(e, beam.pvalue.TaggedOutput) for out in packer.process(e)]
    for bucket, inputs in packed + [w.value for w in packer.finish_bundle()]:
        groups[bucket].append(inputs)
    kept = []
    for out in (o for group in groups.items() for o in FirstOfId().process(group)):
        (dead.append(out.value) if isinstance(out, beam.pvalue.TaggedOutput) else kept.append(out))
    records = []
    for out in read_bytes(ReadBytes(FUZZ_MAX_BYTES, timeout_s=5), kept):
        (dead.append(out.value) if isinstance(out, beam.pvalue.TaggedOutput) else records.append(out))
    assert len(records) + len(dead) == len(listed)  # exactly one outcome per input
    return len(listed), dead, records


def check_invariant_on(source: str) -> str:
    """Refused before any work (a ValueError from check_source), or every row is one record or one dead
    letter with a reason of a known category; labels that pass are class indices. Returns the outcome."""
    try:
        check_source(source)
    except ValueError as err:
        assert source in str(err), err
        return "refused"
    listed, dead, records = read_inputs_in_process(source)
    assert listed == physical_rows(source) == len(dead) + len(records)
    for letter in dead:
        assert letter.stage == 0 and letter.error and letter.category in CATEGORIES, letter
        if letter.category == "bad_manifest_row":
            assert re.match(r"^bad manifest row: (lines? \d+(-\d+)?|row \d+): ", letter.error), letter
    for record in records:
        assert record.label is None or (type(record.label) is int and 0 <= record.label < 10), record
        assert record.label_error is None or record.label is None, record
        assert len(record.data) <= FUZZ_MAX_BYTES  # an empty file is read; decoding dead-letters it
    return "listed"


def csv_cell(column: str):
    if column in ("uri", "path"):
        return st.one_of(st.sampled_from(FUZZ_NAMES), st.text(max_size=20))
    if column in ("label", "class_index"):
        return st.one_of(st.sampled_from(LABEL_TEXT), st.integers(-5, 2**40).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=6))
    return st.one_of(st.sampled_from(["a", "a", "b", "", "1", "1.0"]), st.text(max_size=12))


@st.composite
def csv_manifests(draw) -> bytes:
    """Headers with and without the columns; rows written by csv.writer in any quoting, or raw bytes (broken
    quotes, other encodings, NULs, lines over the csv limit), joined by LF, CRLF or CR, in several encodings."""
    header = draw(st.sampled_from([["uri"], ["id", "uri", "label"], ["path", "class_index"], ["URI", "Label", "id",
                                                                                               "extra"], ["file"]]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    lines = []
    for kind in draw(st.lists(st.sampled_from(["row", "row", "row", "short", "bytes", "long", "empty"]), max_size=12)):
        if kind in ("row", "short"):
            cells = [draw(csv_cell(c.lower())) for c in header][: None if kind == "row" else draw(st.integers(0, 3))]
            buf = io.StringIO()
            try:
                csv.writer(buf, quoting=quoting, escapechar="\\", lineterminator="").writerow(cells)
            except csv.Error:  # QUOTE_NONE cannot write a lone empty field: write it unquoted anyway
                buf.write(",".join(cells))
            lines.append(buf.getvalue().encode(encoding, errors="replace").removeprefix(b"\xef\xbb\xbf"))
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=60)))
        elif kind == "long":
            limit = csv.field_size_limit()
            lines.append(b"good.jpg," + b"7" * draw(st.integers(limit - 12, limit + 3)))
        else:
            lines.append(b"")
    head = ",".join(header).encode(encoding)
    end = newline.encode(encoding).removeprefix(b"\xff\xfe").removeprefix(b"\xef\xbb\xbf")
    return end.join([head, *lines]) + (end if draw(st.booleans()) else b"")


def arrow_column(draw, kind: str, n: int):
    values = {
        "string": st.sampled_from(FUZZ_NAMES + LABEL_TEXT), "int64": st.integers(-2**63, 2**63 - 1),
        "small": st.integers(-3, 12), "float64": st.floats(allow_nan=True, allow_infinity=True),
        "bool": st.booleans(), "binary": st.binary(max_size=8), "list": st.lists(st.integers(0, 9), max_size=3),
        "struct": st.fixed_dictionaries({"a": st.integers(0, 9)}), "null": st.none(),
    }[kind]
    cells = draw(st.lists(st.one_of(st.none(), values), min_size=n, max_size=n))
    types = {"string": pa.string(), "int64": pa.int64(), "small": pa.int64(), "float64": pa.float64(),
             "bool": pa.bool_(), "binary": pa.binary(), "list": pa.list_(pa.int64()),
             "struct": pa.struct([("a", pa.int64())]), "null": pa.null()}
    return pa.array(cells, type=types[kind])


@st.composite
def parquet_manifests(draw) -> pa.Table:
    n = draw(st.integers(0, 8))
    kinds = ["string", "int64", "small", "float64", "bool", "binary", "list", "struct", "null"]
    columns = {"uri": arrow_column(draw, draw(st.sampled_from(["string"] * 4 + kinds)), n)}
    for name in draw(st.lists(st.sampled_from(["label", "id", "class_index", "other"]), unique=True, max_size=3)):
        columns[name] = arrow_column(draw, draw(st.sampled_from(kinds)), n)
    if draw(st.booleans()) and n:
        columns = {("path" if k == "uri" else k): v for k, v in columns.items()}
    return pa.table(columns)


def fuzz(cases: int) -> settings:
    """Deterministic (the same cases on every run, so CI is reproducible), no example database on disk."""
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_fuzzed_csv_manifests_keep_the_invariant(fuzz_dir):
    outcomes = collections.Counter()

    @fuzz(CSV_CASES)
    @given(data=csv_manifests())
    def check(data):
        (fuzz_dir / "m.csv").write_bytes(data)
        outcomes[check_invariant_on(str(fuzz_dir / "m.csv"))] += 1

    check()
    print(f"fuzzed CSV manifests: {dict(outcomes)}")
    assert sum(outcomes.values()) >= CSV_CASES and outcomes["listed"] > CSV_CASES // 2


def test_fuzzed_parquet_manifests_and_files_keep_the_invariant(fuzz_dir):
    outcomes = collections.Counter()

    @fuzz(PARQUET_CASES)
    @given(table=parquet_manifests(), group=st.integers(1, 4), garbage=st.one_of(st.none(), st.binary(max_size=300)))
    def check(table, group, garbage):
        path = fuzz_dir / "m.parquet"
        if garbage is None:
            pq.write_table(table, path, row_group_size=group)
        else:  # not Parquet at all, or a Parquet file cut short
            path.write_bytes(garbage if len(garbage) % 2 else b"PAR1" + garbage)
        outcomes[check_invariant_on(str(path))] += 1

    check()
    print(f"fuzzed Parquet manifests: {dict(outcomes)}")
    assert sum(outcomes.values()) >= PARQUET_CASES and outcomes["listed"] > PARQUET_CASES // 3


def test_fuzzed_manifests_through_read_inputs_in_a_real_pipeline(fuzz_dir, tmp_path):
    """The same generator through the real ``ReadInputs`` (one Beam pipeline of several manifests): each
    manifest's records and dead letters add up to its physical rows."""
    sources = []

    @fuzz(PIPELINE_CASES * 20)
    @given(data=csv_manifests())
    def collect(data):
        path = fuzz_dir / f"p{len(sources)}.csv"
        path.write_bytes(data)
        try:
            check_source(str(path))
        except ValueError:
            return
        if len(sources) < PIPELINE_CASES and physical_rows(str(path)):
            sources.append(str(path))

    collect()
    assert len(sources) == PIPELINE_CASES
    with beam.Pipeline(runner="FnApiRunner") as p:
        for i, source in enumerate(sources):
            read = p | f"Read{i}" >> ReadInputs(source, FUZZ_MAX_BYTES, num_classes=10, timeout_s=5)
            counted = ((read["records"], read[DEAD]) | f"All{i}" >> beam.Flatten()
                       | f"Count{i}" >> beam.combiners.Count.Globally())
            assert_that(counted, equal_to([physical_rows(source)]), label=f"Invariant{i}")


def test_a_record_that_cannot_be_routed_is_its_own_dead_letter():
    """The routing boundary: logits that do not fit the record's running committee (3 scores added to a
    sum of 10) fail that record only."""
    from apache_beam.ml.inference.base import PredictionResult

    from configs.plan import RunSettings, StagePlan
    from models.inference import Precision
    from transforms.stage import Route

    spec = registry.ModelSpec("tiny", registry.TORCHSCRIPT, "x.pt", registry.InputConfig(32), num_classes=10)
    route = Route(StagePlan(2, spec, 0.5, 0.0, 8, Precision.FP32, True, False, RunSettings()))
    record = Record(id="r", uri="u", score_sum=np.zeros(10), stages_run=1)
    (out,) = route.process((record, PredictionResult(None, np.zeros(3, np.float32))))
    assert out.tag == DEAD and out.value.stage == 2 and out.value.category == "model_error"
    assert out.value.error.startswith("model tiny@32 output could not be routed: ValueError: operands could not")
