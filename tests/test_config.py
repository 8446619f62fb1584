"""Config loading and validation: each rule fails up front with a message naming its key."""

from __future__ import annotations

import pytest

from configs import schema


def test_profile_loads_and_overrides_apply():
    cfg = schema.load("lite_cascade", ["stages.0.threshold=0.7", "confidence=logit_gap"])
    assert [s.model for s in cfg.stages] == ["lite0", "lite1", "lite2"]
    assert [s.resolution for s in cfg.stages] == [224, 240, 260]
    assert cfg.stages[0].threshold == 0.7
    assert cfg.confidence.value == "logit_gap"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.0.threshold=1.5"], r"stages\.0\.threshold: must be in \[0, 1\]"),
        (["stages.1.threshold=-0.1"], r"stages\.1\.threshold: must be in \[0, 1\]"),
        (["stages.1.model=resnet9000"], r"stages\.1\.model: unknown model 'resnet9000'; registered models: lite0"),
        (["stages.0.batch_size=0"], r"stages\.0\.batch_size: must be in \[1, 4096\], got 0"),
        (["stages.2.resolution=8"], r"stages\.2\.resolution: must be in \[16, 4096\]"),
        (["confidence=maxprob"], r"confidence"),
        (["stages.0.colour=red"], r"stages\[0\]\.colour|stages\.0\.colour"),
        (["surprise=1"], r"surprise"),
        (["device=tpu"], r"device: 'tpu'"),
        (["decode.max_pixels=0"], r"decode\.max_pixels"),
        (["output="], r"^output: "),
        (["stages.0.batch_size=many"], r"batch_size"),
        (["decode.max_bytes=0"], r"decode\.max_bytes: must be in \[1, "),
        (["torch_threads=-1"], r"torch_threads: must be in \[0, 1024\]"),
        (["output_shards=-1"], r"output_shards: must be in \[0, 10000\]"),
        (["execution=streamed"], r"execution"),
        (["stages.1.resources={gpu: 1}"], r"stages\.1\.resources\.gpu: not a resource hint; known: accelerator"),
        (["stages.2.resources={min_ram: lots}"], r"stages\.2\.resources\.min_ram: 'lots' is not a valid value"),
        (["model_sharing=machine", "execution=fused"],
         r"execution: fused .* model_sharing: machine needs execution: staged"),
        (["skip_done=true", "overwrite=true"], r"^skip_done: --overwrite removes the earlier runs"),
        (["retry_dead_letters=true"], r"^retry_dead_letters: retries the dead letters of earlier runs, with skip_done"),
        (["shadow=1.5"], r"^shadow: must be in \[0, 1\], got .* \(a share of the records\)"),
        (["shadow=-0.01"], r"^shadow: must be in \[0, 1\], got .* \(a share of the records\)"),
        (["aggregation=last", "stages.1.threshold=1"], r"^aggregation: last .* stages\.1 \(threshold 1\.0"),
    ],
    ids=["threshold-above-1", "threshold-below-0", "unknown-model", "batch-size-0", "resolution-too-small",
         "unknown-confidence", "unknown-stage-key", "unknown-key", "unknown-device", "max-pixels-0", "empty-output",
         "batch-size-not-int", "max-bytes-0", "negative-threads", "negative-shards", "unknown-execution",
         "unknown-resource-hint", "bad-min-ram", "fused-with-machine-sharing", "skip-done-with-overwrite",
         "retry-without-skip-done", "shadow-above-1", "shadow-below-0", "last-with-a-stage-that-never-exits"],
)
def test_invalid_config_names_the_key(overrides, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.load("lite_cascade", overrides)


def test_last_stage_threshold_is_ignored_with_a_warning(caplog):
    """One fewer threshold than stages: a value on the last stage decides nothing, so it is accepted (sweeps
    such as "every threshold 0" stay one command) and the log says it is ignored."""
    cfg = schema.load("lite_cascade", ["stages.0.threshold=0", "stages.1.threshold=0", "stages.2.threshold=0"])
    assert [s.threshold for s in cfg.stages] == [0, 0, 0]
    assert "stages.2.threshold=0.0 is ignored: the last stage exits every record" in caplog.text


USER_MODEL = ["models.tiny.arch=torchvision:resnet18", "models.tiny.weights=/nowhere.pt"]  # weights not read here


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["models.tiny.arch=keras:resnet"], r"models\.tiny: model 'tiny': unknown arch 'keras:resnet'"),
        (["models.tiny.num_classes=0"], r"models\.tiny\.num_classes: must be in \[1, "),
        (["models.tiny.resolution=4"], r"models\.tiny\.resolution: must be in \[16, 4096\]"),
        (["models.tiny.crop_pct=1.5"], r"models\.tiny\.crop_pct: must be in \(0, 1\]"),
        (["models.tiny.interpolation=box"], r"models\.tiny\.interpolation: 'box' is not one of"),
        (["models.tiny.std=[1,0,1]"], r"models\.tiny\.mean/std: need 3 values each, std > 0"),
    ],
    ids=["unknown-arch", "num-classes-0", "resolution-too-small", "crop-pct-above-1", "unknown-interpolation", "std-0"],
)
def test_invalid_user_model_names_the_key(overrides, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.load("lite_cascade", [*USER_MODEL, *overrides])


def test_a_user_model_needs_arch_and_weights():
    with pytest.raises(schema.ConfigError, match=r"models\.tiny\.weights"):
        schema.load("lite_cascade", ["models.tiny.arch=torchvision:resnet18"])


def test_no_stages_is_refused():
    with pytest.raises(schema.ConfigError, match="stages: at least one stage"):
        schema.load(None)


def test_stages_with_different_class_counts_are_refused():
    with pytest.raises(schema.ConfigError, match=r"stages\.1\.model: tiny has 10 classes but stage 0 has 1000"):
        schema.load("lite_cascade", ["models.tiny.arch=torchvision:resnet18", "models.tiny.weights=/nowhere.pt",
                                     "models.tiny.num_classes=10", "stages.1.model=tiny"])


def test_unknown_profile_lists_profiles():
    with pytest.raises(schema.ConfigError, match="profiles: .*lite_cascade"):
        schema.load("no_such_profile")


def test_fused_execution_refuses_video_granularity_up_front():
    with pytest.raises(schema.ConfigError, match=r"^execution: fused runs image and frame records.*execution: staged"):
        schema.load("video_clips", ["execution=fused"])
    assert schema.execution_of(schema.load("video_clips")) is schema.Execution.STAGED
    assert schema.execution_of(schema.load("video_frames")) is schema.Execution.FUSED
    # unset: fused where it can run, staged where the config needs it
    assert schema.execution_of(schema.load("lite_cascade")) is schema.Execution.FUSED
    assert schema.execution_of(schema.load("lite_cascade", ["stages.0.escalate=0.15"])) is schema.Execution.STAGED
    assert schema.execution_of(schema.load("lite_cascade", ["model_sharing=machine"])) is schema.Execution.STAGED


def test_every_resource_hint_the_schema_accepts_is_one_beam_parses():
    from apache_beam.transforms.resources import ResourceHint, parse_resource_hints

    examples = {"accelerator": "type:nvidia-l4;count:1;install-nvidia-driver", "min_ram": "16GB", "cpu_count": "4"}
    assert examples.keys() == schema.RESOURCE_HINTS.keys()
    cfg = schema.load("lite_cascade", [f"stages.2.resources.{k}={v}" for k, v in examples.items()])
    assert cfg.stages[2].resources == examples and cfg.stages[0].resources == {}
    for name in schema.RESOURCE_HINTS:
        assert ResourceHint.is_registered(name)
    assert len(parse_resource_hints(examples)) == 3


# --- numeric bounds: one table (schema.BOUNDS), every row tested, every numeric key in the table ----------------

def _example(key: str) -> tuple[str, list[str], str]:
    """(profile, extra overrides, concrete key) to try a BOUNDS row's key on."""
    if key.startswith("models.*."):
        return "lite_cascade", USER_MODEL, key.replace("*", "tiny")
    if key.startswith("video.clips") or key.startswith("video.crops"):
        return "video_clips", [], key
    if key.startswith("video."):
        return "video_frames", [], key
    return "lite_cascade", [], key.replace("*", "0")


def _outside(bound: schema.Bound, integer: bool) -> list:
    """Values just outside the row's range (and inf, -inf, NaN for a float key)."""
    low = bound.low if bound.low_open else (bound.low - 1 if integer else bound.low - max(abs(bound.low), 1) * 1e-3)
    values = [int(low) if integer else low, int(bound.high) + 1 if integer else bound.high * (1 + 1e-6) + 1e-9]
    if integer:
        values.append(10**20)  # an integer no int64 holds
    else:
        values += [float("inf"), float("-inf"), float("nan")]
    return values


def _is_integer_key(key: str) -> bool:
    return _numeric_keys()[key] is int


def _numeric_keys() -> dict:
    """Every int/float key of the schema, as BOUNDS spells it (``stages.*.x``, ``models.*.x``), with its type;
    CalibrationInfo's figures (read by reports only) excepted."""
    import dataclasses
    import typing

    found: dict[str, type] = {}

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            origin = typing.get_origin(hint)
            inner = args[0] if origin is typing.Union and len(args) == 1 else hint
            if inner in (int, float):
                found[prefix + f.name] = inner
            elif origin is list and dataclasses.is_dataclass(args[0]):
                walk(args[0], f"{prefix}{f.name}.*.")
            elif origin is dict and dataclasses.is_dataclass(args[1]):
                walk(args[1], f"{prefix}{f.name}.*.")
            elif dataclasses.is_dataclass(inner) and inner is not schema.CalibrationInfo:
                walk(inner, f"{prefix}{f.name}.")

    walk(schema.CascadeConfig, "")
    return found


def test_every_numeric_key_of_the_schema_has_a_bound():
    """A new numeric key must say its range in BOUNDS (and so be refused outside it, before any work)."""
    keys = _numeric_keys()
    bounded = {b.key for b in schema.BOUNDS}
    assert keys.keys() - bounded == set(), "numeric keys without a row in schema.BOUNDS"
    assert bounded - keys.keys() == set(), "rows of schema.BOUNDS naming no key"


@pytest.mark.parametrize("bound", schema.BOUNDS, ids=[b.key for b in schema.BOUNDS])
def test_every_bound_refuses_values_outside_its_range_naming_the_key(bound):
    profile, extra, key = _example(bound.key)
    for value in _outside(bound, _is_integer_key(bound.key)):
        text = {float("inf"): ".inf", float("-inf"): "-.inf"}.get(value, ".nan" if value != value else repr(value))
        with pytest.raises(schema.ConfigError, match=rf"^{key.replace('.', '[.]')}: must be in "
                                                     rf"[\[(]\S+, \S+\], got "):
            schema.load(profile, [*extra, f"{key}={text}"])


@pytest.mark.parametrize("bound", schema.BOUNDS, ids=[b.key for b in schema.BOUNDS])
def test_every_bound_accepts_its_limits(bound):
    profile, extra, key = _example(bound.key)
    integer = _is_integer_key(bound.key)
    limits = [bound.high] if bound.low_open else [bound.low, bound.high]
    for value in limits:
        value = int(value) if integer else float(value)
        cfg = schema.load(profile, [*extra, f"{key}={value}"])
        got = cfg
        for part in key.split("."):
            got = got[int(part)] if part.isdigit() else got[part] if isinstance(got, dict) else getattr(got, part)
        assert got == value


@pytest.mark.parametrize("override, message", [
    ("decode.read_timeout_s=.inf", r"^decode\.read_timeout_s: must be in \[0\.01, 86400\], got inf"),
    ("decode.max_bytes=100000000000000000000", r"^decode\.max_bytes: must be in \[1, 68719476736\]"),
    ("stages.0.batch_size=1000000000", r"^stages\.0\.batch_size: must be in \[1, 4096\]"),
    ("output_shards=1000000000000", r"^output_shards: must be in \[0, 10000\]"),
])
def test_issue_22_settings_that_cannot_work_are_refused(override, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.load("lite_cascade", [override])
    for fps in (".inf", "1e-7"):
        with pytest.raises(schema.ConfigError, match=r"^video\.fps: must be in \[0\.001, 1000\]"):
            schema.load("video_frames", [f"video.fps={fps}"])
