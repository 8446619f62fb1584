"""The CPU fast path: libjpeg-turbo decoding gives Pillow's very pixels (or steps aside), and the ONNX Runtime
backend is exported once into the user's cache, checked against torch, and refused (torch runs) on mismatch."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from configs import schema
from models import inference, onnxrt, registry
from models.classifier import Classifier
from models.preprocess import decode, decode_jpeg_fast, draft_scale
from tests.conftest import sample_rows

pytestmark = pytest.mark.skipif(not onnxrt.available(), reason="onnxruntime/onnx not installed")


def jpeg(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def test_fast_decode_gives_pillows_pixels_on_the_sample(sample_dir):
    for row in sample_rows()[::40]:
        data = (sample_dir / row["path"]).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            assert decode_jpeg_fast(data, im, 297) is not None  # the fast decoder did take it
        for target in (297, 100, None):
            fast, pil = decode(data, target=target), decode(data, target=target, fast=False)
            assert fast.size == pil.size and np.array_equal(np.asarray(fast), np.asarray(pil)), (row["path"], target)


@pytest.mark.parametrize("size", [(640, 480), (595, 300), (597, 300), (1200, 2500), (299, 299)])
def test_draft_scale_is_pillows(size):
    data = jpeg(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (297, 297))
        want = im.size
    scale = draft_scale(*size, 297)
    assert (-(-size[0] // scale), -(-size[1] // scale)) == want
    assert decode(data, target=297).size == want


def test_what_the_fast_decoder_does_not_take_pillow_decodes():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow applies the orientation
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, "JPEG")
    truncated = jpeg(pixels)[:-200]
    for data in (jpeg(pixels, exif=exif), cmyk.getvalue(), truncated):
        with Image.open(io.BytesIO(data)) as im:
            assert decode_jpeg_fast(data, im, None) is None
    assert decode(jpeg(pixels, exif=exif)).size == (60, 80)  # upright, as before


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cascade-inference" / "onnx"


class Branchy(torch.nn.Module):
    """Data-dependent control flow in Python: tracing keeps the branch of the example (a dark image)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(3, 4)

    def forward(self, x):
        pooled = x.mean((2, 3))
        return self.a(pooled) if float(x.mean()) < -0.9 else self.b(pooled)


def tiny_spec(tmp_path, module) -> registry.ModelSpec:
    weights = tmp_path / "tiny.pt"
    torch.save(module.state_dict(), weights)
    return registry.ModelSpec("tiny", "torchscript", str(weights), registry.InputConfig(resolution=32), num_classes=4)


def test_a_model_that_does_not_match_runs_on_torch_and_the_verdict_is_cached(tmp_path, cache_home):
    torch.manual_seed(0)
    module = Branchy().eval()
    spec = tiny_spec(tmp_path, module)
    session, why = onnxrt.session_for(spec, module, 1)
    assert session is None and ("differ" in why or "change class" in why), why
    assert [p.suffix for p in cache_home.iterdir()] == [".json"]  # no graph kept for a refused model

    def build():
        raise AssertionError("a cached verdict needs no model")

    assert onnxrt.session_for(spec, None, 1, build=build) == (None, why)


def test_onnxruntime_matches_torch_exported_once_into_the_user_cache(tmp_path, cache_home):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    spec = tiny_spec(tmp_path, module)
    session, why = onnxrt.session_for(spec, module, 2)
    assert why is None and session.threads == 2
    assert sorted(p.suffix for p in cache_home.iterdir()) == [".json", ".onnx"]
    assert not any(p.suffix == ".onnx" for p in tmp_path.iterdir())  # never beside the weights
    pixels = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    want = inference.forward(module, spec, list(pixels), channels_last=False)
    np.testing.assert_allclose(session(pixels), want, atol=1e-4)

    def build():
        raise AssertionError("the checked export is reused, not made again")

    again, _ = onnxrt.session_for(spec, None, 1, build=build)
    np.testing.assert_allclose(again(pixels), want, atol=1e-4)
    with open(spec.weights, "ab") as fh:  # other weights: another key
        fh.write(b"\0")
    assert onnxrt.cache_key(spec) != again.key


def test_classifier_keeps_its_dead_letters_on_onnxruntime(cache_home):
    spec = registry.get("lite0", 64)
    classifier = Classifier(spec, device="cpu", threads=1, batch_size=4)
    model = classifier.load()
    assert model.backend is inference.Backend.ONNXRUNTIME
    good = jpeg(np.random.default_rng(3).integers(0, 256, (80, 90, 3), dtype=np.uint8))
    from models.classifier import EncodedImage

    results = classifier.classify(model, [EncodedImage(good), EncodedImage(b"not an image"), EncodedImage(good)])
    assert results[0].shape == (1000,) and np.array_equal(results[0], results[2])
    assert "not an image" in results[1].reason
    torch_model = Classifier(spec, device="cpu", threads=1, batch_size=4, backend=inference.Backend.TORCH).load()
    assert torch_model.backend is inference.Backend.TORCH
    np.testing.assert_allclose(results[0], classifier.classify(torch_model, [EncodedImage(good)])[0], atol=1e-3)


def test_explicit_onnxruntime_where_it_cannot_run_is_refused_naming_the_key():
    with pytest.raises(schema.ConfigError, match=r"stages\.0\.backend: onnxruntime runs on the CPU"):
        schema.load("lite_cascade", ["device=cuda", "stages.0.backend=onnxruntime"])
    with pytest.raises(schema.ConfigError, match=r"^backend: onnxruntime runs in fp32"):
        schema.load("lite_cascade", ["backend=onnxruntime", "stages.1.precision=bf16"])
    assert schema.load("lite_cascade", ["device=cuda", "stages.0.precision=bf16"]).backend == "auto"


def test_auto_is_onnxruntime_on_the_cpu_in_fp32_and_torch_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = inference.Backend.AUTO
    assert inference.resolve_backend(auto, cpu) is inference.Backend.ONNXRUNTIME
    assert inference.resolve_backend(auto, cuda) is inference.Backend.TORCH
    assert inference.resolve_backend(auto, cpu, "bf16") is inference.Backend.TORCH
    assert inference.resolve_backend(auto, cpu, compile=True) is inference.Backend.TORCH
    assert inference.resolve_backend("torch", cpu) is inference.Backend.TORCH
    assert os.cpu_count()
