"""The fast paths of inference: folded batch norms and batched (nvJPEG-style) decoding give the logits of
the plain paths. Batched decoding runs here through torchvision on the CPU, the same code as on CUDA."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import inference, registry
from models.classifier import Classifier, EncodedImage, Failure
from models.preprocess import BadInput, crop_box, gpu_decodable, load_batch, load_image


def jpeg(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample_bytes(sample_subset) -> list[bytes]:
    return [open(r["uri"], "rb").read() for r in sample_subset[:12]]


@pytest.mark.parametrize("name", registry.names())
def test_folded_model_gives_the_logits_of_the_unfolded_one(name, sample_bytes):
    spec = registry.get(name)
    plain = registry.build(spec).eval().to(memory_format=torch.channels_last)
    folded = inference.load(spec, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    crops = [load_image(b, spec.input) for b in sample_bytes]
    want = inference.forward(plain, spec, crops)
    got = inference.forward(folded, spec, crops)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


class Residual(torch.nn.Module):
    """conv -> bn -> relu6 whose input is also read by a skip connection, a shared activation, and a batch
    norm that follows no convolution: what folding and in-place activations must leave correct."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.conv2 = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(3)
        self.act = torch.nn.ReLU6()
        self.bn_alone = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        z = self.act(y) + y  # y is read twice: its activation must not overwrite it
        return self.act(self.bn2(self.conv2(z))) + self.bn_alone(x)


def test_folding_keeps_tensors_that_are_read_twice_and_lone_batch_norms():
    torch.manual_seed(0)
    model = Residual()
    for bn in (model.bn1, model.bn2, model.bn_alone):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        folded = inference.fold_batch_norms(model)
        got = folded(x.clone())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [type(m).__name__ for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)] == ["BatchNorm2d"]
    assert folded.act.inplace is False


def test_models_fx_cannot_trace_are_returned_unchanged():
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).eval())
    assert inference.fold_batch_norms(scripted) is scripted


def test_batch_decode_matches_the_cpu_path(sample_bytes):
    cfg = registry.get("lite0").input
    crops = load_batch(sample_bytes, cfg, torch.device("cpu"))
    for data, crop in zip(sample_bytes, crops):
        want = load_image(data, cfg, draft=False).astype(np.float64)  # nvJPEG has no DCT-domain downscaling
        assert crop.shape == (224, 224, 3) and crop.dtype == torch.uint8
        # the same libjpeg-turbo decode and bicubic filter; the crop box is rounded to whole pixels, a shift
        # of under half a pixel (measured here: 0.6 to 10.6 grey levels on average per image)
        assert np.abs(crop.numpy() - want).mean() < 12
        left, top, side = crop_box(*Image.open(io.BytesIO(data)).size, cfg)
        same_box = Image.open(io.BytesIO(data)).convert("RGB").resize(
            (224, 224), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        assert np.abs(crop.numpy() - np.asarray(same_box, dtype=np.float64)).mean() < 0.1  # only rounding


def test_batch_decode_falls_back_per_record(sample_bytes):
    cfg = registry.get("lite0").input
    gray = jpeg(Image.open(io.BytesIO(sample_bytes[0])).convert("L"))
    truncated = sample_bytes[1][: len(sample_bytes[1]) // 2]
    crops = load_batch([sample_bytes[0], truncated, gray, b"not a jpeg"], cfg, torch.device("cpu"))
    assert crops[0].shape == crops[2].shape == (224, 224, 3)
    assert isinstance(crops[1], BadInput) and "truncated" in str(crops[1])
    assert isinstance(crops[3], BadInput) and "identify" in str(crops[3])


def test_gpu_decodable_takes_only_upright_rgb_or_gray_jpegs_within_the_pixel_limit():
    im = Image.new("RGB", (64, 48), (200, 30, 30))
    png = io.BytesIO()
    im.save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    assert gpu_decodable(jpeg(im), 64 * 48)
    assert gpu_decodable(jpeg(im.convert("L")), 64 * 48)
    assert not gpu_decodable(jpeg(im), 64 * 48 - 1)
    assert not gpu_decodable(jpeg(im.convert("CMYK")), 10**6)
    assert not gpu_decodable(jpeg(im, exif=exif), 10**6)
    assert not gpu_decodable(png.getvalue(), 10**6)
    assert not gpu_decodable(b"", 10**6)


def test_handler_decodes_the_batch_in_threads_and_fails_only_the_bad_record(sample_bytes):
    spec = registry.get("lite0")
    classifier = Classifier(spec, device="cpu")
    model = classifier.load()
    batch = [EncodedImage(b) for b in sample_bytes[:6]]
    batch.insert(3, EncodedImage(sample_bytes[6][:500]))
    results = classifier.classify(model, batch)
    assert [isinstance(r, Failure) for r in results] == [i == 3 for i in range(7)]
    assert results[3].reason == "image could not be decoded: OSError: Truncated File Read"
    want = model(np.stack([load_image(b, spec.input) for b in sample_bytes[:6]]))
    got = np.stack([r for i, r in enumerate(results) if i != 3])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_loaded_model_decodes_encoded_images_on_its_device(sample_bytes):
    """What a CUDA worker does with the JPEGs the handler leaves encoded, run here on the CPU device."""
    spec = registry.get("lite0")
    model = Classifier(spec, device="cpu").load()
    crops = [load_image(b, spec.input, draft=False) for b in sample_bytes[:6]]
    mixed = [EncodedImage(b) if i % 2 else crop for i, (b, crop) in enumerate(zip(sample_bytes, crops))]
    want = model(np.stack(crops))
    got = model(mixed)
    np.testing.assert_allclose(got[::2], want[::2], atol=1e-4, rtol=1e-4)  # the crops given as pixels
    assert (got.argmax(1) == want.argmax(1)).sum() >= 5  # the decoded ones: a sub-pixel shift of the crop
    with pytest.raises(BadInput, match="Truncated"):
        model(mixed + [EncodedImage(sample_bytes[6][:500])])


FREED_PROBE = """
import ctypes, json, sys
from models import inference

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = inference.keep_freed_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2()
blocks = [libc.malloc(16 << 20) for _ in range(4)]  # as large as a batch's activations
mapped = libc.mallinfo2().hblks - before.hblks
for block in blocks:
    libc.free(block)
kept = (libc.mallinfo2().fordblks - before.fordblks) / 2 ** 20
print(json.dumps({"tuned": tuned, "mapped": mapped, "kept_mb": kept}))
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="glibc's malloc only")
@pytest.mark.parametrize("mode", ["default", "tuned", "user_chose"])
def test_freed_batches_stay_in_the_heap_for_the_next_one_unless_the_user_set_malloc(mode):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    if mode == "user_chose":
        env["MALLOC_ARENA_MAX"] = "2"
    out = subprocess.run([sys.executable, "-c", FREED_PROBE, "default" if mode == "default" else "tuned"],
                         env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tuned"] is (mode == "tuned")
    if mode == "tuned":  # from the heap, and kept there once freed
        assert got["mapped"] == 0 and got["kept_mb"] >= 64
    else:  # glibc's default: each block mapped alone and handed back to the kernel when freed
        assert got["mapped"] == 4 and got["kept_mb"] < 16
