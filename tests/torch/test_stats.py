"""torch/stats.py: the CalibrationStats container (access, groups, model check, all-reduce, files).

Statistics come from a real :func:`~jactus_linalg.torch.calibrate` run on the
tiny MLP (targets ``0`` and ``2``, which read different inputs). Untrusted
and interrupted files are tested by topic in ``test_load_untrusted.py``,
``test_load_fuzz.py`` and ``test_save_safety.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from jactus_linalg.torch import CalibrationStats, calibrate
from jactus_linalg.torch.stats import LayerInfo, check_stats_path

from ..numerics import tolerance
from .tiny_mlp import HIDDEN, IN, assert_bit_identical, make_batches, make_mlp, mlp_loss, stat_tensors


@pytest.fixture(scope="module")
def stats() -> CalibrationStats:
    return calibrate(make_mlp(), make_batches(), mlp_loss, targets=["0", "2"], progress=False)


def test_the_container_iterates_over_its_layers_in_order(stats):
    assert list(stats) == ["0", "2"] and len(stats) == 2
    assert "0" in stats and "4" not in stats
    assert stats.layers["0"] == LayerInfo("0", IN, HIDDEN, "0")
    assert stats.input_groups() == {"0": ["0"], "2": ["2"]}


def test_layer_is_the_mean_of_the_streamed_sums(stats):
    """``layer(name)``: C_x = Σ x xᵀ / N, C_g = Σ g gᵀ / N, G = Σ g xᵀ / N, N tokens."""
    tokens = sum(x.shape[0] for x, _ in make_batches())
    for name, info in stats.layers.items():
        layer = stats.layer(name)
        assert layer.n_samples == tokens == stats.inputs[info.input_group].count
        assert layer.input_cov.shape == (info.in_features, info.in_features)
        assert layer.grad_cov.shape == (info.out_features, info.out_features)
        assert layer.grad_mean.shape == (info.out_features, info.in_features)
        tol = tolerance(torch.float64, tokens)
        for got, total in (
            (layer.input_cov, stats.inputs[info.input_group].total),
            (layer.grad_cov, stats.grads[name].total),
            (layer.grad_mean, stats.grad_sums[name]),
        ):
            want = total / tokens
            assert (got - want).abs().max().item() <= tol * want.abs().max().item()
        asym = (layer.input_cov - layer.input_cov.T).abs().max().item()
        assert asym <= tol * layer.input_cov.abs().max().item()  # symmetric up to the products' rounding


def test_unknown_layer_is_a_key_error_listing_the_layers(stats):
    with pytest.raises(KeyError, match=r"no statistics for layer `4`; layers here: 0, 2"):
        stats.layer("4")


def test_a_layer_without_gradient_statistics_has_none(stats):
    partial = copy.deepcopy(stats)
    del partial.grad_sums["2"]
    partial.grads["2"] = type(stats.grads["2"])(HIDDEN, dtype="float64")  # nothing absorbed
    layer = partial.layer("2")
    assert layer.grad_cov is None and layer.grad_mean is None
    assert torch.equal(layer.input_cov, stats.layer("2").input_cov)


def test_check_model_accepts_its_own_shapes_and_names_what_differs(stats):
    stats.check_model({"0": (HIDDEN, IN), "2": (HIDDEN, HIDDEN)})
    stats.check_model({"2": (HIDDEN, HIDDEN)})  # a subset of the calibrated layers
    with pytest.raises(ValueError, match=r"no statistics for 1 target layer\(s\), e\.g\. \['4'\]"):
        stats.check_model({"0": (HIDDEN, IN), "4": (3, HIDDEN)})
    with pytest.raises(ValueError, match=rf"layer `0` are for shape \({HIDDEN}, {IN}\) but .* is \({HIDDEN}, 16\)"):
        stats.check_model({"0": (HIDDEN, 16)})


def test_all_reduce_without_a_process_group_changes_nothing(stats):
    assert not torch.distributed.is_initialized()
    copy_ = copy.deepcopy(stats)
    copy_.all_reduce()
    assert copy_.n_batches == stats.n_batches
    assert_bit_identical(stat_tensors(copy_), stat_tensors(stats))


def test_save_then_load_is_bit_identical(stats, tmp_path):
    path = stats.save(tmp_path / "s.safetensors")
    assert path == tmp_path / "s.safetensors" and path.is_file()
    loaded = CalibrationStats.load(path)
    assert loaded.layers == stats.layers
    assert loaded.n_batches == stats.n_batches == len(make_batches())
    assert loaded.meta == stats.meta
    assert {k: a.count for k, a in loaded.inputs.items()} == {k: a.count for k, a in stats.inputs.items()}
    assert {k: a.mode for k, a in loaded.grads.items()} == {k: a.mode for k, a in stats.grads.items()}
    assert_bit_identical(stat_tensors(loaded), stat_tensors(stats))
    for name in stats:
        a, b = stats.layer(name), loaded.layer(name)
        assert torch.equal(a.input_cov, b.input_cov) and torch.equal(a.grad_mean, b.grad_mean)


def test_statistics_files_must_be_safetensors(tmp_path):
    assert check_stats_path(tmp_path / "s.safetensors") == tmp_path / "s.safetensors"
    for bad in ("s.pt", "s.safetensors.tmp", "s"):
        with pytest.raises(ValueError, match=r"`path`.*\.safetensors"):
            check_stats_path(tmp_path / bad)
    with pytest.raises(ValueError, match=r"`checkpoint`"):
        check_stats_path(tmp_path / "s.pkl", name="checkpoint")
