"""Tutorial: the same core calls on torch tensors (CPU), checked against numpy.

One function runs the calls of ``docs/examples/tutorial_core_numpy.py`` on
whatever arrays it is given (statistics, whitening, the four special cases of
``projected_lowrank``, ``jactus_layer``, ``plan_layer`` + ``allocate_ranks``).
It runs three times on the same data: numpy float64 (the reference), torch
float64 and torch float32 (statistics accumulated in float32 on request).
Reconstructions ``A C Bᵀ`` are compared (individual factors are only defined
up to a change of basis), with tolerances ``10 n eps(dtype) kappa(Sx) kappa(Sg)``.

Shown on ``docs/tutorials/core.md``.

Run: ``python docs/examples/tutorial_core_torch.py``
"""

from __future__ import annotations

# --8<-- [start:pipeline]
import numpy as np
import torch

from jactus_linalg import (
    CrossMomentAccumulator,
    MomentAccumulator,
    allocate_ranks,
    jactus_layer,
    layer_units,
    plan_layer,
    projected_lowrank,
    whiten,
)

RANK, N_TOKENS, BUDGET = 8, 2048, 0.3


def make_layer(rng: np.random.Generator, m: int, n: int, decay: float):
    """The same construction as in tutorial_core_numpy.py (numpy float64)."""
    weight = (
        rng.standard_normal((m, n))
        * np.geomspace(1.0, decay, n)
        @ np.linalg.qr(rng.standard_normal((n, n)))[0]
    )
    mixing = rng.standard_normal((n, n)) * np.geomspace(1, 0.05, n)  # correlated features
    x = rng.standard_normal((N_TOKENS, n)) @ mixing
    task = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) / n
    g = x @ task.T + 0.3 * rng.standard_normal((N_TOKENS, m))
    return weight, x, g


def pipeline(weight, x, g, stats_dtype=None):
    """Statistics, whitening and factorizations of one layer, for numpy or torch arrays."""
    m, n = weight.shape
    input_acc = MomentAccumulator(n, dtype=stats_dtype)  # None: float64 on CPU, float32 on CUDA
    root_acc = MomentAccumulator(n, mode="qr", dtype=stats_dtype)
    grad_acc = MomentAccumulator(m, dtype=stats_dtype)
    mean_acc = CrossMomentAccumulator(m, n, dtype=stats_dtype)
    step = x.shape[0] // 4
    for i in range(0, x.shape[0], step):  # 4 batches
        input_acc.update(x[i : i + step])
        root_acc.update(x[i : i + step])
        grad_acc.update(g[i : i + step])
        mean_acc.update(g[i : i + step], x[i : i + step])
    covs = {"input_cov": input_acc.result(), "grad_cov": grad_acc.result()}
    return {
        "whiten(input_cov).factor": whiten(covs["input_cov"]).factor,  # unique for eigh
        "truncated SVD": projected_lowrank(weight, RANK),
        "SVD-LLM": projected_lowrank(weight, RANK, input_cov=covs["input_cov"]),
        "two-sided whitened SVD": projected_lowrank(weight, RANK, **covs),
        "  same, from the QR root": projected_lowrank(
            weight, RANK, input_cov=root_acc.result(), grad_cov=covs["grad_cov"]
        ),
        "JACTUS (jactus_layer)": jactus_layer(weight, RANK, **covs, grad_mean=mean_acc.result()),
    }


def allocation(layers):
    """plan_layer on each layer, then one global allocate_ranks; returns the ranks."""
    units = []
    for weight, x, g in layers:
        n_tok = x.shape[0]
        plan = plan_layer(
            weight, input_cov=x.T @ x / n_tok, grad_cov=g.T @ g / n_tok, grad_mean=g.T @ x / n_tok
        )
        units.append(layer_units(plan.gains, *plan.shape, plan.total_energy))  # numpy arrays
    return allocate_ranks([u[0] for u in units], [u[1] for u in units], BUDGET)


