"""Predicted loss in nats: calibrate's per-token gradient scale and the measured rise."""

from __future__ import annotations

import copy

import pytest
import torch

from jactus_linalg.torch import calibrate, compress
from jactus_linalg.torch.measure import mean_token_loss, measure_loss_increase

from ..numerics import tolerance
from .models import llama_batches, mlp, mlp_batches, mlp_loss, tiny_llama


def _self_labelled(model, n_batches=16, batch=512, seed=3):
    """Inputs labelled by sampling the model's own predictive distribution.

    Then the model is at the population minimum of its expected loss, and
    the Fisher that K-FAC approximates equals the expected Hessian: the
    second-order prediction is the right one to compare with.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = 2.0 * torch.randn(batch, 24, generator=g, dtype=torch.float64)
        with torch.no_grad():
            p = torch.softmax(model(x), dim=-1)
        out.append((x, torch.multinomial(p, 1, generator=g).squeeze(1)))
    return out


def test_predicted_loss_is_in_nats_of_mean_token_loss():
    """Predicted and measured rise agree within a factor 3 (they are 1.4e-4 and 1.2e-4 here).

    Without the per-token scale (``grad_scale="none"``) the prediction is
    smaller by the batch size squared (512² here), which this check would catch.
    """
    model = mlp()
    batches = _self_labelled(model)
    results = {}
    for scale in ("tokens", "none"):
        stats = calibrate(model, batches, mlp_loss, targets=["2"], grad_scale=scale, progress=False)
        compressed = copy.deepcopy(model)
        report = compress(compressed, stats, retain=0.5, progress=False)
        assert report.ranks["2"] is not None and report.ranks["2"] < 16
        measured = measure_loss_increase(model, compressed, batches, mlp_loss)
        results[scale] = (report.total_predicted_loss_increase, measured.increase)
    predicted, measured = results["tokens"]
    assert measured > 0
    assert measured / 3 <= predicted <= 3 * measured
    raw, _ = results["none"]
    assert raw == pytest.approx(predicted / 512**2, rel=1e-6)


def test_tokens_scale_multiplies_gradients_by_the_batch_tokens():
    """``"tokens"``: C_g scales by T² and G by T per batch (T = unmasked positions)."""
    model, batches = tiny_llama(), llama_batches(n=1)
    plain = calibrate(copy.deepcopy(model), batches, lambda m, b: m(**b).loss, grad_scale="none", progress=False)
    scaled = calibrate(copy.deepcopy(model), batches, lambda m, b: m(**b).loss, progress=False)
    assert scaled.meta["grad_scale"] == "tokens" and plain.meta["grad_scale"] == "none"
    t = float(batches[0]["attention_mask"].sum())
    name = "model.layers.0.mlp.down_proj"
    a, b = plain.layer(name), scaled.layer(name)
    tol = tolerance(torch.float64, 96, c=100)
    assert torch.allclose(b.grad_cov, t**2 * a.grad_cov, rtol=tol, atol=0)
    assert torch.allclose(b.grad_mean, t * a.grad_mean, rtol=tol, atol=tol * float(b.grad_mean.abs().max()))
    assert torch.equal(a.input_cov, b.input_cov)
    # a callable gives the number of loss terms T explicitly: a loss term then spans R/T of
    # the layer's R rows, and the gradients carry sqrt(T R) (C_g scales by T R)
    terms = calibrate(
        copy.deepcopy(model), batches, lambda m, b: m(**b).loss, grad_scale=lambda batch: 7.0,
        progress=False,
    )
    assert torch.allclose(terms.layer(name).grad_cov, 7.0 * t * a.grad_cov, rtol=tol, atol=0)


def test_grad_scale_is_checked():
    with pytest.raises(ValueError, match="`grad_scale` must be 'tokens'"):
        calibrate(mlp(), mlp_batches(n=1), mlp_loss, grad_scale="mean", progress=False)
    with pytest.raises(ValueError, match=r"`grad_scale\(batch\)` must be a positive number"):
        calibrate(mlp(), mlp_batches(n=1), mlp_loss, grad_scale=lambda b: 0.0, progress=False)


def test_mean_token_loss_weights_batches_by_tokens():
    model = mlp()
    batches = mlp_batches(n=2)
    losses = [float(mlp_loss(model, b).detach()) for b in batches]
    got, count = mean_token_loss(model, batches, mlp_loss, tokens=lambda b: float(len(b[0]) * (1 + (b is batches[1]))))
    n = len(batches[0][0])
    assert count == 3 * n
    assert got == pytest.approx((losses[0] + 2 * losses[1]) / 3, rel=1e-12)
    same = measure_loss_increase(model, copy.deepcopy(model), batches, mlp_loss)
    assert same.increase == 0.0
    with pytest.raises(ValueError, match="no batch"):
        mean_token_loss(model, [], mlp_loss)
