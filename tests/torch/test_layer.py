"""The layers on their own: MergeableLinear (dense weight + core in a frozen subspace), merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from jactus_linalg.torch import merge
from jactus_linalg.torch.merge import MergeableLinear, has_unmerged_cores, merged_state_dict

from ..numerics import orthonormal, tolerance

M, N, A, B = 12, 9, 4, 3


def _layer(dtype=torch.float64, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    dense = nn.Linear(N, M, bias=bias).to(dtype)
    rng = np.random.default_rng(seed)
    left = torch.as_tensor(orthonormal(rng, M, A), dtype=dtype)
    right = torch.as_tensor(orthonormal(rng, N, B), dtype=dtype)
    return dense, MergeableLinear.from_linear(dense, left, right), left, right


@pytest.mark.parametrize("bias", [True, False])
def test_shares_the_dense_parameters_and_starts_at_zero(bias):
    dense, layer, left, right = _layer(bias=bias)
    assert layer.weight is dense.weight and layer.bias is dense.bias  # no copy
    assert isinstance(layer, nn.Linear) and layer.rank == (A, B)
    assert torch.count_nonzero(layer.core.weight) == 0 and layer.core.weight.requires_grad
    assert not layer.left_proj.weight.requires_grad and not layer.right_proj.weight.requires_grad
    assert layer.left_proj.bias is None and layer.right_proj.bias is None
    assert torch.equal(layer.left_proj.weight, left) and torch.equal(layer.right_proj.weight, right.T)
    x = torch.randn(5, 2, N, dtype=torch.float64)
    assert torch.equal(layer(x), dense(x))


def test_forward_is_w_plus_a_core_b():
    dense, layer, left, right = _layer()
    core = torch.randn(A, B, dtype=torch.float64)
    with torch.no_grad():
        layer.core.weight.copy_(core)
    x = torch.randn(7, N, dtype=torch.float64)
    expected = x @ (dense.weight + left @ core @ right.T).T + dense.bias
    tol = tolerance(torch.float64, N) * expected.abs().max().item()
    assert (layer(x) - expected).abs().max().item() <= tol
    delta = layer.delta_weight()
    assert (delta - left @ core @ right.T).abs().max().item() <= tolerance(torch.float64, A)
    # an isometric step: ||A dC Bᵀ||_F = ||dC||_F for orthonormal A, B
    assert abs(delta.norm().item() - core.norm().item()) <= tolerance(torch.float64, M) * core.norm().item()


def test_merged_is_a_plain_linear_with_the_folded_weight():
    _dense, layer, _, _ = _layer()
    with torch.no_grad():
        layer.core.weight.normal_()
    merged = layer.merged()
    assert type(merged) is nn.Linear and merged.bias is layer.bias
    assert merged.weight.requires_grad == layer.weight.requires_grad
    x = torch.randn(6, N, dtype=torch.float64)
    tol = tolerance(torch.float64, N) * layer(x).abs().max().item()
    assert (merged(x) - layer(x)).abs().max().item() <= tol


def test_merge_in_a_model_and_the_state_dict_without_merging():
    _dense, layer, _, _ = _layer()
    with torch.no_grad():
        layer.core.weight.normal_()
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(M, 2).double())
    assert has_unmerged_cores(model) == ["0"]
    state = merged_state_dict(model)
    assert has_unmerged_cores(model) == ["0"]  # not changed
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(4, N, dtype=torch.float64)
    before = model(x)
    assert merge(model) is model and has_unmerged_cores(model) == []
    assert type(model[0]) is nn.Linear
    assert torch.equal(model[0].weight, state["0.weight"])
    assert (model(x) - before).abs().max().item() <= tolerance(torch.float64, N) * before.abs().max().item()


def test_the_model_itself_can_be_a_mergeable_layer():
    _, layer, _, _ = _layer()
    state = merged_state_dict(layer)
    assert set(state) == {"weight", "bias"}


def test_float32_core_on_a_bfloat16_layer():
    _dense, layer, _, _ = _layer(dtype=torch.bfloat16)
    layer.core.to(torch.float32)
    with torch.no_grad():
        layer.core.weight.fill_(1e-3)  # below bf16's resolution next to 1: kept in float32
    y = layer(torch.randn(3, N, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    merged = layer.merged()
    assert merged.weight.dtype == torch.bfloat16
    assert layer.delta_weight().dtype == torch.float32


def test_bad_bases_are_refused():
    dense = nn.Linear(N, M).double()
    good_left = torch.zeros(M, A, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`left` must be \(12, a\) and `right` \(9, b\)"):
        MergeableLinear.from_linear(dense, good_left, torch.zeros(N + 1, B, dtype=torch.float64))
    with pytest.raises(ValueError, match="`left` basis contains non-finite values"):
        MergeableLinear.from_linear(
            dense, torch.full((M, A), float("nan"), dtype=torch.float64),
            torch.zeros(N, B, dtype=torch.float64),
        )
    assert type(dense) is nn.Linear and not hasattr(dense, "core")  # untouched by the refusals