rng = np.random.default_rng(0)
layers = [make_layer(rng, m, 64, decay) for m, decay in ((48, 1e-2), (64, 1e-1), (96, 1e-3))]
as_torch = {
    "torch float64": [tuple(torch.from_numpy(a) for a in lay) for lay in layers],
    "torch float32": [tuple(torch.from_numpy(a).float() for a in lay) for lay in layers],
}
reference = pipeline(*layers[0])  # numpy float64
runs = {
    "torch float64": pipeline(*as_torch["torch float64"][0]),
    "torch float32": pipeline(*as_torch["torch float32"][0], stats_dtype="float32"),
}
# --8<-- [end:pipeline]


def product(res) -> np.ndarray:
    """``A C Bᵀ`` as a float64 numpy array (or the array itself for a plain factor)."""
    if not hasattr(res, "core"):
        return np.asarray(res, dtype=np.float64)
    left, core, right = (
        t.double().numpy() if isinstance(t, torch.Tensor) else t
        for t in (res.left, res.core, res.right)
    )
    return left @ core @ right.T


def main() -> None:
    m, n = layers[0][0].shape
    kfac = reference["two-sided whitened SVD"]
    _, x, g = layers[0]
    sx, sg = whiten(x.T @ x / N_TOKENS), whiten(g.T @ g / N_TOKENS)
    kappa = float(np.linalg.cond(sx.factor) * np.linalg.cond(sg.factor))
    tols = {
        name: 10 * n * float(torch.finfo(dtype).eps) * kappa
        for name, dtype in (("torch float64", torch.float64), ("torch float32", torch.float32))
    }
    print(f"layer {m}x{n}, rank {RANK}; kappa(Sx) kappa(Sg) = {kappa:.3g}")
    print("relative difference from numpy float64, ||torch - numpy|| / ||numpy||")
    print(f"  {'':<28}{'torch float64':>15}{'torch float32':>15}")
    for key, ref in reference.items():
        diffs = []
        for name, run in runs.items():
            res = run[key]
            tensors = [res] if not hasattr(res, "core") else [res.left, res.core, res.right]
            assert all(isinstance(t, torch.Tensor) for t in tensors)
            assert all(t.dtype == as_torch[name][0][0].dtype for t in tensors)
            diff = np.linalg.norm(product(res) - product(ref)) / np.linalg.norm(product(ref))
            assert diff <= tols[name], (key, name, diff, tols[name])
            diffs.append(diff)
        print(f"  {key:<28}{diffs[0]:15.1e}{diffs[1]:15.1e}")
    tol64, tol32 = tols["torch float64"], tols["torch float32"]
    print(f"  {'tolerance 10 n eps kappa':<28}{tol64:15.1e}{tol32:15.1e}")

    print("curvature-norm errors (each method in its own norm)")
    print(f"  {'':<28}{'numpy':>12}{'torch f64':>12}{'torch f32':>12}")
    for key, ref in reference.items():
        if not hasattr(ref, "error"):
            continue
        errs = [ref.error] + [run[key].error for run in runs.values()]
        print(f"  {key:<28}" + "".join(f"{e:12.6f}" for e in errs))
        scale = ref.total_energy / ref.error  # error is sqrt(||M||² - ||C||²)
        assert abs(errs[1] - errs[0]) <= tols["torch float64"] * scale
        assert abs(errs[2] - errs[0]) <= tols["torch float32"] * scale

    ranks = {"numpy float64": allocation(layers)}
    ranks.update({name: allocation(arrs) for name, arrs in as_torch.items()})
    print(f"allocate_ranks over 3 layers at budget {BUDGET}:")
    for name, r in ranks.items():
        print(f"  {name:<14} {r}")
    assert ranks["torch float64"] == ranks["numpy float64"]
    assert kfac.error <= reference["JACTUS (jactus_layer)"].error


if __name__ == "__main__":
    main()
