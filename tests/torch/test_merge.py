"""torch/merge.py: mergeable cores (every layer kept dense adapts, starts at the dense output, merges back).

Model-level tests first, then ``MergeableLinear``, ``merge`` and
``merged_state_dict`` on one layer.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from jactus_linalg import break_even_rank
from jactus_linalg.torch import (
    JactusConfig,
    JactusLinear,
    calibrate,
    compress,
    core_parameters,
    load_compressed,
    merge,
    save_compressed,
)
from jactus_linalg.torch.compress import plan_compression
from jactus_linalg.torch.merge import MergeableLinear, has_unmerged_cores, merged_state_dict

from ..numerics import orthonormal, tolerance
from .models import hf_loss, llama_batches, mlp, mlp_batches, mlp_loss, tiny_llama


@pytest.fixture(scope="module")
def llama():
    model, batches = tiny_llama(), llama_batches()
    return model, batches, calibrate(model, batches, hf_loss, progress=False)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _train(model, batches, steps=3, lr=3e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        hf_loss(model, batches[step % len(batches)]).backward()
        opt.step()


@pytest.mark.parametrize("retain", [0.8, 1.0])
def test_mergeable_cores_start_exactly_at_the_dense_output(llama, retain):
    model, batches, stats = llama
    dense = copy.deepcopy(model)
    compressed = copy.deepcopy(model)
    report = compress(compressed, stats, retain=retain, progress=False)
    cores = [m for m in compressed.modules() if isinstance(m, MergeableLinear)]
    assert cores, "the budget keeps some layer dense"
    for mod in cores:
        assert torch.count_nonzero(mod.core.weight) == 0
        x_in = torch.randn(5, mod.in_features, generator=torch.Generator().manual_seed(1))
        plain = nn.functional.linear(x_in, mod.weight, mod.bias)
        assert torch.equal(mod(x_in), plain)  # W x + b + A 0 Bᵀ x, bit for bit
    if retain == 1.0:  # nothing factored: the model's outputs are untouched, bit for bit
        assert all(r.rank is None for r in report.layers)
        assert torch.equal(_logits(compressed, batches[0]), _logits(dense, batches[0]))


def test_every_dense_layer_has_an_orthonormal_core_at_break_even(llama):
    model, _, stats = llama
    compressed = copy.deepcopy(model)
    plan = plan_compression(copy.deepcopy(model), stats, progress=False)
    report = compress(compressed, stats, retain=0.8, progress=False)
    dense = [r for r in report.layers if r.rank is None]
    factored = [r for r in report.layers if r.rank is not None]
    assert dense and factored
    for r in dense:
        mod = compressed.get_submodule(r.name)
        assert isinstance(mod, MergeableLinear)
        assert r.dense_core == mod.rank
        # A and B: orthonormal bases of the layer's union factors at its break-even rank
        lp = plan.plans[r.name]
        assert lp.max_rank == break_even_rank(*r.shape)
        cut = lp.factorize(lp.max_rank)
        pairs = ((mod.left_proj.weight, cut.left), (mod.right_proj.weight.T, cut.right))
        for basis, factor in pairs:
            basis, factor = basis.double(), torch.as_tensor(factor).double()
            assert basis.shape == factor.shape
            eye = torch.eye(basis.shape[1], dtype=torch.float64)
            tol = tolerance(torch.float32, basis.shape[0])
            assert (basis.T @ basis - eye).abs().max().item() <= tol
            residual = factor - basis @ (basis.T @ factor)  # span(factor) inside span(basis)
            assert residual.norm().item() <= tol * factor.norm().item()
        assert not mod.left_proj.weight.requires_grad and not mod.right_proj.weight.requires_grad
    for r in factored:
        assert r.dense_core is None
        assert isinstance(compressed.get_submodule(r.name), JactusLinear)
    # deployed size: the report counts the merged model, not the training-time cores
    merge(compressed)
    assert report.params_after == sum(p.numel() for p in compressed.parameters())


def test_a_training_step_changes_only_the_cores(llama):
    model, batches, stats = llama
    compressed = copy.deepcopy(model)
    compress(compressed, stats, retain=0.8, progress=False)
    trainable = {n for n, p in compressed.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".core.weight") for n in trainable)
    assert {id(p) for p in core_parameters(compressed)} == {
        id(p) for p in compressed.parameters() if p.requires_grad
    }
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    _train(compressed, batches, steps=1)
    after = compressed.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable
    dense_cores = {
        f"{n}.core.weight" for n, m in compressed.named_modules() if isinstance(m, MergeableLinear)
    }
    assert dense_cores & changed, "the mergeable cores train"
    assert all(torch.count_nonzero(after[k]) > 0 for k in dense_cores & changed)


def test_merge_save_load_reproduces_the_tuned_logits(llama, tmp_path):
    model, batches, stats = llama
    compressed = copy.deepcopy(model)
    config = JactusConfig(retain=0.8, rank_pattern={}, target_modules="all-linear")
    compress(compressed, stats, config, progress=False)
    _train(compressed, batches)
    tuned = _logits(compressed, batches[0])
    names = [n for n, m in compressed.named_modules() if isinstance(m, MergeableLinear)]
    assert merge(compressed) is compressed
    assert not any(isinstance(m, MergeableLinear) for m in compressed.modules())
    for name in names:
        assert type(compressed.get_submodule(name)) is nn.Linear
    merged = _logits(compressed, batches[0])
    # W + A ΔC Bᵀ rounded once per layer: float32 rounding of the outputs, a few layers deep
    scale = tuned.abs().max().item()
    assert (merged - tuned).abs().max().item() <= tolerance(torch.float32, 48, c=50.0) * scale
    folder = save_compressed(compressed, tmp_path / "m")
    again = load_compressed(folder)  # rebuilt from the saved Hugging Face config
    assert torch.equal(_logits(again, batches[0]), merged)
    assert again.jactus_config == config


def test_save_refuses_an_unmerged_model_or_merges_on_request(llama, tmp_path):
    model, batches, stats = llama
    compressed = copy.deepcopy(model)
    compress(compressed, stats, retain=0.8, progress=False)
    _train(compressed, batches, steps=2)
    with pytest.raises(ValueError, match=r"unmerged mergeable core.*merge\(model\).*merge=True"):
        save_compressed(compressed, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    expected = merged_state_dict(compressed)
    folder = save_compressed(compressed, tmp_path / "m", merge=True)
    assert any(isinstance(m, MergeableLinear) for m in compressed.modules())  # left as it was
    again = load_compressed(folder)
    state = again.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_retain_one_without_cores_is_the_model_unchanged():
    model, batches = mlp(), mlp_batches()
    stats = calibrate(model, batches, mlp_loss, progress=False)
    original = copy.deepcopy(model)
    report = compress(model, stats, retain=1.0, dense_cores=False, trainable="none", progress=False)
    assert all(r.rank is None and r.dense_core is None for r in report.layers)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original.parameters(), strict=True))
    # with cores, untrained: merging gives back the very same weights
    cored = copy.deepcopy(original)
    compress(cored, stats, retain=1.0, progress=False)
    merge(cored)
    assert all(torch.equal(p, q) for p, q in zip(cored.parameters(), original.parameters(), strict=True))


def test_half_precision_model_with_float32_cores_merges_to_its_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    batches = llama_batches(n=2)
    stats = calibrate(model, batches, hf_loss, progress=False)
    compress(model, stats, retain=1.0, core_dtype="float32", progress=False)
    cores = [m for m in model.modules() if isinstance(m, MergeableLinear)]
    assert cores and all(m.core.weight.dtype == torch.float32 for m in cores)
    assert all(m.weight.dtype == torch.bfloat16 for m in cores)
    _train(model, batches, steps=1)
    assert torch.isfinite(_logits(model, batches[0]).float()).all()
    merge(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(_logits(model, batches[0]).float()).all()


def test_merge_needs_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch nn\.Module"):
        merge({"weight": torch.zeros(2, 2)})


# -- MergeableLinear on its own: dense weight + core in a frozen subspace -------

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
