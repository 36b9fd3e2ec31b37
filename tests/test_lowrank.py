"""Projected low-rank approximation in the curvature norm, against float64 references.

The references are naive on purpose: explicit Cholesky factors of C + δI,
plain numpy SVDs, the residual formed and measured directly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jactus_linalg as jl

from .numerics import (
    covariance_with_spectrum,
    factor_condition,
    reference_factor,
    relative_gap,
    subspace_distance,
    tail_energy,
    tolerance,
    with_spectrum,
)
from .strategies import layer_problems, seeds, weights

DAMP = jl.DEFAULT_DAMPING
methods = st.sampled_from(["cholesky", "eigh"])


class Reference:
    """Float64 whitening of one layer: S_x, S_g, M = S_gᵀ W S_x and σ(M)."""

    def __init__(self, w, cx=None, cg=None, damping=DAMP):
        self.w = np.asarray(w, dtype=np.float64)
        m, n = self.w.shape
        self.sx = reference_factor(cx, damping, n)
        self.sg = reference_factor(cg, damping, m)
        self.m_white = self.sg.T @ self.w @ self.sx
        self.sigma = np.linalg.svd(self.m_white, compute_uv=False)
        self.kappa = factor_condition(cx, damping) * factor_condition(cg, damping)
        self.energy = float(np.sum(self.m_white**2))
        self.dims = m + n

    def whiten(self, x):
        return self.sg.T @ x @ self.sx

    def error(self, left, core, right) -> float:
        """‖S_gᵀ (W - A C Bᵀ) S_x‖_F, formed directly."""
        return float(np.linalg.norm(self.whiten(self.w - left @ core @ right.T)))

    def energy_tol(self, c: float = 10.0) -> float:
        """Absolute tolerance on squared curvature errors."""
        return tolerance(np.float64, self.dims, c=c, cond=self.kappa) * self.energy

    def truncated(self, r: int) -> np.ndarray:
        """Optimal rank-r approximation in the curvature norm, in layer coordinates."""
        p, s, qt = np.linalg.svd(self.m_white, full_matrices=False)
        best = (p[:, :r] * s[:r]) @ qt[:r]
        return np.linalg.solve(self.sg.T, np.linalg.solve(self.sx.T, best.T).T)


@given(prob=layer_problems(), method=methods, use_bases=st.booleans(), seed=seeds)
def test_pythagoras(prob, method, use_bases, seed):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    m, n = w.shape
    kwargs = {}
    if use_bases:
        rng = np.random.default_rng(seed)
        kwargs = {"left": rng.standard_normal((m, r)), "right": rng.standard_normal((n, r))}
    res = jl.projected_lowrank(w, r, input_cov=cx, grad_cov=cg, whitening=method, **kwargs)
    ref = Reference(w, cx, cg)
    direct = ref.error(res.left, res.core, res.right)
    assert res.total_energy == pytest.approx(ref.energy, rel=tolerance(np.float64, m + n, cond=ref.kappa))
    assert res.preserved_energy == pytest.approx(float(np.sum(res.core**2)), rel=1e-12, abs=0)
    # err² = ‖M‖² - ‖C‖², checked against the residual measured directly
    assert abs(res.error**2 - (res.total_energy - res.preserved_energy)) <= ref.energy_tol()
    assert abs(direct**2 - res.error**2) <= ref.energy_tol()


@given(prob=layer_problems(), method=methods, use_bases=st.booleans(), seed=seeds)
def test_eckart_young_lower_bound(prob, method, use_bases, seed):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    m, n = w.shape
    kwargs = {}
    if use_bases:
        rng = np.random.default_rng(seed)
        kwargs = {
            "left": rng.standard_normal((m, r + 1 if r < m else r)),
            "right": rng.standard_normal((n, r)),
        }
    res = jl.projected_lowrank(w, r, input_cov=cx, grad_cov=cg, whitening=method, **kwargs)
    ref = Reference(w, cx, cg)
    rank = min(res.core.shape)
    floor = tail_energy(ref.sigma, rank)
    direct = ref.error(res.left, res.core, res.right)
    assert direct**2 >= floor - ref.energy_tol()
    assert res.error**2 >= floor - ref.energy_tol()
    assert abs(res.eckart_young**2 - floor) <= ref.energy_tol()
    assert np.max(np.abs(res.singular_values - ref.sigma)) <= tolerance(
        np.float64, m + n, cond=ref.kappa
    ) * ref.sigma[0]
    if not use_bases:  # the optimal subspaces reach the bound
        assert abs(res.error**2 - floor) <= ref.energy_tol()
        assert abs(direct**2 - floor) <= ref.energy_tol()


@given(
    prob=layer_problems(max_side=12),
    method=methods,
    use_bases=st.booleans(),
    seed=seeds,
    size=st.floats(1e-6, 1.0),
)
def test_core_is_optimal_against_perturbations(prob, method, use_bases, seed, size):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    m, n = w.shape
    rng = np.random.default_rng(seed)
    kwargs = {}
    if use_bases:
        kwargs = {"left": rng.standard_normal((m, r)), "right": rng.standard_normal((n, r))}
    res = jl.projected_lowrank(w, r, input_cov=cx, grad_cov=cg, whitening=method, **kwargs)
    ref = Reference(w, cx, cg)
    base = ref.error(res.left, res.core, res.right)
    scale = max(float(np.linalg.norm(res.core)), ref.sigma[0])
    for _ in range(3):
        e = rng.standard_normal(res.core.shape)
        e *= size * scale / np.linalg.norm(e)
        perturbed = ref.error(res.left, res.core + e, res.right)
        # same subspaces, so the whitened change U E Vᵀ is orthogonal to the
        # residual: err(C + E)² = err(C)² + ‖E‖² ≥ err(C)²
        assert perturbed**2 >= base**2 - ref.energy_tol()
        assert abs(perturbed**2 - base**2 - np.sum(e**2)) <= ref.energy_tol() + tolerance(
            np.float64, m + n, cond=ref.kappa
        ) * np.sum(e**2)


@given(data=weights(max_side=24), rank=st.integers(1, 24))
def test_no_covariance_is_truncated_svd(data, rank):
    w, sigma = data
    m, n = w.shape
    r = min(rank, m, n)
    res = jl.projected_lowrank(w, r)
    assert res.input_whitening is None and res.grad_whitening is None
    tail = tail_energy(sigma, r)
    norm2 = float(np.sum(sigma**2))
    tol = tolerance(np.float64, m + n)
    approx = res.left @ res.core @ res.right.T
    # Eckart–Young: the error of the truncated SVD is the tail of the known spectrum
    assert abs(np.linalg.norm(w - approx) ** 2 - tail) <= tol * norm2
    assert abs(res.error**2 - tail) <= tol * norm2
    # the core is diag(σ_1..σ_r) and the factors orthonormal
    assert np.max(np.abs(res.core - np.diag(sigma[:r]))) <= tol * sigma[0]
    assert np.linalg.norm(res.left.T @ res.left - np.eye(r)) <= tol
    assert np.linalg.norm(res.right.T @ res.right - np.eye(r)) <= tol
    # the product is the truncated SVD where that is unique (a gap at r)
    gap = relative_gap(sigma, r)
    if gap > 0:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vt[:r]
        assert np.linalg.norm(approx - best) <= tolerance(np.float64, m + n, cond=1 / gap) * sigma[0]


@given(data=weights(max_side=16, max_cond=1e8))
def test_default_rank_is_numerical_rank(data):
    w, sigma = data
    m, n = w.shape
    res = jl.projected_lowrank(w)
    expected = int(np.sum(sigma > np.finfo(np.float64).eps * max(m, n) * sigma[0]))
    # rounding of the test matrix itself is O(eps·σ₁): allow the count to
    # differ only for singular values within a factor 10 of the threshold
    threshold = np.finfo(np.float64).eps * max(m, n) * sigma[0]
    near = np.sum(np.abs(sigma - threshold) <= tolerance(np.float64, max(m, n)) * sigma[0])
    assert abs(res.core.shape[0] - expected) <= near


def _compare_with_reference(res, ref: Reference, r: int):
    """Errors always; products where the rank-r subspace is unique."""
    tail = tail_energy(ref.sigma, r)
    assert abs(res.error**2 - tail) <= ref.energy_tol()
    approx = res.left @ res.core @ res.right.T
    assert abs(ref.error(res.left, res.core, res.right) ** 2 - tail) <= ref.energy_tol()
    gap = relative_gap(ref.sigma, r)
    if gap > 0:
        diff = ref.whiten(approx - ref.truncated(r))
        cond = ref.kappa / gap
        assert np.linalg.norm(diff) <= tolerance(np.float64, ref.dims, cond=cond) * ref.sigma[0]


@given(prob=layer_problems(with_grad_cov=False), method=methods)
def test_input_cov_only_is_svd_llm_whitening(prob, method):
    w, cx, r = prob["W"], prob["Cx"], prob["rank"]
    res = jl.projected_lowrank(w, r, input_cov=cx, whitening=method)
    assert res.grad_whitening is None and res.input_whitening is not None
    ref = Reference(w, cx, None)
    # SVD-LLM: SVD of W S_x, truncate, map back with S_x⁻¹
    _compare_with_reference(res, ref, r)
    # the output side is not whitened: A has orthonormal columns
    assert np.linalg.norm(res.left.T @ res.left - np.eye(res.left.shape[1])) <= tolerance(
        np.float64, ref.dims, cond=ref.kappa
    )


@given(prob=layer_problems(), method=methods)
def test_both_covariances_is_two_sided_whitened_svd(prob, method):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    res = jl.projected_lowrank(w, r, input_cov=cx, grad_cov=cg, whitening=method)
    ref = Reference(w, cx, cg)
    _compare_with_reference(res, ref, r)
    # whitened factors are orthonormal: Sgᵀ A and Sxᵀ B
    ua, vb = ref.sg.T @ res.left, ref.sx.T @ res.right
    k = res.core.shape[0]
    assert np.linalg.norm(ua.T @ ua - np.eye(k)) <= tolerance(np.float64, ref.dims, cond=ref.kappa)
    assert np.linalg.norm(vb.T @ vb - np.eye(k)) <= tolerance(np.float64, ref.dims, cond=ref.kappa)


@given(prob=layer_problems(max_side=14), tau=st.sampled_from([0.0, 0.25, 0.5, 1.0]), method=methods)
def test_union_bases_give_jactus(prob, tau, method):
    w, cx, cg, g, r = prob["W"], prob["Cx"], prob["Cg"], prob["G"], prob["rank"]
    layer = jl.jactus_layer(
        w, r, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method
    )
    res = jl.projected_lowrank(
        w, input_cov=cx, grad_cov=cg, left=layer.left, right=layer.right, whitening=method
    )
    ref = Reference(w, cx, cg)
    assert res.core.shape == layer.core.shape
    jactus = layer.left @ layer.core @ layer.right.T
    got = res.left @ res.core @ res.right.T
    diff = ref.whiten(got - jactus)
    assert np.linalg.norm(diff) <= tolerance(np.float64, ref.dims, cond=ref.kappa**2) * max(
        ref.sigma[0], np.finfo(np.float64).tiny
    )
    assert abs(res.error**2 - layer.error**2) <= ref.energy_tol()


@given(
    prob=layer_problems(max_side=12, max_cond=1e8),
    c=st.floats(1e-6, 1e6),
    side=st.sampled_from(["input", "grad"]),
    use_bases=st.booleans(),
    seed=seeds,
    method=methods,
)
def test_invariant_under_covariance_rescaling(prob, c, side, use_bases, seed, method):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    m, n = w.shape
    kwargs = {"whitening": method}
    if use_bases:
        rng = np.random.default_rng(seed)
        kwargs |= {"left": rng.standard_normal((m, r)), "right": rng.standard_normal((n, r))}
    base = jl.projected_lowrank(w, r, input_cov=cx, grad_cov=cg, **kwargs)
    cx2, cg2 = (c * cx, cg) if side == "input" else (cx, c * cg)
    scaled = jl.projected_lowrank(w, r, input_cov=cx2, grad_cov=cg2, **kwargs)
    ref = Reference(w, cx, cg)
    # δ is relative, so S scales by sqrt(c), M by sqrt(c), and A C Bᵀ not at all
    assert abs(scaled.error**2 - c * base.error**2) <= c * ref.energy_tol()
    assert scaled.total_energy == pytest.approx(c * base.total_energy, rel=tolerance(np.float64, m + n, cond=ref.kappa))
    gap = 1.0 if use_bases else relative_gap(ref.sigma, r)
    if gap > 0:
        diff = ref.whiten(
            scaled.left @ scaled.core @ scaled.right.T - base.left @ base.core @ base.right.T
        )
        assert np.linalg.norm(diff) <= tolerance(np.float64, m + n, cond=ref.kappa / gap) * ref.sigma[0]


@given(
    prob=layer_problems(max_side=14, max_cond=1e8),
    seed=seeds,
    p=st.integers(1, 14),
    q=st.integers(1, 14),
    basis_cond=st.floats(1.0, 1e3),
    truncate=st.booleans(),
    method=methods,
)
def test_spans_match_given_bases(prob, seed, p, q, basis_cond, truncate, method):
    w, cx, cg = prob["W"], prob["Cx"], prob["Cg"]
    m, n = w.shape
    p, q = min(p, m), min(q, n)
    rng = np.random.default_rng(seed)
    # non-orthonormal bases of known condition number (the same draws as before)
    left = with_spectrum(rng, m, p, np.geomspace(1.0, 1.0 / basis_cond, p))
    right = with_spectrum(rng, n, q, np.geomspace(1.0, 1.0 / basis_cond, q))
    rank = min(p, q) - 1 if truncate and min(p, q) > 1 else None
    res = jl.projected_lowrank(
        w, rank, input_cov=cx, grad_cov=cg, left=left, right=right, whitening=method
    )
    kg = factor_condition(cg, DAMP)
    kx = factor_condition(cx, DAMP)
    tol_left = tolerance(np.float64, m + n, cond=kg**2 * basis_cond)
    tol_right = tolerance(np.float64, m + n, cond=kx**2 * basis_cond)
    ref = Reference(w, cx, cg)
    if rank is None:
        assert res.left.shape == (m, p) and res.right.shape == (n, q)
        assert subspace_distance(res.left, left) <= tol_left
        assert subspace_distance(res.right, right) <= tol_right
        # the core is the projection Uᵀ M V of the whitened weight
        u = np.linalg.qr(ref.sg.T @ left)[0]
        v = np.linalg.qr(ref.sx.T @ right)[0]
        best = u.T @ ref.m_white @ v
        assert abs(np.sum(res.core**2) - np.sum(best**2)) <= ref.energy_tol()
    else:
        # truncated optimally inside the subspaces: spans are contained
        assert res.core.shape == (rank, rank)
        for got, given_basis, tol in ((res.left, left, tol_left), (res.right, right, tol_right)):
            qb = np.linalg.qr(given_basis)[0]
            spill = got - qb @ (qb.T @ got)
            assert np.linalg.norm(spill) <= tol * np.linalg.norm(got)
        # ... and the truncation is the best rank-r core inside them
        u = np.linalg.qr(ref.sg.T @ left)[0]
        v = np.linalg.qr(ref.sx.T @ right)[0]
        s = np.linalg.svd(u.T @ ref.m_white @ v, compute_uv=False)
        assert abs(res.preserved_energy - np.sum(s[:rank] ** 2)) <= ref.energy_tol()


@given(prob=layer_problems(max_side=12, max_cond=1e8), seed=seeds, side=st.sampled_from(["left", "right"]))
def test_one_sided_basis_gives_best_other_side(prob, seed, side):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    m, n = w.shape
    rng = np.random.default_rng(seed)
    ref = Reference(w, cx, cg)
    if side == "left":
        basis = rng.standard_normal((m, r))
        res = jl.projected_lowrank(w, input_cov=cx, grad_cov=cg, left=basis)
        assert subspace_distance(res.left, basis) <= tolerance(
            np.float64, m + n, cond=factor_condition(cg, DAMP) ** 2 * np.linalg.cond(basis)
        )
        u = np.linalg.qr(ref.sg.T @ basis)[0]
        best = np.sum((u.T @ ref.m_white) ** 2)  # best right side: keep all of UᵀM
    else:
        basis = rng.standard_normal((n, r))
        res = jl.projected_lowrank(w, input_cov=cx, grad_cov=cg, right=basis)
        assert subspace_distance(res.right, basis) <= tolerance(
            np.float64, m + n, cond=factor_condition(cx, DAMP) ** 2 * np.linalg.cond(basis)
        )
        v = np.linalg.qr(ref.sx.T @ basis)[0]
        best = np.sum((ref.m_white @ v) ** 2)
    assert abs(res.preserved_energy - best) <= ref.energy_tol()
    assert abs(ref.error(res.left, res.core, res.right) ** 2 - (ref.energy - best)) <= ref.energy_tol()


def test_covariance_root_input_matches_gram(rng):
    m, n, tokens = 9, 7, 5
    w = with_spectrum(rng, m, n, np.geomspace(1, 1e-3, 7))
    x = rng.standard_normal((tokens, n))
    acc = jl.MomentAccumulator(n, mode="qr")
    acc.update(x)
    gram = x.T @ x / tokens
    for method in ("cholesky", "eigh"):
        a = jl.projected_lowrank(w, 3, input_cov=acc.result(), whitening=method)
        b = jl.projected_lowrank(w, 3, input_cov=gram, whitening=method)
        ref = Reference(w, gram, None)
        assert abs(a.error**2 - b.error**2) <= ref.energy_tol()
        gap = relative_gap(ref.sigma, 3)
        diff = ref.whiten(a.left @ a.core @ a.right.T - b.left @ b.core @ b.right.T)
        assert np.linalg.norm(diff) <= tolerance(np.float64, m + n, cond=ref.kappa / gap) * ref.sigma[0]


def test_separate_dampings_per_side(rng):
    w = rng.standard_normal((6, 5))
    cx = np.cov(rng.standard_normal((5, 40)))
    cg = np.cov(rng.standard_normal((6, 40)))
    res = jl.projected_lowrank(w, 2, input_cov=cx, grad_cov=cg, damping=(0.1, 0.01))
    assert res.input_whitening.damping == pytest.approx(0.1 * np.mean(np.diag(cx)))
    assert res.grad_whitening.damping == pytest.approx(0.01 * np.mean(np.diag(cg)))
    assert res.input_whitening.relative_damping == 0.1
    ref_x = reference_factor(cx, 0.1, 5)
    ref_g = reference_factor(cg, 0.01, 6)
    direct = np.linalg.norm(ref_g.T @ (w - res.left @ res.core @ res.right.T) @ ref_x)
    assert abs(direct**2 - res.error**2) <= tolerance(np.float64, 11, cond=1e4) * res.total_energy


# --- float32 weight, float64 statistics: SVD in float32 (default) or float64 -------------

svd_precisions = st.sampled_from(["weight", "working"])


def _svd_eps_dtype(precision: str):
    """The dtype the SVD of M runs in for a float32 weight with float64 statistics."""
    return np.float32 if precision == "weight" else np.float64


def _svd_energy_tol(ref: Reference, precision: str) -> float:
    """Squared-error tolerance: the SVD's rounding (its dtype, no κ: M is orthogonally
    decomposed) plus the float64 whitening's (times κ)."""
    return tolerance(_svd_eps_dtype(precision), ref.dims) * ref.energy + ref.energy_tol()


