"""The model registry: every entry loads its real weights and runs; user models; bad checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision

from configs import schema
from models import registry

EXPECTED_GMACS = {"lite0": 0.385, "lite1": 0.600, "lite2": 0.860}  # EfficientNet-Lite tables, multiply-adds


@pytest.mark.parametrize("name", registry.names())
def test_every_entry_loads_real_weights_and_runs(name):
    spec = registry.get(name)
    small = spec.at(64)  # a tiny input keeps the forward pass cheap
    model = registry.build(small)
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, spec.num_classes)
    assert len(spec.class_names) == spec.num_classes


@pytest.mark.parametrize("name", sorted(EXPECTED_GMACS))
def test_gmacs_are_multiply_adds_at_the_entry_resolution(name):
    spec = registry.get(name)
    assert registry.gmacs(spec) == pytest.approx(EXPECTED_GMACS[name], rel=0.01)
    # a self-cascade stage at a higher resolution costs more, roughly with the pixel count
    bigger = registry.gmacs(spec.at(spec.input.resolution * 2))
    assert bigger == pytest.approx(4 * registry.gmacs(spec), rel=0.1)


def test_self_cascade_key_and_preprocessing_follow_resolution():
    spec = registry.parse_key("lite0@288")
    assert spec.key == "lite0@288" and spec.input.resolution == 288
    assert spec.input.resize_to == round(288 / 0.875)
    assert spec.weights == registry.get("lite0").weights


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'lite9'.*lite0, lite1, lite2"):
        registry.get("lite9")


def test_duplicate_registration_raises():
    other = dataclasses.replace(registry.get("lite0"), num_classes=10)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(other)


def _resnet_config(tmp_path, weights_url: str, num_classes: int = 10, **extra) -> schema.CascadeConfig:
    return schema.load(
        None,
        ["models.tiny.arch=torchvision:resnet18", f"models.tiny.weights={weights_url}",
         f"models.tiny.num_classes={num_classes}", "models.tiny.resolution=64",
         "stages.0.model=tiny", *[f"{k}={v}" for k, v in extra.items()]],
    )


def test_user_torchvision_model_from_fsspec_url(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    cfg = _resnet_config(tmp_path, f"file://{tmp_path}/resnet18.pt")
    spec = schema.stage_specs(cfg)[0]
    loaded = registry.build(spec)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    assert spec.class_name(3) == "3"  # no names given for 10 classes: the index


def test_user_torchscript_model(tmp_path):
    scripted = torch.jit.script(torchvision.models.resnet18(num_classes=10).eval())
    scripted.save(str(tmp_path / "m.pt"))
    cfg = schema.load(None, ["models.ts.arch=torchscript", f"models.ts.weights={tmp_path}/m.pt",
                             "models.ts.num_classes=10", "stages.0.model=ts"])
    spec = schema.stage_specs(cfg)[0]
    assert registry.build(spec)(torch.zeros(1, 3, 224, 224)).shape == (1, 10)
    assert registry.gmacs(spec) == pytest.approx(1.82, rel=0.02)  # resnet18 at 224


def test_checkpoint_that_does_not_fit_names_model_and_mismatch(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "ten.pt")
    cfg = _resnet_config(tmp_path, str(tmp_path / "ten.pt"), num_classes=1000)
    with pytest.raises(ValueError, match=r"model .tiny.* num_classes=1000: 2 shape mismatches: fc\.weight is "
                                         r"\(10, 512\) in the checkpoint but \(1000, 512\) in the model"):
        registry.build(schema.stage_specs(cfg)[0])


def test_pickled_code_in_checkpoint_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    spec = dataclasses.replace(registry.get("lite0"), weights=str(tmp_path / "evil.pt"))
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        registry.build(spec)


def test_every_architecture_family_builds_and_unknown_ones_list_the_valid_ones():
    assert set(registry.ARCHITECTURES) == {"efficientnet-lite", "torchvision", "timm"}
    with pytest.raises(ValueError, match=r"unknown arch 'keras:resnet'; use one of 'efficientnet-lite:<name>', "
                                         r"'torchvision:<name>', 'timm:<name>', 'torchscript'"):
        registry.architecture("keras:resnet", "x")


def test_model_keys_are_read_in_one_place():
    assert registry.split_key("lite0@160") == ("lite0", 160)
    assert registry.split_key(" lite2 ") == ("lite2", None)
    with pytest.raises(ValueError, match="NAME@RESOLUTION"):
        registry.split_key("lite0@big")


def test_a_timm_model_from_a_local_weights_file_takes_its_preprocessing_from_pretrained_cfg(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "r10t.pt")
    cfg = schema.load(None, ["models.mine.arch=timm:resnet10t", f"models.mine.weights={tmp_path}/r10t.pt",
                             "models.mine.num_classes=7", "stages.0.model=mine", "stages.0.resolution=64"])
    spec = schema.stage_specs(cfg)[0]
    pretrained = timm.models.get_pretrained_cfg("resnet10t")
    assert spec.input.crop_pct == pretrained.crop_pct and spec.input.interpolation == pretrained.interpolation
    assert spec.input.mean == pytest.approx(tuple(255 * m for m in pretrained.mean))
    assert spec.input.resolution == 64  # the stage's own resolution wins
    loaded = registry.build(spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    assert registry.gmacs(spec) > 0
