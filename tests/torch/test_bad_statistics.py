"""Bad statistics on a small model: dead units, fewer tokens than features, no gradient, NaN.

Each test builds the failure users of SVD-LLM, CorDA and ASVD hit and
asserts what the package does about it: a finite, reported result or an
error naming the layer and statistic. ``docs/failure-modes.md`` lists them;
the core-level cases are in ``tests/test_reliability.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jactus_linalg.torch import (
    JactusLinear,
    calibrate,
    compress,
)

from ..numerics import tolerance
from .tiny_mlp import (
    HIDDEN,
    IN,
    OUT,
    layer_report,
    make_batches,
    make_mlp,
    mlp_loss,
)


@pytest.mark.parametrize("whitening", ["cholesky", "eigh"])
def test_dead_input_unit_is_damped_and_reported(whitening):
    """Feature 3 is zero in every batch, so C_x is exactly singular.

    Damping makes it invertible, and the report says so.
    """
    model, batches = make_mlp(), make_batches(dead=3)
    stats = calibrate(model, batches, mlp_loss, progress=False)
    cx = stats.layer("0").input_cov
    assert torch.all(cx[3] == 0) and torch.all(cx[:, 3] == 0)
    compressed = copy.deepcopy(model)
    report = compress(compressed, stats, retain=0.7, whitening=whitening, progress=False)
    assert torch.isfinite(compressed(batches[0][0])).all()
    info = layer_report(report, "0").input_whitening
    mean_diag = torch.diagonal(cx).mean().item()
    assert info.relative_damping == 1e-3
    assert info.damping == pytest.approx(1e-3 * mean_diag, rel=tolerance(torch.float64, IN))
    # the dead direction adds nothing: at most IN - 1 directions are resolved
    assert info.effective_rank <= IN - 1 + tolerance(torch.float64, IN)
    if whitening == "eigh":
        assert info.numerical_rank == IN - 1
        assert any(f"rank {IN - 1} of {IN}" in note for note in layer_report(report, "0").notes)
    # asking for no damping is a clear error, naming the layer and what to do
    with pytest.raises(
        ValueError, match=r"layer `0`: `input_cov` is singular .*damping=0.*Raise `damping`"
    ):
        compress(
            copy.deepcopy(model),
            stats,
            retain=0.7,
            damping=0.0,
            whitening=whitening,
            progress=False,
        )


def test_fewer_tokens_than_features_still_compresses():
    """Five calibration tokens for 12 and 32 features: every covariance is rank <= 5."""
    model, batches = make_mlp(), make_batches(n=1, size=5)
    stats = calibrate(model, batches, mlp_loss, progress=False)
    compressed = copy.deepcopy(model)
    report = compress(compressed, stats, retain=0.6, progress=False)
    assert torch.isfinite(compressed(batches[0][0])).all()
    for layer in report.layers:
        for info in (layer.input_whitening, layer.grad_whitening):
            assert info.damping > 0
            assert info.effective_rank <= 5 + tolerance(torch.float64, HIDDEN)
    assert report.total_predicted_loss_increase is not None
    assert all(r.predicted_loss_increase >= 0 for r in report.layers)


class _Branches(nn.Module):
    """The gradient of ``b`` is zero (``mode="zero"``) or never computed (``"detached"``)."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.a, self.b, self.c = (
            nn.Linear(IN, HIDDEN),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Linear(HIDDEN, OUT),
        )
        self.double()

    def forward(self, x):
        h = torch.relu(self.a(x))
        side = self.b(h)
        if self.mode == "zero":
            return self.c(h) + 0.0 * side.sum(-1, keepdim=True)
        return self.c(h)  # `side` does not reach the loss