@given(prob=layer_problems(max_cond=1e6), method=methods, precision=svd_precisions, seed=seeds,
       use_bases=st.booleans())
def test_float32_weight_identities_in_the_svd_dtype(prob, method, precision, seed, use_bases):
    """Pythagoras and Eckart-Young with tolerances from the dtype the SVD actually ran in."""
    w = prob["W"].astype(np.float32)
    cx, cg, r = prob["Cx"], prob["Cg"], prob["rank"]
    m, n = w.shape
    kwargs = {}
    if use_bases:
        rng = np.random.default_rng(seed)
        kwargs = {"left": rng.standard_normal((m, r)), "right": rng.standard_normal((n, r))}
    res = jl.projected_lowrank(
        w, r, input_cov=cx, grad_cov=cg, whitening=method, svd_precision=precision, **kwargs
    )
    ref = Reference(w, cx, cg)  # the float32 weight, exactly, in float64
    tol = _svd_energy_tol(ref, precision)
    assert res.left.dtype == np.float32 and res.core.dtype == np.float32
    # σ(M) to the SVD dtype's rounding, relative to σ_1
    sigma_tol = tolerance(_svd_eps_dtype(precision), ref.dims) + tolerance(
        np.float64, ref.dims, cond=ref.kappa
    )
    assert np.max(np.abs(res.singular_values - ref.sigma)) <= sigma_tol * ref.sigma[0]
    rank = min(res.core.shape)
    floor = tail_energy(ref.sigma, rank)
    assert abs(res.eckart_young**2 - floor) <= tol
    assert res.error**2 >= floor - tol  # Eckart-Young lower bound
    assert abs(res.error**2 - (res.total_energy - res.preserved_energy)) <= tol  # Pythagoras
    if not use_bases:  # the optimal subspaces reach the bound
        assert abs(res.error**2 - floor) <= tol
    # the residual of the deployed float32 factors, measured directly: their
    # rounding to float32 is amplified by κ(S_x) κ(S_g)
    direct = ref.error(res.left, res.core, res.right)
    stored_tol = tolerance(np.float32, ref.dims, cond=ref.kappa) * ref.energy
    assert abs(direct**2 - res.error**2) <= tol + stored_tol


