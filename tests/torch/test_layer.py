"""torch/layer.py: JactusLinear, a linear layer stored as frozen factors around a trainable core.

:math:`y = A C B^\\top x + b`: the forward pass, the dense weight it stands
for, what it stores and what trains, shapes and dtypes. (``MergeableLinear``,
the core kept beside a dense weight, is tested in ``test_merge.py``.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from jactus_linalg.torch import JactusLinear

from ..numerics import orthonormal, tolerance

M, N, A, B = 16, 12, 4, 3  # out, in, left rank, right rank


def _factors(dtype=torch.float64, seed: int = 0):
    rng = np.random.default_rng(seed)
    left = torch.as_tensor(orthonormal(rng, M, A), dtype=dtype)
    right = torch.as_tensor(orthonormal(rng, N, B), dtype=dtype)
    core = torch.as_tensor(rng.standard_normal((A, B)), dtype=dtype)
    bias = torch.as_tensor(rng.standard_normal(M), dtype=dtype)
    return left, core, right, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_is_a_core_b_transposed_plus_bias(with_bias):
    left, core, right, bias = _factors()
    bias = bias if with_bias else None
    layer = JactusLinear.from_factors(left, core, right, bias)
    x = torch.randn(5, 2, N, dtype=torch.float64)  # any leading dimensions, like nn.Linear
    dense = left @ core @ right.T
    expected = x @ dense.T + (0 if bias is None else bias)
    got = layer(x)
    assert got.shape == (5, 2, M)
    # three products of length <= max(M, N); orthonormal factors keep the scale of the core
    tol = tolerance(torch.float64, max(M, N)) * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tol
    assert (layer.weight - dense).abs().max().item() <= tolerance(torch.float64, A) * dense.abs().max().item()
    assert (layer.bias is None) == (bias is None)


def test_only_the_core_trains_and_the_storage_is_am_plus_bn_plus_ab():
    left, core, right, bias = _factors()
    layer = JactusLinear.from_factors(left, core, right, bias)
    assert layer.rank == (A, B) and (layer.in_features, layer.out_features) == (N, M)
    assert layer.n_params() == A * M + B * N + A * B + M < M * N + M
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"core.weight"}
    assert set(layer.state_dict()) == {"right_proj.weight", "core.weight", "left_proj.weight", "left_proj.bias"}
    # each piece is a plain nn.Linear (PEFT can wrap the frozen factors)
    assert all(type(p) is nn.Linear for p in (layer.right_proj, layer.core, layer.left_proj))
    layer(torch.randn(3, N, dtype=torch.float64)).sum().backward()
    assert layer.core.weight.grad is not None and layer.left_proj.weight.grad is None


def test_the_factors_are_copied_not_shared():
    left, core, right, bias = _factors()
    layer = JactusLinear.from_factors(left, core, right, bias)
    with torch.no_grad():
        layer.core.weight.zero_()
    assert core.abs().max().item() > 0  # the caller's tensor is untouched
    assert torch.equal(layer(torch.randn(2, N, dtype=torch.float64)), bias.expand(2, M))


def test_float32_core_between_bfloat16_factors():
    """``mark_trainable(core_dtype=float32)``: the core in float32, the frozen factors in bf16."""
    left, core, right, bias = _factors(dtype=torch.bfloat16)
    layer = JactusLinear.from_factors(left, core, right, bias)
    layer.core.to(torch.float32)
    x = torch.randn(4, N, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    ref = x.double() @ (left.double() @ core.double() @ right.double().T).T + bias.double()
    # three bf16 roundings of the inputs to each product, through max(M, N) terms
    tol = tolerance(torch.bfloat16, max(M, N)) * ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol


def test_factor_shapes_that_do_not_chain_are_refused():
    left, core, right, bias = _factors()
    with pytest.raises(ValueError, match=r"factor shapes do not chain: left \(16, 4\), core \(3, 3\)"):
        JactusLinear.from_factors(left, core[:3], right, bias)
    with pytest.raises(ValueError, match=r"factor shapes do not chain"):
        JactusLinear.from_factors(left, core, right[:, :2], bias)


@pytest.mark.parametrize(
    "bias", [torch.ones(1), torch.tensor(1.0), torch.ones(6), torch.ones(5, 1)],
    ids=["1 element", "0-d", "too long", "2-D"],
)
def test_from_factors_refuses_a_bias_of_the_wrong_shape(bias):
    """Before: a 1-element or 0-d bias was broadcast to five ones."""
    left, core, right = torch.randn(5, 2), torch.randn(2, 3), torch.randn(4, 3)
    shape = re.escape(str(tuple(bias.shape)))
    with pytest.raises(ValueError, match=rf"`bias` must have shape \(5,\).*got {shape}"):
        JactusLinear.from_factors(left, core, right, bias)
    layer = JactusLinear.from_factors(left, core, right, torch.arange(5.0))
    assert torch.equal(layer.bias, torch.arange(5.0))


def test_repr_shows_the_shape_and_the_core():
    layer = JactusLinear(N, M, A, B, bias=False, dtype=torch.float64)
    assert f"in_features={N}, out_features={M}, core={A}x{B}" in repr(layer)
    assert layer.bias is None and layer.core.weight.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dense_is_a_plain_linear_computing_the_same_map(dtype):
    """``dense()``: weight A C Bᵀ formed in at least float32 and rounded to the factors' dtype once."""
    left, core, right, bias = _factors(dtype=dtype)
    layer = JactusLinear.from_factors(left, core, right, bias)
    if dtype == torch.bfloat16:
        layer.core.to(torch.float32)  # a float32 core between half-precision factors
    plain = layer.dense()
    assert type(plain) is nn.Linear and plain.weight.dtype == dtype
    assert (plain.in_features, plain.out_features) == (N, M)
    assert torch.equal(plain.bias, layer.bias) and plain.bias is not layer.bias  # copied
    exact = left.double() @ layer.core.weight.double() @ right.double().T
    # one rounding to `dtype` after a product accurate to float32 (or float64) over A terms
    tol = (tolerance(dtype, 1, c=1.0) + tolerance(torch.float32, A)) * exact.abs().max().item()
    assert (plain.weight.double() - exact).abs().max().item() <= tol
    assert layer.core.weight.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)  # left as it was
    x = torch.randn(3, N, dtype=dtype)
    assert torch.isfinite(plain(x).float()).all()
