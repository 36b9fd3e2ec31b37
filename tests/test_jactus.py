"""The JACTUS layer: union of weight and task subspaces, its bounds and gains."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

import jactus_linalg as jl

from .numerics import (
    covariance_with_spectrum,
    orth,
    relative_gap,
    spectrum,
    subspace_distance,
    tail_energy,
    tolerance,
    with_spectrum,
)
from .strategies import layer_problems, seeds
from .test_lowrank import Reference

taus = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
methods = st.sampled_from(["cholesky", "eigh"])
sources = st.sampled_from(["covariance", "gradient"])
EPS = float(np.finfo(np.float64).eps)
#: Above this forward-error bound (cond * eps) fewer than three quarters of
#: float64's digits survive, too few to compare two ways of forming the products.
ILL_POSED = EPS**0.25


def _split(r: int, tau: float, task_rank: int) -> tuple[int, int]:
    """DESIGN: j = round(τ r) (halves up), capped at the gradient's rank; k = r - j."""
    j = min(math.floor(tau * r + 0.5), task_rank)
    return r - j, j


@given(prob=layer_problems(), tau=taus, method=methods, source=sources)
def test_weight_directions_upper_bound(prob, tau, method, source):
    w, cx, cg, g, r = prob["W"], prob["Cx"], prob["Cg"], prob["G"], prob["rank"]
    layer = jl.jactus_layer(
        w, r, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method,
        task_directions=source,
    )
    ref = Reference(w, cx, cg)
    k = layer.weight_directions
    assert k + layer.task_directions == r
    direct = ref.error(layer.left, layer.core, layer.right) ** 2
    upper = tail_energy(ref.sigma, k)
    lower = tail_energy(ref.sigma, r)
    tol = ref.energy_tol()
    # Σ_{i>r} σ_i² ≤ err² ≤ Σ_{i>k} σ_i², on the residual measured directly
    assert lower - tol <= direct <= upper + tol
    assert lower - tol <= layer.error**2 <= upper + tol
    assert abs(direct - layer.error**2) <= tol
    assert abs(layer.weight_bound**2 - upper) <= tol
    assert abs(layer.eckart_young**2 - lower) <= tol
    assert layer.core.shape[0] <= r and layer.core.shape[1] <= r
    assert layer.n_params == layer.left.size + layer.right.size + layer.core.size


@given(prob=layer_problems(), method=methods, with_grad=st.booleans())
def test_task_fraction_zero_is_optimal_rank_r(prob, method, with_grad):
    w, cx, cg, r = prob["W"], prob["Cx"], prob["Cg"], prob["rank"]
    g = prob["G"] if with_grad else None
    layer = jl.jactus_layer(
        w, r, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=0.0, whitening=method
    )
    ref = Reference(w, cx, cg)
    assert (layer.weight_directions, layer.task_directions) == (r, 0)
    tail = tail_energy(ref.sigma, r)
    tol = ref.energy_tol()
    # both bounds are equalities: the optimal rank-r approximation
    assert abs(layer.error**2 - tail) <= tol
    assert abs(ref.error(layer.left, layer.core, layer.right) ** 2 - tail) <= tol
    assert layer.error == pytest.approx(layer.eckart_young, abs=math.sqrt(tol))
    gap = relative_gap(ref.sigma, r)
    if gap > 0:
        diff = ref.whiten(layer.left @ layer.core @ layer.right.T - ref.truncated(r))
        assert np.linalg.norm(diff) <= tolerance(np.float64, ref.dims, cond=ref.kappa / gap) * ref.sigma[0]


@given(prob=layer_problems(max_side=14), tau=taus, method=methods, source=sources)
def test_gains_sum_to_preserved_energy(prob, tau, method, source):
    w, cx, cg, g = prob["W"], prob["Cx"], prob["Cg"], prob["G"]
    m, n = w.shape
    plan = jl.plan_layer(
        w, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method,
        task_directions=source,
    )
    ref = Reference(w, cx, cg)
    gains = plan.gains
    assert gains.shape == (plan.max_rank,)
    assert plan.max_rank == max(jl.break_even_rank(m, n), 1)
    assert np.all(gains >= 0)
    assert np.array_equal(plan.costs, m + n + 1 + 2 * np.arange(plan.max_rank))
    tol = ref.energy_tol()
    assert abs(plan.total_energy - ref.energy) <= tol
    for r in range(1, plan.max_rank + 1):
        layer = plan.factorize(r)
        preserved = float(np.sum(np.asarray(layer.core, dtype=np.float64) ** 2))
        assert abs(np.sum(gains[:r]) - preserved) <= tol
        assert abs(plan.total_energy - preserved - layer.error**2) <= tol
        assert np.array_equal(layer.gains, gains)
    if tau == 0.0:  # the gains are the squared singular values of M
        assert np.max(np.abs(gains - ref.sigma[: plan.max_rank] ** 2)) <= tol