def test_svd_precision_picks_the_dtype_and_its_rank_cutoff(rng):
    """float32 weight + float64 statistics: the default SVD runs in float32, so a
    singular value below float32's rcond (but above float64's) is cut; 'working' keeps it."""
    m, n = 12, 10
    eps32, eps64 = np.finfo(np.float32).eps, np.finfo(np.float64).eps
    tiny = 2.0**-30  # exactly representable; eps64·12 < tiny < eps32·12
    assert eps64 * max(m, n) < tiny < eps32 * max(m, n)
    w32 = np.zeros((m, n), dtype=np.float32)
    rows, cols = rng.permutation(m)[:4], rng.permutation(n)[:4]
    w32[rows, cols] = [1.0, -0.5, 0.25, tiny]  # singular values 1, 0.5, 0.25, tiny exactly
    eye_x, eye_g = np.eye(n), np.eye(m)  # float64 statistics, exact (identity) whitening
    low = jl.projected_lowrank(w32, input_cov=eye_x, grad_cov=eye_g, damping=0.0)
    high = jl.projected_lowrank(
        w32, input_cov=eye_x, grad_cov=eye_g, damping=0.0, svd_precision="working"
    )
    assert low.core.shape == (3, 3)
    assert high.core.shape == (4, 4)
    # err² = ‖M‖² - ‖C‖² = tiny² is below float64 rounding of ‖M‖² here: both report ~0
    assert low.error**2 <= tolerance(np.float64, m + n) * low.total_energy
    assert high.error**2 <= tolerance(np.float64, m + n) * high.total_energy
    with pytest.raises(ValueError, match="svd_precision"):
        jl.projected_lowrank(w32, 2, input_cov=eye_x, svd_precision="float16")


