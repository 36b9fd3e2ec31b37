"""compress(): budget accounting, dense reproduction, method ordering, errors, three model kinds."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import jactus_linalg as jl
from jactus_linalg.torch import JactusLinear, calibrate, compress, merge
from jactus_linalg.torch.compress import allocate, plan_compression, replace_layers

from ..numerics import tolerance
from .models import (
    MODEL_FAMILIES,
    hf_loss,
    llama_batches,
    mlp,
    mlp_batches,
    mlp_loss,
    tiny_llama,
)

MODELS = MODEL_FAMILIES


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for key, (make, batches, loss) in MODELS.items():
        model = make()
        out[key] = (model, calibrate(model, batches(), loss, progress=False), batches()[0], loss)
    return out


def _largest_unit(report) -> int:
    return max(m + n + 2 * min(m, n) + 1 for m, n in (r.shape for r in report.layers))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["jactus", "kfac", "svd-llm", "svd"])
@pytest.mark.parametrize("retain", [0.6, 0.8, 0.9])
def test_retain_is_met_within_one_unit(calibrated, kind, method, retain):
    model, stats, _, _ = calibrated[kind]
    model = copy.deepcopy(model)
    total = sum(p.numel() for p in model.parameters())
    report = compress(model, stats, retain=retain, method=method, progress=False)
    merge(model)  # the budget counts the deployed model: mergeable cores folded in
    after = sum(p.numel() for p in model.parameters())
    assert report.params_before == total
    assert report.params_after == after
    assert report.retain_achieved == after / total
    assert after <= retain * total  # never over budget
    assert retain * total - after <= _largest_unit(report) * 2  # and short by at most ~a unit
    assert sum(r.params_after for r in report.layers) == sum(
        p.numel() for n, p in model.named_parameters() if any(n.startswith(r.name + ".") for r in report.layers)
    )


@pytest.mark.parametrize("kind", list(MODELS))
def test_retain_one_keeps_the_dense_model(calibrated, kind):
    model, stats, batch, loss = calibrated[kind]
    model = copy.deepcopy(model)
    before = loss(model, batch).item()
    report = compress(model, stats, retain=1.0, progress=False)
    assert all(r.rank is None for r in report.layers)
    assert not any(isinstance(m, JactusLinear) for m in model.modules())
    assert loss(model, batch).item() == before


def test_exactly_low_rank_weights_are_reproduced():
    """Weights of rank 2 (below every break-even rank): rank-2 factors reproduce the outputs."""
    model, batches = mlp(), mlp_batches()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                m, n = mod.weight.shape
                left = torch.randn(m, 2, generator=gen, dtype=torch.float64)
                mod.weight.copy_(left @ torch.randn(2, n, generator=gen, dtype=torch.float64))
    stats = calibrate(model, batches, mlp_loss, progress=False)
    x = batches[0][0]
    dense = model(x)
    compressed = copy.deepcopy(model)
    plan = plan_compression(compressed, stats, method="kfac", progress=False)
    replace_layers(compressed, plan, dict.fromkeys(plan.plans, 2), retain=1.0)
    cond = 1e3  # damping 1e-3 bounds the whitening's condition number
    tol = tolerance(torch.float64, 64, cond=cond)
    assert (compressed(x) - dense).abs().max().item() <= tol * dense.abs().max().item()


#: the norm each method minimises at a given rank, and the whitening it reads: (input side, gradient side)
OWN_NORM = {"svd": (False, False), "svd-llm": (True, False), "kfac": (True, True)}


def _norm_condition(*ops) -> float:
    """``κ(S_g) κ(S_x)``: the condition numbers of the Cholesky factors that define a norm (float64 SVD)."""
    cond = 1.0
    for op in ops:
        if op is not None:
            assert op.method == "cholesky"
            cond *= float(np.linalg.cond(op.lower.double().numpy()))
    return cond


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_baseline_is_optimal_in_the_norm_it_minimises(seed):
    """At equal rank, each method's factors are the best rank-r approximation in its own norm.

    Eckart-Young in a whitened norm: ``svd`` minimises ``‖ΔW‖_F``, ``svd-llm``
    minimises ``‖ΔW S_x‖_F`` (input whitening), ``kfac`` minimises
    ``‖S_gᵀ ΔW S_x‖_F`` (the K-FAC curvature norm, twice the predicted loss
    rise). Every method's factors at rank ``r`` have a core of at most
    ``r x r``, so they are rank-r competitors in every norm: no method (jactus
    included, whose task directions trade curvature error for task signal)
    beats the owner of a norm in that norm. Checked for every layer and rank
    on three seeded models and calibration sets; the tolerance is float64's
    rounding of the whitened weight, scaled by the whitening's condition
    number.
    """
    model, batches = mlp(seed=seed), mlp_batches(seed=seed + 1)
    stats = calibrate(model, batches, mlp_loss, progress=False)
    plans = {
        method: plan_compression(model, stats, method=method, progress=False)
        for method in ("jactus", "kfac", "svd-llm", "svd")
    }
    modules = dict(model.named_modules())
    strictly_better = dict.fromkeys(OWN_NORM, False)
    for name in plans["kfac"].plans:
        weight = modules[name].weight.detach()
        m, n = weight.shape
        for rank in range(1, plans["kfac"].plans[name].max_rank + 1):
            cuts = {}
            for method, plan in plans.items():
                lp = plan.plans[name]
                cut = lp.factorize(rank, dtype=lp.core.dtype)
                assert cut.core.shape[0] <= rank and cut.core.shape[1] <= rank  # a rank-<=r competitor
                cuts[method] = cut
            for owner, (use_x, use_g) in OWN_NORM.items():
                lp = plans[owner].plans[name]
                norm_ops = {"input_cov": lp.input_op if use_x else None, "grad_cov": lp.grad_op if use_g else None}
                assert (lp.input_op is not None) == use_x and (lp.grad_op is not None) == use_g
                cond = _norm_condition(lp.input_op, lp.grad_op)
                scale = math.sqrt(lp.total_energy)  # ‖whitened W‖_F in the owner's norm
                tol = tolerance(torch.float64, max(m, n), cond=cond) * scale
                own = jl.curvature_error(weight, cuts[owner].left, cuts[owner].core, cuts[owner].right, **norm_ops)
                assert abs(own - cuts[owner].error) <= tol  # the plan reports the error in its own norm
                for method, cut in cuts.items():
                    other = jl.curvature_error(weight, cut.left, cut.core, cut.right, **norm_ops)
                    assert own <= other + tol, (owner, method, name, rank, own, other)
                    strictly_better[owner] |= other > own + 100 * tol
    # the statistics are informative: each norm separates its owner from some other method
    assert all(strictly_better.values()), strictly_better


def test_kfac_is_the_floor_of_jactus(calibrated):
    """tau = 0 is optimal in the curvature norm per layer; same ranks, so it can only be lower."""
    model, stats, _, _ = calibrated["mlp"]
    kfac = plan_compression(model, stats, method="kfac", progress=False)
    jac = plan_compression(model, stats, method="jactus", task_fraction=0.5, progress=False)
    for name, lp in kfac.plans.items():
        # both errors are Pythagoras on the same whitened weight M: rounding of ‖M‖_F in float64
        tol = tolerance(torch.float64, max(lp.shape), cond=_norm_condition(lp.input_op, lp.grad_op))
        for r in range(1, lp.max_rank + 1):
            assert lp.factorize(r).error <= jac.plans[name].factorize(r).error + tol * math.sqrt(lp.total_energy)


def test_report_lists_every_layer(calibrated):
    model, stats, _, _ = calibrated["vit"]
    report = compress(copy.deepcopy(model), stats, retain=0.8, progress=False)
    assert [r.name for r in report.layers] == list(stats)
    assert report.total_predicted_loss_increase > 0
    assert "retain" in report.table()
    d = report.to_dict()
    assert d["total_predicted_loss_increase"] == report.total_predicted_loss_increase


def test_uniform_allocation_is_an_option(calibrated):
    model, stats, _, _ = calibrated["llama"]
    glob = compress(copy.deepcopy(model), stats, retain=0.7, progress=False)
    unif = compress(copy.deepcopy(model), stats, retain=0.7, allocation="uniform", progress=False)
    assert unif.retain_achieved <= 0.7
    assert glob.total_predicted_loss_increase <= unif.total_predicted_loss_increase


@pytest.mark.parametrize("retain", [0.0, -0.5, 1.5, float("nan")])
def test_bad_retain_raises(calibrated, retain):
    model, stats, _, _ = calibrated["mlp"]
    with pytest.raises(ValueError, match="retain"):
        compress(copy.deepcopy(model), stats, retain=retain, progress=False)


def test_retain_below_non_target_parameters_raises(calibrated):
    model, stats, _, _ = calibrated["llama"]
    with pytest.raises(ValueError, match=r"too small.*outside the compressed layers"):
        compress(copy.deepcopy(model), stats, retain=0.2, progress=False)


def test_compressing_twice_raises(calibrated):
    model, stats, _, _ = calibrated["mlp"]
    model = copy.deepcopy(model)
    compress(model, stats, retain=0.8, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress(model, stats, retain=0.8, progress=False)


def test_stats_from_another_model_raise(calibrated):
    _, llama_stats, _, _ = calibrated["llama"]
    model, _, _, _ = calibrated["vit"]
    with pytest.raises(ValueError, match="another model"):
        compress(copy.deepcopy(model), llama_stats, retain=0.8, progress=False)


def test_stats_with_missing_layers_raise(calibrated):
    model, stats, _, _ = calibrated["mlp"]
    partial = copy.deepcopy(stats)
    del partial.layers["2"]
    with pytest.raises(ValueError, match="missing layers"):
        compress(copy.deepcopy(model), partial, retain=0.8, progress=False)


def test_nonfinite_statistics_name_the_layer(calibrated):
    model, stats, _, _ = calibrated["mlp"]
    bad = copy.deepcopy(stats)
    bad.grad_sums["4"][0, 0] = float("nan")
    # G is read only by the gradient task directions (the covariance ones use C_g, C_x)
    with pytest.raises(ValueError, match=r"layer `4`.*non-finite"):
        compress(copy.deepcopy(model), bad, retain=0.8, task_directions="gradient", progress=False)


def test_unknown_method_raises(calibrated):
    model, stats, _, _ = calibrated["mlp"]
    with pytest.raises(ValueError, match="method"):
        compress(copy.deepcopy(model), stats, method="pca", progress=False)


def test_allocation_is_monotone_in_retain(calibrated):
    model, stats, _, _ = calibrated["llama"]
    plan = plan_compression(model, stats, progress=False)
    previous = None
    for retain in (0.6, 0.7, 0.8, 0.9):
        ranks = allocate(plan, retain)
        size = sum(
            (r or 10**9) for r in ranks.values()
        )
        if previous is not None:
            assert size >= previous
        previous = size


def test_bf16_model_compresses_and_stays_bf16():
    model = tiny_llama(dtype=torch.bfloat16)
    batches = llama_batches(n=2)
    stats = calibrate(model, batches, hf_loss, progress=False)
    compress(model, stats, retain=0.8, progress=False)
    cores = [m.core.weight for m in model.modules() if isinstance(m, JactusLinear)]
    assert cores and all(c.dtype == torch.bfloat16 for c in cores)
    assert torch.isfinite(model(**batches[0]).logits).all()


def test_keep_dense_is_gone_with_a_clear_error(calibrated):
    model, stats, _, _ = calibrated["vit"]
    with pytest.raises(TypeError, match=r"keep_dense.*mergeable core"):
        compress(copy.deepcopy(model), stats, retain=0.8, keep_dense=False, progress=False)


def test_each_covariance_is_factored_once(calibrated, monkeypatch):
    """Layers sharing an input (q, k, v; gate, up) whiten it once, and no
    covariance is decomposed twice: one whitening per input group and one per
    gradient covariance, and exactly one Cholesky per whitening (C + delta I;
    the positive-semidefiniteness certificate reuses its factor)."""
    import importlib

    import jactus_linalg._backend as backend
    import jactus_linalg.whitening as whitening_module

    # the package re-exports the function `compress`, which hides the module
    compress_module = importlib.import_module("jactus_linalg.torch.compress")

    model, stats, _, _ = calibrated["llama"]
    calls = {"input_cov": 0, "grad_cov": 0, "cholesky": 0}
    real_operator, real_cholesky = compress_module.whitening_operator, backend.cholesky_lower

    def counting_operator(cov, **kw):
        calls[kw["name"]] += 1
        return real_operator(cov, **kw)

    def counting_cholesky(xp, a):
        calls["cholesky"] += 1
        return real_cholesky(xp, a)

    monkeypatch.setattr(compress_module, "whitening_operator", counting_operator)
    monkeypatch.setattr(whitening_module, "cholesky_lower", counting_cholesky)
    plan_compression(copy.deepcopy(model), stats, method="jactus", progress=False)
    groups = {stats.layers[n].input_group for n in stats.layers}
    assert len(groups) < len(stats.layers)  # the model does share inputs
    assert calls["input_cov"] == len(groups)
    assert calls["grad_cov"] == len(stats.layers)
    assert calls["cholesky"] == len(groups) + len(stats.layers)


@pytest.mark.parametrize("task_directions", ["covariance", "gradient"])
def test_task_directions_reach_compress_and_the_budget_holds(calibrated, task_directions):
    """Both task-direction modes plan through plan_compression and meet the same budget."""
    model, stats, _, _ = calibrated["llama"]
    plan = plan_compression(copy.deepcopy(model), stats, task_directions=task_directions, progress=False)
    assert plan.task_directions == task_directions
    assert {p.task_source for p in plan.plans.values()} == {task_directions}
    ranks = allocate(plan, 0.8)
    after = plan.total_params - plan.target_dense_params + sum(
        plan.plans[n].shape[0] * plan.plans[n].shape[1] if r is None else jl.factor_params(*plan.plans[n].shape, r)
        for n, r in ranks.items()
    )
    assert after <= 0.8 * plan.total_params
    with pytest.raises(ValueError, match=r"`retain` must lie in \(0, 1\]"):
        allocate(plan, 1.5)
