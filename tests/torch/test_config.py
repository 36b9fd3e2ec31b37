"""JactusConfig: every field validated and named; compress takes a config or keyword fields."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from jactus_linalg.torch import JactusConfig, JactusLinear, calibrate, compress
from jactus_linalg.torch.config import METHODS

from .models import hf_loss, llama_batches, mlp, mlp_batches, mlp_loss, tiny_llama


def test_defaults_are_the_design_defaults():
    config = JactusConfig()
    assert (config.retain, config.method, config.task_directions) == (0.8, "jactus", "covariance")
    assert (config.trainable, config.dense_cores, config.min_rank) == ("cores", True, 1)
    assert config.damping is None  # the method's own default
    assert set(METHODS) == {"svd", "svd-llm", "kfac", "jactus"}
    assert METHODS["svd-llm"].input_cov and not METHODS["svd-llm"].grad_cov


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.array(0.5), 0.5, 1]
)
def test_numpy_and_torch_scalars_are_numbers(value):
    config = JactusConfig(retain=value, task_fraction=value, damping=(value, value))
    assert config.retain == float(value) and type(config.retain) is float
    assert config.damping == (float(value), float(value))
    assert JactusConfig(min_rank=np.int64(3), rank_pattern={"q_proj": torch.tensor(2)}).rank_pattern == {
        "q_proj": 2
    }


BAD = [
    ("retain", 0.0, ValueError, r"`retain` must lie in \(0, 1\]"),
    ("retain", 1.5, ValueError, r"`retain` must lie in \(0, 1\].*got 1.5"),
    ("retain", np.float32(-0.5), ValueError, "`retain` must lie"),
    ("retain", float("nan"), ValueError, "`retain` must be finite"),
    ("retain", "0.8", TypeError, "`retain` must be a real number"),
    ("retain", True, TypeError, "`retain` must be a real number"),
    ("retain", torch.tensor([0.5, 0.5]), TypeError, "`retain` must be a real number"),
    ("method", "lora", ValueError, r"`method` must be one of .*'jactus'"),
    ("task_fraction", 1.2, ValueError, r"`task_fraction` must lie in \[0, 1\]"),
    ("task_directions", "random", ValueError, "`task_directions` must be one of"),
    ("damping", -1e-3, ValueError, "`damping` must be >= 0"),
    ("damping", (1e-3,), ValueError, "`damping` must be a number >= 0 or a pair.*sequence of 1"),
    ("damping", (1e-3, 1e-3, 1e-3), ValueError, "sequence of 3"),
    ("damping", ("x", 1e-3), ValueError, r"`damping\[0\]` must be a number >= 0 or 'svd-llm'"),
    ("damping", (1e-3, -1.0), ValueError, r"`damping\[1\]` must be >= 0"),
    ("damping", "cholesky", ValueError, "`damping` must be a number >= 0 or 'svd-llm'"),
    ("damping", np.ones(3), ValueError, r"`damping` must be .* shape \(3,\)"),
    ("target_modules", "(", ValueError, "`target_modules` is not a valid regular expression"),
    ("target_modules", 3, TypeError, "`target_modules` must be None, a regex or a list"),
    ("target_modules", [], ValueError, "`target_modules` is an empty list"),
    ("target_modules", ["q_proj", 1], TypeError, "`target_modules` must be"),
    ("exclude_modules", "all-linear", ValueError, "`exclude_modules` cannot be 'all-linear'"),
    ("exclude_modules", "[", ValueError, "`exclude_modules` is not a valid regular expression"),
    ("rank_pattern", [("q_proj", 2)], TypeError, "`rank_pattern` must be a dict"),
    ("rank_pattern", {"q_proj": 0}, ValueError, r"`rank_pattern\['q_proj'\]` must be at least 1"),
    ("rank_pattern", {"q_proj": 2.5}, TypeError, r"`rank_pattern\['q_proj'\]` must be an integer"),
    ("rank_pattern", {"(": 2}, ValueError, "`rank_pattern key` is not a valid regular expression"),
    ("min_rank", 0, ValueError, "`min_rank` must be at least 1"),
    ("min_rank", 1.0, TypeError, "`min_rank` must be an integer"),
    ("allocation", "greedy", ValueError, "`allocation` must be one of"),
    ("grad_whitening", "yes", TypeError, "`grad_whitening` must be True or False"),
    ("whitening", "svd", ValueError, "`whitening` must be one of"),
    ("basis", "qr", ValueError, "`basis` must be one of"),
    ("dtype", "float16", ValueError, r"`dtype` must be one of \['float32', 'float64'\]"),
    ("core_dtype", "int8", ValueError, "`core_dtype` must be one of"),
    ("dense_cores", 1, TypeError, "`dense_cores` must be True or False"),
    ("trainable", "all", ValueError, r"`trainable` must be one of \['cores', 'none'\]"),
    ("modules_to_save", [""], TypeError, "`modules_to_save` must be a list of module names"),
]


@pytest.mark.parametrize(("field", "value", "error", "match"), BAD, ids=[f"{b[0]}-{b[1]!r}" for b in BAD])
def test_every_field_is_checked_and_named(field, value, error, match):
    with pytest.raises(error, match=match):
        JactusConfig(**{field: value})


def test_every_field_has_a_bad_value_above():
    fields = {f for f in JactusConfig.__dataclass_fields__}
    assert fields == {b[0] for b in BAD}


def test_frozen_hashable_and_json_round_trip():
    config = JactusConfig(
        retain=np.float32(0.75), damping=("svd-llm", 1e-2), target_modules=["q_proj", "v_proj"],
        exclude_modules=r".*layers\.0\..*", rank_pattern={"o_proj": 4}, core_dtype=torch.float32,
        modules_to_save="classifier",
    )
    with pytest.raises(AttributeError):
        config.retain = 0.5  # type: ignore[misc]
    assert config.target_modules == ("q_proj", "v_proj") and config.core_dtype == "float32"
    assert config.modules_to_save == ("classifier",)
    again = JactusConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
    assert copy.deepcopy(config) == config
    assert config.replace(retain=0.5).retain == 0.5 and config.retain == 0.75
    with pytest.raises(ValueError, match="`retain` must lie"):
        config.replace(retain=2)
    with pytest.raises(TypeError, match=r"unknown JactusConfig field\(s\) \['rank'\]"):
        JactusConfig.from_dict({"rank": 8})


def test_keep_dense_is_removed_with_a_pointer():
    with pytest.raises(TypeError, match=r"`keep_dense` was removed.*mergeable core"):
        JactusConfig().replace(keep_dense=False)


@pytest.fixture(scope="module")
def calibrated_mlp():
    model, batches = mlp(), mlp_batches()
    return model, calibrate(model, batches, mlp_loss, progress=False)


def test_compress_names_bad_arguments(calibrated_mlp):
    model, stats = calibrated_mlp
    with pytest.raises(TypeError, match=r"`stats` must be the CalibrationStats.*got NoneType"):
        compress(copy.deepcopy(model), None)
    with pytest.raises(TypeError, match=r"`stats` must be the CalibrationStats.*got dict"):
        compress(copy.deepcopy(model), {"0": {}})
    with pytest.raises(TypeError, match=r"`config` must be a JactusConfig.*pass `retain=0.8`"):
        compress(copy.deepcopy(model), stats, 0.8)
    with pytest.raises(TypeError, match=r"`model` must be a torch nn\.Module"):
        compress(model.state_dict(), stats)
    with pytest.raises(TypeError, match=r"unknown JactusConfig field\(s\) \['rank'\]"):
        compress(copy.deepcopy(model), stats, rank=4)
    with pytest.raises(ValueError, match=r"`retain` must lie in \(0, 1\].*got 1.5"):
        compress(copy.deepcopy(model), stats, retain=np.float32(1.5))


def test_config_and_keyword_fields_agree(calibrated_mlp):
    model, stats = calibrated_mlp
    a, b, c = (copy.deepcopy(model) for _ in range(3))
    ra = compress(a, stats, JactusConfig(retain=0.75, method="kfac"), progress=False)
    rb = compress(b, stats, retain=np.float32(0.75), method="kfac", progress=False)
    rc = compress(c, stats, JactusConfig(retain=0.9), retain=torch.tensor(0.75), method="kfac", progress=False)
    assert ra.config == rb.config == rc.config == a.jactus_config
    assert ra.ranks == rb.ranks == rc.ranks
    x = mlp_batches()[0][0]
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))


def test_target_and_exclude_modules_choose_the_layers(calibrated_mlp):
    model, stats = calibrated_mlp
    only = copy.deepcopy(model)
    report = compress(only, stats, retain=0.9, target_modules=["2"], progress=False)
    assert [r.name for r in report.layers] == ["2"]
    assert type(only[0]) is torch.nn.Linear and type(only[4]) is torch.nn.Linear  # untouched
    assert report.params_before == sum(p.numel() for p in model.parameters())
    rest = copy.deepcopy(model)
    report = compress(rest, stats, retain=0.9, exclude_modules=r"[24]", progress=False)
    assert sorted(r.name for r in report.layers) == ["0", "6"]
    with pytest.raises(ValueError, match="`target_modules` select no layer"):
        compress(copy.deepcopy(model), stats, target_modules=["no_such_layer"], progress=False)


def test_target_modules_needs_statistics_for_each_layer():
    model, batches = mlp(), mlp_batches()
    stats = calibrate(model, batches, mlp_loss, targets=["0", "2"], progress=False)
    with pytest.raises(ValueError, match=r"`target_modules`=.*selects 1 layer\(s\) .* no statistics.*\['4'\]"):
        compress(model, stats, target_modules=["2", "4"], progress=False)


def test_rank_pattern_is_honoured():
    model, batches = tiny_llama(), llama_batches()
    stats = calibrate(model, batches, hf_loss, progress=False)
    compressed = copy.deepcopy(model)
    report = compress(compressed, stats, retain=0.7, rank_pattern={"q_proj": 3, r"layers\.1\.mlp\..*": 2},
                      progress=False)
    ranks = report.ranks
    assert [ranks[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1)] == [3, 3]
    assert all(ranks[f"model.layers.1.mlp.{p}"] == 2 for p in ("gate_proj", "up_proj", "down_proj"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = compressed.get_submodule(name)
        assert isinstance(layer, JactusLinear)
    assert report.retain_achieved <= 0.7
    with pytest.raises(ValueError, match=r"`rank_pattern` key 'nope' matches no compressed layer"):
        compress(copy.deepcopy(model), stats, rank_pattern={"nope": 2}, progress=False)
    with pytest.raises(ValueError, match=r"`modules_to_save` name 'classifier' matches no module"):
        compress(copy.deepcopy(model), stats, modules_to_save=["classifier"], progress=False)
    with pytest.raises(ValueError, match=r"`rank_pattern\['q_proj'\]`=40 exceeds .* break-even rank 19"):
        compress(copy.deepcopy(model), stats, rank_pattern={"q_proj": 40}, progress=False)


def test_compress_then_lora_takes_the_same_scalars_and_names_bad_statistics(calibrated_mlp):
    from jactus_linalg.torch import compress_then_lora

    model, stats = calibrated_mlp
    a = compress_then_lora(copy.deepcopy(model), stats, retain=np.float32(0.75), lora_rank=1, progress=False)
    b = compress_then_lora(copy.deepcopy(model), stats, retain=torch.tensor(0.75), lora_rank=1, progress=False)
    assert a.compress_retain == b.compress_retain and a.total_retain <= 0.75
    with pytest.raises(TypeError, match=r"`stats` must be the CalibrationStats.*got NoneType"):
        compress_then_lora(copy.deepcopy(model), None)
    with pytest.raises(ValueError, match=r"`retain` must lie in \(0, 1\]"):
        compress_then_lora(copy.deepcopy(model), stats, retain=1.5)