def test_whitening_info_defers_the_effective_rank(rng, monkeypatch):
    """Building a result's WhiteningInfo never runs the triangular inversion behind a
    Cholesky factor's effective rank; reading the field (or a report's deep copy) does,
    once, and gives tr C (C + δI)^{-1}."""
    import copy
    import dataclasses

    import jactus_linalg.whitening as whitening

    calls = []
    real = whitening.inverse_frobenius_squared

    def counted(xp, lower):
        calls.append(1)
        return real(xp, lower)

    monkeypatch.setattr(whitening, "inverse_frobenius_squared", counted)
    m, n = 14, 12
    lam = np.concatenate([np.geomspace(4.0, 1e-2, 9), np.zeros(3)])
    cx = covariance_with_spectrum(rng, lam)
    w = with_spectrum(rng, m, n, np.geomspace(1.0, 1e-2, n))
    res = jl.projected_lowrank(w, 4, input_cov=cx, whitening="cholesky")
    plan = jl.plan_layer(w, input_cov=cx, task_fraction=0.0)
    layer = plan.factorize(3)
    infos = (res.input_whitening, layer.input_whitening)
    assert calls == [], "constructing the info must not invert the factor"
    assert all(i.method == "cholesky" and "computed on access" in repr(i) for i in infos)
    delta = res.input_whitening.damping
    want = float(np.sum(lam / (lam + delta)))
    cond = (lam.max() + delta) / delta
    assert res.input_whitening.effective_rank == pytest.approx(
        want, abs=tolerance(np.float64, n, cond=cond)
    )
    assert calls == [1]
    # a report's deep copy (dataclasses.asdict) holds a plain float
    @dataclasses.dataclass
    class Report:
        info: jl.WhiteningInfo

    copied = dataclasses.asdict(Report(layer.input_whitening))["info"]
    assert isinstance(copied[5], float) and isinstance(copy.deepcopy(infos[1])[5], float)
    assert copied[5] == pytest.approx(want, abs=tolerance(np.float64, n, cond=cond))
    assert isinstance(infos[1]._asdict()["effective_rank"], float)