def _descending_eigh(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lam, vec = np.linalg.eigh((c + c.T) / 2)
    return lam[::-1], vec[:, ::-1]


def _reference_task_directions(ref, cx, cg, g, source):
    """Whitened task directions (left, right), the values that order them, and their rank.

    ``covariance``: S_gᵀ E_g and S_xᵀ E_x from float64 eigendecompositions;
    ``gradient``: the singular vectors of Γ = S_g⁻¹ G S_x⁻ᵀ. ``rank`` is
    ``None`` when an eigenvalue sits near the rank cut (then the code's
    count is not checked).
    """
    m, n = ref.w.shape
    if source == "gradient":
        gamma = np.linalg.solve(ref.sg, np.linalg.solve(ref.sx, g.T).T)
        pt, st_, qtt = np.linalg.svd(gamma)
        return pt, qtt.T, (st_, st_), int(np.sum(st_ > EPS * max(m, n) * st_[0]))
    lam_g, e_g = _descending_eigh(cg)
    lam_x, e_x = _descending_eigh(cx)
    ranks = []
    for lam, dim in ((lam_g, m), (lam_x, n)):
        cut = dim * EPS * lam[0]
        if np.any((lam > cut / 1e3) & (lam < cut * 1e3)):
            ranks.append(None)
        else:
            ranks.append(int(np.sum(lam > cut)))
    rank = None if None in ranks else min(ranks)
    return ref.sg.T @ e_g, ref.sx.T @ e_x, (lam_g, lam_x), rank


@given(
    prob=layer_problems(max_side=12, max_cond=1e8),
    tau=st.sampled_from([0.25, 0.5, 1.0]),
    method=methods,
    source=sources,
    data=st.data(),
)
def test_plan_matches_direct_projection(prob, tau, method, source, data):
    w, cx, cg, g = prob["W"], prob["Cx"], prob["Cg"], prob["G"]
    m, n = w.shape
    plan = jl.plan_layer(
        w, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method,
        max_rank=min(m, n), task_directions=source,
    )
    ref = Reference(w, cx, cg)
    p, s, qt = np.linalg.svd(ref.m_white)
    left_t, right_t, (vals_l, vals_r), task_rank = _reference_task_directions(ref, cx, cg, g, source)
    j_max = max(math.floor(tau * plan.max_rank + 0.5), 1)
    if task_rank is not None:
        assert plan.task_rank == min(task_rank, j_max)
    task_rank = plan.task_rank
    ranks = sorted(set(data.draw(st.lists(st.integers(1, min(m, n)), min_size=1, max_size=4))))
    for r in ranks:
        k, j = _split(r, tau, task_rank)
        layer = plan.factorize(r)
        assert (layer.weight_directions, layer.task_directions) == (k, j)
        u = orth(np.concatenate([p[:, :k], left_t[:, :j]], axis=1))
        v = orth(np.concatenate([qt[:k].T, right_t[:, :j]], axis=1))
        # the subspaces are well defined when σ(M) has a gap at k, the task
        # values one at j, and the task directions are not nearly inside the
        # weight ones
        sens = [relative_gap(s, k), relative_gap(vals_l, j), relative_gap(vals_r, j)]
        for basis, parts in ((u, (p[:, :k], left_t[:, :j])), (v, (qt[:k].T, right_t[:, :j]))):
            stacked = np.concatenate(parts, axis=1)
            stacked = stacked / np.maximum(np.linalg.norm(stacked, axis=0), 1e-300)
            sv = np.linalg.svd(stacked, compute_uv=False)
            sens.append(sv[basis.shape[1] - 1] if basis.shape[1] else 1.0)
        if min(sens) <= 0:
            event("rank skipped: its subspaces are not unique (no gap)")
            continue
        cond = ref.kappa**2 / min(sens)
        if cond * EPS > ILL_POSED:
            event("rank skipped: forward error bound cond*eps above eps**(1/4)")
            continue
        direct = jl.projected_lowrank(
            w,
            input_cov=cx,
            grad_cov=cg,
            left=np.linalg.solve(ref.sg.T, u),
            right=np.linalg.solve(ref.sx.T, v),
            whitening=method,
        )
        assert layer.core.shape == direct.core.shape == (u.shape[1], v.shape[1])
        diff = ref.whiten(
            layer.left @ layer.core @ layer.right.T - direct.left @ direct.core @ direct.right.T
        )
        assert np.linalg.norm(diff) <= tolerance(np.float64, ref.dims, cond=cond) * ref.sigma[0]
        assert abs(layer.error**2 - direct.error**2) <= tolerance(
            np.float64, ref.dims, cond=cond
        ) * ref.energy
        # the plan's whitened bases span the union
        assert subspace_distance(ref.sg.T @ layer.left, u) <= tolerance(np.float64, ref.dims, cond=cond)
        assert subspace_distance(ref.sx.T @ layer.right, v) <= tolerance(np.float64, ref.dims, cond=cond)


@given(
    seed=seeds,
    shape=st.sampled_from([(14, 11), (9, 16), (20, 20)]),
    tau=st.sampled_from([0.25, 0.5, 1.0]),
    method=methods,
    r=st.integers(2, 8),
)
def test_deployed_factors_contain_covariance_eigenvectors(seed, shape, tau, method, r):
    """DESIGN identity: span(A) ⊇ span(E_g), span(B) ⊇ span(E_x), principal angles zero.

    Covariances with a known, gapped spectrum, so E_g and E_x are well
    defined; the angles are zero to c (m + n) eps times the conditioning of
    the factors (κ(S)² for the un-whitening).
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    w = with_spectrum(rng, m, n, spectrum("decaying", min(m, n), cond=1e3))
    lam_g = np.concatenate([[50.0, 20.0, 10.0, 7.0, 5.0], np.geomspace(1.0, 1e-3, m - 5)])
    lam_x = np.concatenate([[80.0, 30.0, 12.0, 6.0, 4.0], np.geomspace(1.0, 1e-3, n - 5)])
    cg = covariance_with_spectrum(rng, lam_g)
    cx = covariance_with_spectrum(rng, lam_x)
    layer = jl.jactus_layer(
        w, r, input_cov=cx, grad_cov=cg, task_fraction=tau, whitening=method,
    )
    j = layer.task_directions
    assert j == min(math.floor(tau * r + 0.5), 5) or j == math.floor(tau * r + 0.5)
    e_g = _descending_eigh(cg)[1][:, :j]
    e_x = _descending_eigh(cx)[1][:, :j]
    ref = Reference(w, cx, cg)
    tol = tolerance(np.float64, m + n, cond=ref.kappa**2)
    for deployed, eig in ((layer.left, e_g), (layer.right, e_x)):
        basis = orth(deployed)
        angles = np.asarray(jl.principal_angles(basis, eig))
        assert angles.shape == (j,)
        assert np.max(angles, initial=0.0) <= tol
    # and a random direction is not inside (the test can fail)
    probe = orth(rng.standard_normal((m, 1)))
    assert float(np.asarray(jl.principal_angles(orth(layer.left), probe))[0]) > 1e-3


@given(seed=seeds, method=methods, r=st.integers(4, 10))
def test_randomized_eigenvectors_match_exact(seed, method, r):
    """Cholesky + svd='randomized' finds the same task directions as the exact path."""
    rng = np.random.default_rng(seed)
    m, n = 60, 50
    w = with_spectrum(rng, m, n, spectrum("decaying", n, cond=1e3))
    cg = covariance_with_spectrum(rng, np.geomspace(100.0, 1e-4, m))
    cx = covariance_with_spectrum(rng, np.geomspace(100.0, 1e-4, n))
    kw = dict(input_cov=cx, grad_cov=cg, task_fraction=0.5, whitening=method, max_rank=r)
    fast = jl.plan_layer(w, svd="randomized", **kw)
    exact = jl.plan_layer(w, svd="exact", **kw)
    assert fast.task_rank == exact.task_rank
    # geometric spectra: ratio ~1.2 per step, so the subspace iteration
    # converges only to a tolerance; compare energies at the level the
    # randomized range finder reports
    if method == "cholesky":
        assert any("randomized" in note for note in fast.task_notes)
    ref = Reference(w, cx, cg)
    for rank in range(1, r + 1):
        a, b = fast.factorize(rank), exact.factorize(rank)
        assert abs(a.error**2 - b.error**2) <= 0.05 * ref.energy
        assert ref.error(a.left, a.core, a.right) ** 2 == pytest.approx(a.error**2, abs=ref.energy_tol())


@given(
    seed=seeds,
    g_rank=st.integers(0, 2),
    tau=st.sampled_from([0.5, 1.0]),
    method=methods,
)
def test_task_directions_capped_by_gradient_rank(seed, g_rank, tau, method):
    rng = np.random.default_rng(seed)
    m, n, r = 14, 11, 6
    w = with_spectrum(rng, m, n, spectrum("decaying", n, cond=1e3))
    cx = np.cov(rng.standard_normal((n, 30)))
    cg = np.cov(rng.standard_normal((m, 30)))
    g = np.zeros((m, n)) if g_rank == 0 else with_spectrum(rng, m, n, [1.0, 0.3][:g_rank])
    layer = jl.jactus_layer(
        w, r, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method,
        task_directions="gradient",
    )
    j_wanted = math.floor(tau * r + 0.5)
    assert j_wanted > g_rank
    # the gradient has only g_rank directions: the rest go back to the weight
    assert layer.task_directions == g_rank
    assert layer.weight_directions == r - g_rank
    assert layer.core.shape == (r, r)
    plan = jl.plan_layer(
        w, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method,
        task_directions="gradient",
    )
    assert plan.task_rank == g_rank
    ref = Reference(w, cx, cg)
    assert abs(layer.weight_bound**2 - tail_energy(ref.sigma, r - g_rank)) <= ref.energy_tol()
    if g_rank == 0:  # no gradient signal: exactly the τ = 0 factorization
        base = jl.jactus_layer(w, r, input_cov=cx, grad_cov=cg, task_fraction=0.0, whitening=method)
        assert abs(layer.error**2 - base.error**2) <= ref.energy_tol()


@given(seed=seeds, r=st.integers(2, 8), c=st.floats(0.1, 10.0))
def test_task_direction_in_weight_span_adds_nothing(seed, r, c):
    """Γ ∝ M (gradient along the weight): task directions repeat weight ones."""
    rng = np.random.default_rng(seed)
    w = with_spectrum(rng, 13, 10, np.geomspace(1.0, 1e-3, 10))
    layer = jl.jactus_layer(w, r, grad_mean=c * w, task_fraction=0.5, task_directions="gradient")
    k, j = layer.weight_directions, layer.task_directions
    assert j == math.floor(0.5 * r + 0.5) and k == r - j
    # P'_j = P_j: the union of P_k and P_j is P_max(k, j), nothing more
    d = max(k, j)
    assert layer.core.shape == (d, d)
    sigma = np.geomspace(1.0, 1e-3, 10)
    assert abs(layer.error**2 - tail_energy(sigma, d)) <= tolerance(np.float64, 23) * np.sum(sigma**2)
    plan = jl.plan_layer(w, grad_mean=c * w, task_fraction=0.5, max_rank=r, task_directions="gradient")
    assert plan.left_counts[r] == plan.right_counts[r] == d
    # units that add a repeated direction gain nothing
    assert int(np.sum(plan.gains > tolerance(np.float64, 23))) == d


def test_task_split_rounds_half_up():
    assert jl.task_split(4, 0.25) == (3, 1)
    assert jl.task_split(2, 0.25) == (1, 1)  # τ r = 0.5 rounds up
    assert jl.task_split(1, 0.25) == (1, 0)
    assert jl.task_split(10, 1.0) == (0, 10)
    assert jl.task_split(10, 1.0, task_rank=3) == (7, 3)
    assert jl.task_split(7, 0.0) == (7, 0)


@pytest.mark.parametrize("source", ["covariance", "gradient"])
def test_plan_is_nested_across_ranks(rng, source):
    """Every rank's union contains the previous one, so gains are well defined."""
    m, n = 12, 10
    w = with_spectrum(rng, m, n, np.geomspace(1.0, 1e-2, n))
    g = rng.standard_normal((m, n))
    cx = covariance_with_spectrum(rng, np.geomspace(10.0, 0.1, n))
    cg = covariance_with_spectrum(rng, np.geomspace(10.0, 0.1, m))
    plan = jl.plan_layer(
        w, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=0.5, max_rank=8,
        task_directions=source,
    )
    ref = Reference(w, cx, cg)
    prev = None
    for r in range(1, 9):
        layer = plan.factorize(r)
        # span(A_r) ⊇ span(A_{r-1}): compare the whitened (orthonormal) bases
        if prev is not None:
            for new, old, s_ in ((layer.left, prev.left, ref.sg), (layer.right, prev.right, ref.sx)):
                assert new.shape[1] >= old.shape[1]
                q_new, q_old = orth(s_.T @ new), orth(s_.T @ old)
                assert np.linalg.norm(q_old - q_new @ (q_new.T @ q_old)) <= tolerance(
                    np.float64, m + n, cond=ref.kappa
                )
        prev = layer


@given(seed=seeds, cov_rank=st.integers(1, 3), tau=st.sampled_from([0.5, 1.0]), method=methods)
def test_task_directions_capped_by_covariance_rank(seed, cov_rank, tau, method):
    """A covariance of rank c resolves only c task directions; the rest go to the weight."""
    rng = np.random.default_rng(seed)
    m, n, r = 14, 11, 5
    w = with_spectrum(rng, m, n, spectrum("decaying", n, cond=1e3))
    cx = covariance_with_spectrum(rng, np.concatenate([np.geomspace(5.0, 1.0, cov_rank), np.zeros(n - cov_rank)]))
    cg = np.cov(rng.standard_normal((m, 40)))
    plan = jl.plan_layer(w, input_cov=cx, grad_cov=cg, task_fraction=tau, whitening=method)
    assert plan.task_rank == cov_rank
    layer = plan.factorize(r)
    assert layer.task_directions == min(cov_rank, math.floor(tau * r + 0.5))
    assert layer.weight_directions == r - layer.task_directions


def test_jactus_layer_without_grad_mean_needs_zero_task_fraction(rng):
    w = rng.standard_normal((5, 4))
    with pytest.raises(ValueError, match="grad_mean"):
        jl.jactus_layer(w, 2, task_fraction=0.25, task_directions="gradient")
    with pytest.raises(ValueError, match=r"needs both covariances.*no input_cov and no grad_cov"):
        jl.jactus_layer(w, 2, task_fraction=0.25)
    with pytest.raises(ValueError, match="task_directions"):
        jl.jactus_layer(w, 2, task_fraction=0.25, task_directions="hessian")
    layer = jl.jactus_layer(w, 2, task_fraction=0.0)
    assert layer.task_directions == 0


def test_covariance_mode_accepts_shared_whitening_operators(rng):
    """Covariances given already factored (as compress shares them) give the same layer."""
    from jactus_linalg.whitening import whitening_operator

    m, n = 12, 9
    w = rng.standard_normal((m, n))
    cx = np.cov(rng.standard_normal((n, 40)))
    cg = np.cov(rng.standard_normal((m, 40)))
    for method in ("cholesky", "eigh"):
        ops = (
            whitening_operator(cx, method=method, name="input_cov"),
            whitening_operator(cg, method=method, name="grad_cov"),
        )
        shared = jl.jactus_layer(w, 4, input_cov=ops[0], grad_cov=ops[1], task_fraction=0.5)
        direct = jl.jactus_layer(w, 4, input_cov=cx, grad_cov=cg, task_fraction=0.5, whitening=method)
        ref = Reference(w, cx, cg)
        assert abs(shared.error**2 - direct.error**2) <= ref.energy_tol()
        root = jl.CovarianceRoot(np.linalg.cholesky(cx).T, 40)
        via_root = jl.jactus_layer(w, 4, input_cov=root, grad_cov=cg, task_fraction=0.5, whitening=method)
        assert abs(via_root.error**2 - direct.error**2) <= ref.energy_tol()


@pytest.mark.parametrize("source", ["covariance", "gradient"])
@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_identities_on_every_backend(backend, source, method):
    """Pythagoras, both bounds, τ = 0 optimality and (covariance mode) E_g ⊆ span(A), E_x ⊆ span(B).

    Run on numpy, array-api-strict and torch (CPU), in float64, against a
    numpy float64 reference.
    """
    rng = np.random.default_rng(7)
    m, n, r = 18, 14, 6
    w = with_spectrum(rng, m, n, spectrum("decaying", n, cond=1e3))
    lam_g = np.concatenate([[40.0, 15.0, 8.0], np.geomspace(1.0, 1e-3, m - 3)])
    lam_x = np.concatenate([[60.0, 25.0, 9.0], np.geomspace(1.0, 1e-3, n - 3)])
    cg, cx = covariance_with_spectrum(rng, lam_g), covariance_with_spectrum(rng, lam_x)
    g = rng.standard_normal((m, n))
    ref = Reference(w, cx, cg)
    tol = ref.energy_tol()
    x = {k: backend.asarray(v) for k, v in {"W": w, "Cx": cx, "Cg": cg, "G": g}.items()}
    kw = dict(input_cov=x["Cx"], grad_cov=x["Cg"], grad_mean=x["G"], whitening=method,
              task_directions=source)
    for tau in (0.0, 0.5):
        layer = jl.jactus_layer(x["W"], r, task_fraction=tau, **kw)
        left, core, right = (backend.to_numpy(getattr(layer, f)) for f in ("left", "core", "right"))
        direct = ref.error(left, core, right) ** 2
        k = layer.weight_directions
        assert abs(direct - layer.error**2) <= tol  # Pythagoras
        assert tail_energy(ref.sigma, r) - tol <= direct <= tail_energy(ref.sigma, k) + tol
        if tau == 0.0:
            assert abs(direct - tail_energy(ref.sigma, r)) <= tol  # optimal rank r
            continue
        assert layer.task_directions == 3
        if source == "covariance":
            angle_tol = tolerance(np.float64, m + n, cond=ref.kappa**2)
            for deployed, cov in ((left, cg), (right, cx)):
                eig = _descending_eigh(cov)[1][:, :3]
                assert np.max(np.asarray(jl.principal_angles(orth(deployed), eig))) <= angle_tol


@given(
    prob=layer_problems(max_cond=1e6), tau=taus, method=methods, source=sources,
    precision=st.sampled_from(["weight", "working"]),
)
def test_float32_weight_bounds_in_the_svd_dtype(prob, tau, method, source, precision):
    """Pythagoras, Eckart-Young and the weight bound with a float32 weight and float64
    statistics, tolerances from the dtype the SVD of M ran in (float32 by default)."""
    w = prob["W"].astype(np.float32)
    cx, cg, g, r = prob["Cx"], prob["Cg"], prob["G"], prob["rank"]
    plan = jl.plan_layer(
        w, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=tau, whitening=method,
        task_directions=source, max_rank=r, svd_precision=precision,
    )
    svd_dt = np.float32 if precision == "weight" else np.float64
    assert plan.svd_dtype == (np.float32 if precision == "weight" else None)
    assert plan.core.dtype == np.float64  # whitening and core stay in the working dtype
    for basis in (plan.left_basis, plan.right_basis):  # re-orthonormalized in float64
        q = np.asarray(basis)
        assert np.linalg.norm(q.T @ q - np.eye(q.shape[1])) <= tolerance(np.float64, sum(w.shape))
    layer = plan.factorize(r, dtype=plan.core.dtype)
    ref = Reference(w, cx, cg)
    tol = tolerance(svd_dt, ref.dims) * ref.energy + ref.energy_tol()
    direct = ref.error(layer.left, layer.core, layer.right) ** 2
    k = layer.weight_directions
    upper, lower = tail_energy(ref.sigma, k), tail_energy(ref.sigma, r)
    assert abs(direct - layer.error**2) <= tol  # Pythagoras
    assert lower - tol <= direct <= upper + tol  # Eckart-Young, weight bound
    assert abs(layer.weight_bound**2 - upper) <= tol
    assert abs(layer.eckart_young**2 - lower) <= tol
    if tau == 0.0:
        assert abs(direct - lower) <= tol  # optimal rank r
    stored = plan.factorize(r)  # in the weight's dtype
    assert stored.left.dtype == np.float32 and stored.core.dtype == np.float32
