"""The float64 Gram route of a float32 decomposition (``lowrank.gram_truncation``).

A float32 weight with float64 statistics asks for its decomposition at
float32's precision (``svd_precision="weight"``). With no bases,
``project_to_core`` reaches it by the eigendecomposition of the float64 Gram
matrix of ``M`` on its smaller side, then a QR of ``M V_r``: both bases are
orthonormal and Pythagoras holds to float64's rounding, while the subspaces
agree with float64's SVD to ``ε64 σ_1² / (σ_r² − σ_{r+1}²)``, within what a
float32 SVD would give (``ε32 σ_1 / (σ_r − σ_{r+1})``).
"""

from __future__ import annotations

import numpy as np
import pytest

import jactus_linalg as jl
from jactus_linalg.lowrank import gram_resolves, gram_truncation, project_to_core

from .numerics import subspace_distance, tolerance, with_spectrum

R = 6


def _gapped(rng: np.random.Generator, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``m x n`` with singular values gapped 5x at ``R`` and a tail decaying to 1e-6."""
    k = min(m, n)
    sigma = np.concatenate([np.geomspace(10.0, 5.0, R), np.geomspace(1.0, 1e-6, k - R)])
    return with_spectrum(rng, m, n, sigma), sigma


def _reference(mat: np.ndarray, r: int):
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    return u[:, :r], s, vh[:r].T


@pytest.mark.parametrize(("m", "n"), [(40, 30), (30, 40), (32, 32)])
def test_gram_route_is_orthonormal_and_exact_in_float64(rng, m, n):
    """Tall, wide and square: both bases orthonormal and Pythagoras to float64's rounding;
    the subspaces are float64's SVD's to the Gram's bound; σ to √(ε64)·‖M‖."""
    mat, sigma = _gapped(rng, m, n)
    res = project_to_core(mat, None, None, R, svd_dtype=np.float32)
    assert res.left.dtype == res.core.dtype == res.right.dtype == np.float64
    assert res.left.shape == (m, R) and res.core.shape == (R, R) and res.right.shape == (n, R)
    for q in (res.left, res.right):
        assert np.linalg.norm(q.T @ q - np.eye(R)) <= tolerance(np.float64, m + n)
    energy = float(np.sum(mat**2))
    residual = mat - res.left @ res.core @ res.right.T
    tol64 = tolerance(np.float64, m + n) * energy
    assert abs(np.sum(residual**2) - (energy - np.sum(res.core**2))) <= tol64  # Pythagoras
    assert abs(np.sum(residual**2) - np.sum(sigma[R:] ** 2)) <= tol64  # Eckart-Young reached
    u, _, v = _reference(mat, R)
    squared_gap = (sigma[R - 1] ** 2 - sigma[R] ** 2) / sigma[0] ** 2
    assert subspace_distance(res.left, u) <= tolerance(np.float64, m + n, cond=1 / squared_gap)
    assert subspace_distance(res.right, v) <= tolerance(np.float64, m + n, cond=1 / squared_gap)
    # singular values resolved to sqrt(c (m+n) eps64) ||M||_F, below a float32 SVD's
    # c (m+n) eps32 sigma_1 (||M||_F <= sqrt(min(m, n)) sigma_1)
    resolution = np.sqrt(tolerance(np.float64, m + n) * energy)
    assert np.max(np.abs(res.singular_values - sigma)) <= resolution
    assert resolution < tolerance(np.float32, m + n) * sigma[0]


def test_gram_route_beats_a_float32_svd_on_the_subspace():
    """Measured, not assumed: on a gapped problem the Gram route's subspace is
    closer to float64's than a float32 SVD's (the reason it may stand for one)."""
    rng = np.random.default_rng(5)
    mat, _ = _gapped(rng, 60, 40)
    gram = project_to_core(mat, None, None, R, svd_dtype=np.float32)
    u32, _, vh32 = np.linalg.svd(mat.astype(np.float32), full_matrices=False)
    u, _, v = _reference(mat, R)
    assert subspace_distance(gram.right, v) < subspace_distance(vh32[:R].T.astype(np.float64), v)
    assert subspace_distance(gram.left, u) < subspace_distance(u32[:, :R].astype(np.float64), u)


def test_projected_lowrank_float32_weight_takes_the_gram_route(rng):
    """``projected_lowrank`` with a float32 weight and float64 statistics, no bases:
    the reported error is float64's Eckart-Young tail to float64's rounding (times
    the whitening's κ), and the deployed float32 factors reach it to float32 rounding."""
    m, n = 24, 18
    w = with_spectrum(rng, m, n, np.geomspace(1.0, 1e-3, n)).astype(np.float32)
    x = rng.standard_normal((3 * n, n)) * np.geomspace(1.0, 1e-2, n)
    gram = x.T @ x
    res = jl.projected_lowrank(w, 5, input_cov=gram, damping="svd-llm")
    ref = jl.projected_lowrank(w.astype(np.float64), 5, input_cov=gram, damping="svd-llm")
    lower = np.linalg.cholesky(gram)
    kappa = np.linalg.cond(lower)
    energy = res.total_energy
    assert res.left.dtype == np.float32
    assert abs(res.error**2 - ref.error**2) <= tolerance(np.float64, m + n, cond=kappa) * energy
    assert abs(res.eckart_young**2 - ref.eckart_young**2) <= tolerance(np.float64, m + n, cond=kappa) * energy
    direct = np.linalg.norm((w - res.left @ res.core @ res.right.T).astype(np.float64) @ lower)
    assert abs(direct**2 - res.error**2) <= tolerance(np.float32, m + n, cond=kappa) * energy


def test_torch_gram_route_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    mat, _ = _gapped(rng, 30, 20)
    want = project_to_core(mat, None, None, R, svd_dtype=np.float32)
    got = project_to_core(torch.from_numpy(mat), None, None, R, svd_dtype=torch.float32)
    approx = (got.left @ got.core @ got.right.T).numpy()
    energy = float(np.sum(mat**2))
    assert np.linalg.norm(approx - want.left @ want.core @ want.right.T) ** 2 <= tolerance(
        np.float64, 50, cond=1e2
    ) * energy


def test_zero_and_default_rank():
    """A zero matrix keeps one direction with zero core (finite, orthonormal bases); the
    default rank cuts at eps(float32) · max(m, n) σ_1, as a float32 SVD would."""
    zero = project_to_core(np.zeros((7, 5)), None, None, None, svd_dtype=np.float32)
    assert zero.core.shape == (1, 1) and float(zero.core[0, 0]) == 0.0
    assert np.allclose(zero.left.T @ zero.left, 1.0) and np.allclose(zero.right.T @ zero.right, 1.0)
    rng = np.random.default_rng(3)
    sigma = np.array([1.0, 0.5, 1e-2, 1e-3, 1e-7])  # 1e-7 < eps32 * max(m, n) = 9.5e-7
    mat = with_spectrum(rng, 8, 5, sigma)
    res = project_to_core(mat, None, None, None, svd_dtype=np.float32)
    assert res.core.shape == (4, 4)


def test_gram_resolves_only_a_lower_precision():
    assert gram_resolves(np, np.float64, np.float32)
    assert not gram_resolves(np, np.float64, np.float64)
    assert not gram_resolves(np, np.float32, np.float32)
    # the working dtype's own decomposition never takes the Gram route
    mat = np.diag([1.0, 2.0**-30, 0.0])  # 2^-30 is below sqrt(eps64) ||M||: lost by a Gram
    assert project_to_core(mat, None, None, 2).core[1, 1] == pytest.approx(2.0**-30, rel=1e-12)
    assert gram_truncation(mat, 2, np.float32).core.shape == (2, 2)


@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40)])
def test_plan_layer_float32_weight_takes_the_gram_route(rng, m, n):
    """``plan_layer`` with a float32 weight and float64 statistics at tau = 0 (the svd-llm
    and K-FAC cases): its bases come from the Gram route (orthonormal to float64 rounding
    with no re-orthonormalization, triangular core), every prefix is the optimal rank-k
    approximation (energy = top-k sigma^2 of M to float64's rounding) and every cut's
    reported error is the float64 plan's to float64's rounding times the whitening's kappa."""
    w = with_spectrum(rng, m, n, np.geomspace(1.0, 1e-3, min(m, n))).astype(np.float32)
    x = rng.standard_normal((3 * n, n)) * np.geomspace(1.0, 1e-2, n)
    cx = x.T @ x / (3 * n)
    g = rng.standard_normal((3 * m, m)) * np.geomspace(1.0, 1e-1, m)
    cg = g.T @ g / (3 * m)
    plan = jl.plan_layer(w, input_cov=cx, grad_cov=cg, task_fraction=0.0, damping=0.0)
    ref = jl.plan_layer(w.astype(np.float64), input_cov=cx, grad_cov=cg, task_fraction=0.0,
                        damping=0.0)
    r_max = plan.max_rank
    u, k, v = plan.left_basis, plan.core, plan.right_basis
    assert u.dtype == k.dtype == v.dtype == np.float64
    for q in (u, v):
        assert np.linalg.norm(q.T @ q - np.eye(r_max)) <= tolerance(np.float64, m + n)
    triangle = np.tril(k, -1) if m >= n else np.triu(k, 1)
    assert np.all(triangle == 0.0)  # R (tall) or R^T (wide) of the QR of M V_r
    kappa = np.linalg.cond(np.linalg.cholesky(cx)) * np.linalg.cond(np.linalg.cholesky(cg))
    scale = tolerance(np.float64, m + n, cond=kappa) * plan.total_energy
    head = np.concatenate([[0.0], np.cumsum(ref.singular_values[:r_max] ** 2)])
    assert np.max(np.abs(plan.energy - head)) <= scale
    for rank in (1, r_max // 2, r_max):
        got, want = plan.factorize(rank), ref.factorize(rank)
        assert abs(got.error**2 - want.error**2) <= scale