def test_float32_svd_bases_are_orthonormal_in_the_working_dtype(rng):
    """project_to_core(svd_dtype=float32) finds the subspaces in float32, then
    re-orthonormalizes them and forms the core in float64: Pythagoras holds to
    float64's rounding, and the subspaces agree with float64's to float32's."""
    from jactus_linalg.lowrank import project_to_core

    m, n, r = 40, 30, 6
    sigma = np.concatenate([np.geomspace(10.0, 5.0, r), np.geomspace(1.0, 1e-3, n - r)])
    mat = with_spectrum(rng, m, n, sigma)
    low = project_to_core(mat, None, None, r, svd_dtype=np.float32)
    full = project_to_core(mat, None, None, r)
    for q in (low.left, low.right):
        assert np.linalg.norm(q.T @ q - np.eye(r)) <= tolerance(np.float64, m + n)
    energy = float(np.sum(mat**2))
    residual = mat - low.left @ low.core @ low.right.T
    assert abs(np.sum(residual**2) - (energy - np.sum(low.core**2))) <= tolerance(np.float64, m + n) * energy
    gap = (sigma[r - 1] - sigma[r]) / sigma[0]
    assert subspace_distance(low.left, full.left) <= tolerance(np.float32, m + n, cond=1 / gap)
    assert abs(np.sum(low.core**2) - np.sum(full.core**2)) <= tolerance(np.float32, m + n) * energy