@pytest.mark.parametrize(
    ("mode", "why"), [("zero", "identically zero"), ("detached", "never computed")]
)
def test_layer_without_gradient_gets_a_clear_error(mode, why):
    """No gradient reached layer `b`: gradient-weighted methods refuse it and say what to do."""
    model, batches = _Branches(mode), make_batches()
    stats = calibrate(model, batches, mlp_loss, progress=False)
    for method in ("jactus", "kfac"):
        with pytest.raises(
            ValueError, match=rf"layer `b`: no loss gradient.*{why}.*`exclude=`.*svd-llm"
        ):
            compress(copy.deepcopy(model), stats, retain=0.7, method=method, progress=False)
    # methods that use no gradient still work; the report says what is missing
    for method in ("svd-llm", "svd"):
        compressed = copy.deepcopy(model)
        report = compress(compressed, stats, retain=0.7, method=method, progress=False)
        assert torch.isfinite(compressed(batches[0][0])).all()
        b = layer_report(report, "b")
        assert b.predicted_loss_increase is None and b.grad_whitening is None
        assert any("no loss gradient" in note for note in b.notes)
    # the advice works: excluded, `b` stays dense and JACTUS compresses the rest
    stats = calibrate(model, batches, mlp_loss, exclude=["b"], progress=False)
    compressed = copy.deepcopy(model)
    compress(compressed, stats, retain=0.8, progress=False)
    assert type(compressed.b) is nn.Linear and isinstance(compressed.a, JactusLinear)


def test_layer_never_called_gets_advice():
    """A target the forward pass never calls has no statistics; the error says to exclude it."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.c = (
                nn.Linear(IN, HIDDEN),
                nn.Linear(HIDDEN, HIDDEN),
                nn.Linear(HIDDEN, OUT),
            )
            self.double()

        def forward(self, x):
            return self.c(torch.relu(self.a(x)))

    model = Unused()
    stats = calibrate(model, make_batches(), mlp_loss, progress=False)
    assert "unused" not in stats
    with pytest.raises(ValueError, match=r"\['unused'\].*never called.*`exclude=`"):
        compress(copy.deepcopy(model), stats, retain=0.8, progress=False)


# --- non-finite values ------------------------------------------------------------


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nonfinite_gradient_names_layer_and_statistic():
    model = make_mlp()

    def loss(m, batch):
        x, y = batch
        h = m[1](m[0](x))
        out = m[4](m[3](m[2](_NanGrad.apply(h))))  # NaN flows back into layer 0's output
        return nn.functional.cross_entropy(out, y)

    with pytest.raises(ValueError, match=r"layer `0`, output gradient.*`0:grad_cov`.*NaN"):
        calibrate(model, make_batches(n=1), loss, progress=False)


def test_nonfinite_activation_names_layer_and_statistic():
    """NaN in the data reaching layer `2` (from outside the targets) names `2:input_cov`."""
    model = make_mlp()

    def loss(m, batch):
        x, y = batch
        h = m[1](m[0](x))
        h = h.clone()
        h[0, 0] = float("nan")
        return nn.functional.cross_entropy(m[4](m[3](m[2](h))).nan_to_num(), y)

    with pytest.raises(ValueError, match=r"layer `2`, input activations.*`2:input_cov`.*1 NaN"):
        calibrate(model, make_batches(n=1), loss, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_is_refused_naming_the_layer(value):
    """Calibrate and compress refuse a target whose weight or bias is not finite.

    Nothing is substituted and no layer is replaced.
    """
    model, batches = make_mlp(), make_batches()
    stats = calibrate(model, batches, mlp_loss, progress=False)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[2].weight[1, 1] = value
    with pytest.raises(ValueError, match=r"layer `2`: `weight` contains non-finite values"):
        calibrate(bad, batches, mlp_loss, progress=False)
    with pytest.raises(ValueError, match=r"layer `2`: `weight` contains non-finite values"):
        compress(bad, stats, retain=0.7, progress=False)
    assert not any(isinstance(m, JactusLinear) for m in bad.modules())  # nothing was replaced
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[4].bias[0] = value
    with pytest.raises(ValueError, match=r"layer `4`: `bias` contains non-finite values"):
        compress(bad, stats, retain=0.7, progress=False)


def test_half_precision_factor_overflow_is_refused():
    """Whitened factors S^-T U can exceed float16's range: refused by name, never stored as Inf."""
    model, batches = make_mlp(), make_batches()
    tiny = calibrate(model, batches, lambda m, b: 1e-6 * mlp_loss(m, b), progress=False)  # C_g ~ 1e-12
    half = model.half()
    with pytest.raises(
        ValueError,
        match=r"layer `\d`: the rank-\d+ `left` factor overflows.*float16.*basis='orthonormal'",
    ):
        compress(copy.deepcopy(half), tiny, retain=0.7, basis="whitened", progress=False)
    compressed = copy.deepcopy(half)
    compress(compressed, tiny, retain=0.7, progress=False)  # orthonormal factors are bounded
    assert all(torch.isfinite(p).all() for p in compressed.parameters())
