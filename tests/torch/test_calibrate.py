"""calibrate(): statistics equal naive float64 references, model untouched, resume, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from jactus_linalg.torch import calibrate

from ..numerics import tolerance
from .models import hf_loss, llama_batches, mlp, mlp_batches, mlp_loss, tiny_llama, tiny_vit, vit_batches


def _naive_mlp_stats(model: nn.Sequential, batches):
    """Float64 references from stored activations and autograd, per layer index."""
    ref = {}
    for x, y in batches:
        acts = {}
        hooks = []
        for i, mod in enumerate(model):
            if isinstance(mod, nn.Linear):

                def keep(m, a, o, i=i, acts=acts):
                    o.retain_grad()
                    acts[i] = (a[0].detach(), o)

                hooks.append(mod.register_forward_hook(keep))
        loss = mlp_loss(model, (x, y))
        model.zero_grad()
        loss.backward()
        for h in hooks:
            h.remove()
        for i, (inp, out) in acts.items():
            g = out.grad
            cx, cg, gx, n = ref.get(i, (0, 0, 0, 0))
            ref[i] = (cx + inp.T @ inp, cg + g.T @ g, gx + g.T @ inp, n + inp.shape[0])
    model.zero_grad(set_to_none=True)
    return {i: (cx / n, cg / n, gx / n) for i, (cx, cg, gx, n) in ref.items()}


def test_statistics_match_naive_reference():
    model, batches = mlp(), mlp_batches()
    ref = _naive_mlp_stats(copy.deepcopy(model), batches)
    # the loss's own gradients (the per-token scale is tested in test_measure.py)
    stats = calibrate(model, batches, mlp_loss, grad_scale="none", progress=False)
    assert set(stats) == {"0", "2", "4", "6"}  # all-linear on a plain Sequential
    for i, (cx, cg, gx) in ref.items():
        layer = stats.layer(str(i))
        tol = tolerance(torch.float64, 64, c=100)
        for got, want in ((layer.input_cov, cx), (layer.grad_cov, cg), (layer.grad_mean, gx)):
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= tol * scale


def test_shared_inputs_are_stored_once():
    stats = calibrate(tiny_llama(), llama_batches(), hf_loss, progress=False)
    groups = stats.input_groups()
    q = "model.layers.0.self_attn.q_proj"
    assert groups[q] == [q, "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    gate = "model.layers.1.mlp.gate_proj"
    assert groups[gate] == [gate, "model.layers.1.mlp.up_proj"]
    assert len(stats.inputs) == 8  # 4 distinct inputs per decoder layer
    assert stats.layer("model.layers.0.self_attn.k_proj").input_cov is stats.layer(q).input_cov or (
        torch.equal(stats.layer("model.layers.0.self_attn.k_proj").input_cov, stats.layer(q).input_cov)
    )


def test_padding_tokens_are_excluded():
    batches = llama_batches(n=1)
    stats = calibrate(tiny_llama(), batches, hf_loss, progress=False)
    valid = int(batches[0]["attention_mask"].sum())
    assert stats.layer("model.layers.0.self_attn.q_proj").n_samples == valid


def test_statistics_are_float64_for_a_float32_model():
    stats = calibrate(tiny_llama(), llama_batches(n=1), hf_loss, progress=False)
    layer = stats.layer("model.layers.0.mlp.down_proj")
    assert layer.input_cov.dtype == layer.grad_cov.dtype == layer.grad_mean.dtype == torch.float64


def test_calibration_leaves_model_unchanged():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calibrate(model, llama_batches(), hf_loss, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_nonfinite_activation_names_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"`4:input_cov`|4:input_cov|non-finite"):
        calibrate(model, mlp_batches(n=1), lambda m, b: mlp_loss(m, b).nan_to_num(), progress=False)


def test_nonfinite_loss_raises():
    with pytest.raises(ValueError, match="non-finite loss"):
        calibrate(mlp(), mlp_batches(n=1), lambda m, b: mlp_loss(m, b) * float("nan"), progress=False)


def test_checkpoint_resume_gives_same_statistics(tmp_path):
    batches = llama_batches(n=4)
    full = calibrate(tiny_llama(), batches, hf_loss, progress=False)
    ckpt = tmp_path / "stats.safetensors"
    calibrate(tiny_llama(), batches[:2], hf_loss, checkpoint=ckpt, checkpoint_every=1, progress=False)
    resumed = calibrate(tiny_llama(), batches, hf_loss, checkpoint=ckpt, checkpoint_every=1, progress=False)
    assert resumed.n_batches == 4
    for name in full:
        a, b = full.layer(name), resumed.layer(name)
        assert a.n_samples == b.n_samples
        for x, y in ((a.input_cov, b.input_cov), (a.grad_cov, b.grad_cov), (a.grad_mean, b.grad_mean)):
            assert torch.allclose(x, y, rtol=tolerance(torch.float64, 96), atol=0)


def test_stats_roundtrip_through_safetensors(tmp_path):
    stats = calibrate(tiny_vit(), vit_batches(), hf_loss, progress=False)
    path = stats.save(tmp_path / "s.safetensors")
    again = type(stats).load(path)
    assert list(again) == list(stats)
    for name in stats:
        a, b = stats.layer(name), again.layer(name)
        assert torch.equal(a.input_cov, b.input_cov)
        assert torch.equal(a.grad_cov, b.grad_cov)
        assert torch.equal(a.grad_mean, b.grad_mean)


def test_qr_mode_matches_gram_mode():
    model, batches = mlp(), mlp_batches()
    gram = calibrate(model, batches, mlp_loss, progress=False)
    qr = calibrate(model, batches, mlp_loss, mode="qr", progress=False)
    for name in gram:
        cx = gram.layer(name).input_cov
        root = qr.layer(name).input_cov.root
        rebuilt = root.T @ root
        assert (rebuilt - cx).abs().max().item() <= tolerance(torch.float64, 64, c=100) * cx.abs().max().item()


def test_bf16_model_calibrates_in_float64():
    model = tiny_llama(dtype=torch.bfloat16)
    stats = calibrate(model, llama_batches(n=1), hf_loss, progress=False)
    layer = stats.layer("model.layers.0.self_attn.o_proj")
    assert layer.input_cov.dtype == torch.float64
    assert np.isfinite(layer.grad_cov.numpy()).all()
