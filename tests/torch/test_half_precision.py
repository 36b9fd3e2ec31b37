"""fp16 and bf16 models: calibration in float64, factors rounded once, overflow named.

``docs/failure-modes.md`` lists these promises.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jactus_linalg.torch import (
    calibrate,
    compress,
)
from jactus_linalg.torch.compress import allocate, plan_compression, replace_layers

from ..numerics import tolerance
from .tiny_mlp import (
    HIDDEN,
    IN,
    OUT,
    make_batches,
    make_mlp,
    mlp_loss,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_calibrates_and_compresses(dtype):
    """Statistics in float64, decompositions upcast, factors rounded to the model's dtype once.

    Input features spread over three decades make the whitening factors
    ill-conditioned: rounding them to float16 *before* orthonormalising
    (as the adapter once did) gave about 10 eps of error; 3 eps is allowed here.
    """
    spread = torch.logspace(0, -3, IN, dtype=torch.float64)
    batches = [((x * spread).to(dtype), y) for x, y in make_batches()]
    model = make_mlp(dtype=dtype)
    stats = calibrate(model, batches, mlp_loss, progress=False)
    for name in stats:
        layer = stats.layer(name)
        assert (
            layer.input_cov.dtype == layer.grad_cov.dtype == layer.grad_mean.dtype == torch.float64
        )
    plan = plan_compression(model, stats, progress=False)
    ranks = allocate(plan, 0.7)
    compressed = copy.deepcopy(model)
    replace_layers(compressed, plan, ranks, retain=0.7)
    assert torch.isfinite(compressed(batches[0][0])).all()
    for name, rank in ranks.items():
        if rank is None:
            continue
        layer = compressed.get_submodule(name)
        assert all(p.dtype == dtype for p in layer.parameters())
        # the stored product differs from the working-precision one by rounding only:
        # relative error a few eps(dtype), not eps(dtype) times a condition number
        lp = plan.plans[name]
        exact = lp._replace(weight_dtype=lp.core.dtype).factorize(rank)
        want = exact.left @ exact.core @ exact.right.T
        got = (
            layer.left_proj.weight.double()
            @ layer.core.weight.double()
            @ layer.right_proj.weight.double()
        )
        assert (got - want).norm() <= tolerance(dtype, 3, c=1) * want.norm()


class _Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_fp16_activation_overflow_names_the_layer():
    """An activation past 65504 is Inf in float16.

    The next target's hook names the layer and its `input_cov`.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), _Scale(1e5), nn.Linear(HIDDEN, OUT)).half()
    batches = make_batches(n=1, dtype=torch.float16)
    with pytest.raises(
        ValueError, match=r"layer `2`.*`2:input_cov`.*Inf.*float16.*65504.*float32 copy"
    ):
        calibrate(model, batches, mlp_loss, progress=False)
    # the model is left as it was (flags and grads restored)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fp16_gradient_overflow_names_the_layer():
    """A gradient past 65504 is Inf in float16.

    The hook of the layer it reaches names the layer and its `grad_cov`.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN, HIDDEN, bias=False), _Scale(1e4), nn.Linear(HIDDEN, OUT, bias=False)
    ).half()
    x = (1e-4 * torch.randn(8, IN)).half()  # forward stays small: |Scale(a(x))| ~ 1

    def big_loss(m, batch):
        return m(batch).float().sum() * 1e3  # d loss / d out = 1e3; times 1e4 at the Scale: Inf

    with pytest.raises(ValueError, match=r"layer `0`, output gradient.*`0:grad_cov`.*Inf.*float16"):
        calibrate(model, [x], big_loss, progress=False)


def test_fp16_gradient_underflow_is_explained():
    """Gradients below float16's smallest subnormal (6e-8) vanish.

    The error says so, and to scale the loss up.
    """
    model, batches = make_mlp(dtype=torch.float16), make_batches(dtype=torch.float16)
    stats = calibrate(model, batches, lambda m, b: 2.0**-30 * mlp_loss(m, b), progress=False)
    with pytest.raises(
        ValueError,
        match=r"layer `0`: no loss gradient.*identically zero.*"
        r"float16, small gradients underflow.*loss multiplied by a large constant",
    ):
        compress(copy.deepcopy(model), stats, retain=0.7, progress=False)


def test_loss_scale_does_not_change_the_compression():
    """Scaling the loss by s scales C_g by s^2 and G by s: same ranks, same weights, loss x s^2."""
    model, batches = make_mlp(), make_batches()
    scale = 2.0**10
    plain = calibrate(model, batches, mlp_loss, progress=False)
    scaled = calibrate(model, batches, lambda m, b: scale * mlp_loss(m, b), progress=False)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = compress(a, plain, retain=0.7, progress=False)
    rb = compress(b, scaled, retain=0.7, progress=False)
    assert ra.ranks == rb.ranks
    for name, rank in ra.ranks.items():
        wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
        cond = 1.0 if rank is None else 1e3  # damping 1e-3 bounds the factors' conditioning
        assert (wa - wb).abs().max() <= tolerance(torch.float64, HIDDEN, cond=cond) * wa.abs().max()
    assert rb.total_predicted_loss_increase == pytest.approx(
        scale**2 * ra.total_predicted_loss_increase, rel=tolerance(torch.float64, HIDDEN, cond=1e3)
    )
