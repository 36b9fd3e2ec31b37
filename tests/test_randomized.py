"""Randomized range finder: error bounds against the exact SVD, exact residual, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jactus_linalg import plan_layer
from jactus_linalg.randomized import expected_error_factor, randomized_svd

from .numerics import spectrum, tolerance, with_spectrum


@given(
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(["decaying", "stepped", "rank"]),
    k=st.integers(1, 8),
)
def test_spectral_error_within_the_stated_factor(seed, kind, k):
    rng = np.random.default_rng(seed)
    m, n = 60, 40
    sigma = spectrum(kind, n, cond=1e4, rank=12)
    a = with_spectrum(rng, m, n, sigma)
    res = randomized_svd(a, k, seed=seed)
    approx = (res.left * res.values) @ res.right.T
    err = np.linalg.norm(a - approx, 2)
    # the projection error is bounded (in expectation) by factor * sigma_{k+1}; the rank-k
    # truncation of QQ^T A adds at most sigma_{k+1} more
    factor = expected_error_factor(k, 10, 2, m, n)
    tol = tolerance(np.float64, n, c=100) * sigma[0]
    assert err <= (factor + 1) * sigma[k] + tol


def test_frobenius_residual_is_exact():
    rng = np.random.default_rng(0)
    a = with_spectrum(rng, 80, 50, spectrum("decaying", 50, cond=1e3))
    res = randomized_svd(a, 5, oversample=5, power_iters=1)
    # rebuild Q from the result is not possible; compare with the definition via a fresh run's Q:
    # ||A - QQ^T A||_F^2 = ||A||^2 - ||Q^T A||^2 and Q spans left plus the discarded oversampled part,
    # so the residual can only be below the rank-5 residual and above the rank-15 optimum
    s = np.linalg.svd(a, compute_uv=False)
    assert np.sqrt(np.sum(s[15:] ** 2)) - 1e-12 <= res.residual_frobenius
    approx = (res.left * res.values) @ res.right.T
    assert res.residual_frobenius <= np.linalg.norm(a - approx) + tolerance(np.float64, 50) * s[0]


def test_spectral_bound_holds():
    rng = np.random.default_rng(1)
    for seed in range(5):
        a = with_spectrum(rng, 70, 60, spectrum("decaying", 60, cond=1e2))
        res = randomized_svd(a, 4, oversample=4, power_iters=0, seed=seed)
        # the bound is on ||A - QQ^T A||_2 <= ||A - U_k S_k V_k^T||_2
        s = np.linalg.svd(a, compute_uv=False)
        assert res.residual_spectral_bound >= s[4 + 4]  # no rank-8 projection beats sigma_9


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(2)
    a = with_spectrum(rng, 50, 40, spectrum("decaying", 40))
    r1, r2 = randomized_svd(a, 3, seed=7), randomized_svd(a, 3, seed=7)
    assert np.array_equal(r1.left, r2.left) and np.array_equal(r1.values, r2.values)


def test_falls_back_to_exact_when_the_sample_covers_everything():
    rng = np.random.default_rng(3)
    a = with_spectrum(rng, 20, 12, spectrum("decaying", 12))
    res = randomized_svd(a, 5, oversample=10)
    assert res.residual_frobenius == 0.0
    assert np.allclose(res.values, np.linalg.svd(a, compute_uv=False)[:5])


@pytest.mark.parametrize("k", [0, 41])
def test_bad_k_raises(k):
    with pytest.raises(ValueError, match="`k`"):
        randomized_svd(np.ones((50, 40)), k)


def test_randomized_plan_matches_exact_plan_in_curvature_error():
    """Fast path within 1% of the exact path's curvature-norm error (decaying spectra)."""
    rng = np.random.default_rng(4)
    m, n, r = 400, 300, 20
    w = with_spectrum(rng, m, n, spectrum("decaying", n, cond=1e6))
    x = rng.standard_normal((2000, n)) * np.geomspace(1, 0.1, n)
    g = rng.standard_normal((2000, m)) * np.geomspace(1, 0.1, m)
    stats = dict(input_cov=x.T @ x / 2000, grad_cov=g.T @ g / 2000, grad_mean=g.T @ x / 2000)
    exact = plan_layer(w, **stats, max_rank=r, svd="exact")
    fast = plan_layer(w, **stats, max_rank=r, svd="randomized")
    for rank in (5, 10, 20):
        e, f = exact.factorize(rank).error, fast.factorize(rank).error
        assert f <= 1.01 * e
        assert f >= 0.99 * e  # task directions make neither path a bound on the other


@settings(max_examples=12)
@given(
    seed=st.integers(0, 2**16),
    j=st.integers(1, 6),
    method=st.sampled_from(["cholesky", "eigh"]),
)
def test_top_eigenvectors_of_a_whitening_factor(seed, j, method):
    """Top-j eigenvectors read off a factor: exact for eigh, randomized on Cholesky.

    Known spectrum with a gap after j (ratio 10), so E_j is well defined.
    The randomized path's missed-eigenvalue bound is at least the best any
    (j + 10)-dimensional range can do, lambda_{j+11} + delta, and the
    vectors agree with the exact ones to the subspace iteration's accuracy:
    3 power iterations on L (singular values sqrt(lambda)) converge like
    (lambda_{j+11} / lambda_j)^{7/2} (HMT; here about 5e-5), checked with a
    factor 10.
    """
    from jactus_linalg.spectral import top_eigenvectors
    from jactus_linalg.whitening import whitening_operator

    from .numerics import covariance_with_spectrum, subspace_distance

    rng = np.random.default_rng(seed)
    n = 200
    lam = np.concatenate([np.geomspace(100.0, 50.0, j), np.geomspace(5.0, 1e-4, n - j)])
    cov = covariance_with_spectrum(rng, lam)
    op = whitening_operator(cov, method=method, name="cov")
    top = top_eigenvectors(op, j, method="randomized")
    exact = np.linalg.eigh(cov)[1][:, ::-1][:, :j]
    vectors = np.asarray(top.vectors)
    assert vectors.shape == (n, j)
    assert np.linalg.norm(vectors.T @ vectors - np.eye(j)) <= tolerance(np.float64, n)
    assert np.max(np.abs(top.values - lam[:j]) / lam[:j]) <= 1e-6
    assert top.rank == j
    if method == "eigh":
        assert top.method == "eigh-factor" and top.missed_eigenvalue_bound == 0.0
        assert subspace_distance(vectors, exact) <= tolerance(np.float64, n, cond=lam[0] / (lam[j - 1] - lam[j]))
    else:
        assert top.method == "randomized"
        rate = (lam[j + 10] / lam[j - 1]) ** 3.5
        assert subspace_distance(vectors, exact) <= 10 * rate
        assert top.missed_eigenvalue_bound >= (lam[j + 10] + op.damping) * (1 - 1e-8)
    auto = top_eigenvectors(op, j)  # n = 200: j + 10 <= 20 goes randomized on Cholesky
    assert auto.method == ("randomized" if method == "cholesky" else "eigh-factor")
    assert top_eigenvectors(op, j, method="exact").method == (
        "exact" if method == "cholesky" else "eigh-factor"
    )


@pytest.mark.parametrize("j", [3, 20, 39, 60])
def test_exact_top_eigenvectors_from_the_index_range(backend, j):
    """Exact top-j eigenpairs of a Cholesky-whitened covariance (syevr on the index range
    for numpy when j <= n/2, the full eigh otherwise and on other backends) agree with a
    float64 numpy eigh; a later, smaller j is a slice of what was kept on the operator."""
    from jactus_linalg.spectral import top_eigenvectors
    from jactus_linalg.whitening import whitening_operator

    from .numerics import covariance_with_spectrum, subspace_distance

    rng = np.random.default_rng(j)
    n = 80
    lam = np.concatenate([np.geomspace(100.0, 20.0, j), np.geomspace(2.0, 1e-4, n - j)])
    cov = covariance_with_spectrum(rng, lam)
    op = whitening_operator(backend.asarray(cov), method="cholesky", name="cov")
    top = top_eigenvectors(op, j, method="exact")
    vectors = backend.to_numpy(top.vectors)
    exact = np.linalg.eigh(cov)[1][:, ::-1][:, :j]
    gap = (lam[j - 1] - lam[j]) / lam[0]
    assert top.method == "exact" and vectors.shape == (n, j) and top.rank == j
    assert np.linalg.norm(vectors.T @ vectors - np.eye(j)) <= tolerance(np.float64, n)
    # eigenvalues of C + δI from L Lᵀ: rounding of order n eps λ_max, and δ removed
    assert np.max(np.abs(top.values - lam[:j])) <= tolerance(np.float64, n, cond=10) * lam[0]
    assert subspace_distance(vectors, exact) <= tolerance(np.float64, n, cond=1 / gap)
    smaller = top_eigenvectors(op, max(j // 2, 1), method="exact")
    np.testing.assert_array_equal(backend.to_numpy(smaller.vectors), vectors[:, : max(j // 2, 1)])
    # the same pairs without the covariance (L L^T re-formed, as after plan_layer dropped it)
    again = whitening_operator(backend.asarray(cov), method="cholesky", name="cov")
    assert again.covariance is not None
    again.forget_covariance()
    assert again.covariance is None
    rebuilt = top_eigenvectors(again, j, method="exact")
    assert subspace_distance(backend.to_numpy(rebuilt.vectors), vectors) <= tolerance(
        np.float64, n, cond=1 / gap)
    assert np.max(np.abs(rebuilt.values - top.values)) <= tolerance(np.float64, n, cond=10) * lam[0]


def test_plan_layer_keeps_no_covariance_alive(rng):
    """A Cholesky operator references the covariance it factors (for the exact eigenpairs);
    plan_layer drops that reference, from operators it built and operators handed over."""
    from jactus_linalg.whitening import whitening_operator

    from .numerics import covariance_with_spectrum

    m, n = 30, 20
    cx = covariance_with_spectrum(rng, np.geomspace(10.0, 1e-2, n))
    cg = covariance_with_spectrum(rng, np.geomspace(10.0, 1e-2, m))
    given = whitening_operator(cx, method="cholesky", name="input_cov")
    assert given.covariance is cx  # a reference, not a copy
    weight = rng.standard_normal((m, n))
    plan = plan_layer(weight, input_cov=given, grad_cov=cg, task_fraction=0.5, svd="exact")
    for op in (plan.input_op, plan.grad_op):
        assert op.method == "cholesky" and op.covariance is None
        assert "exact" in op.eigen_cache  # the eigenpairs it was kept for were computed


def test_layers_sharing_an_input_decompose_its_covariance_once(rng, monkeypatch):
    """plan_layer with one shared input WhiteningOperator (q/k/v, gate/up in compress):
    one eigendecomposition of C_x for the group, one of each layer's own C_g."""
    import jactus_linalg.spectral as spectral
    from jactus_linalg.whitening import whitening_operator

    from .numerics import covariance_with_spectrum

    sizes = []
    real = spectral.eigh_top

    def counted(xp, a, j):
        sizes.append(int(a.shape[0]))
        return real(xp, a, j)

    monkeypatch.setattr(spectral, "eigh_top", counted)
    m, n = 30, 24
    cx = covariance_with_spectrum(rng, np.geomspace(10.0, 1e-3, n))
    shared = whitening_operator(cx, method="cholesky", name="input_cov")
    plans = []
    for _ in range(3):  # q, k, v
        cg = covariance_with_spectrum(rng, np.geomspace(5.0, 1e-3, m))
        w = with_spectrum(rng, m, n, np.geomspace(1.0, 1e-3, n))
        plans.append(plan_layer(w, input_cov=shared, grad_cov=cg, task_fraction=0.5, svd="exact"))
    assert sorted(sizes) == [n, m, m, m], "C_x once for the group, each C_g once"
    # the shared directions are the same for every layer, and equal a fresh decomposition
    alone = whitening_operator(cx, method="cholesky", name="input_cov")
    fresh = plan_layer(w, input_cov=alone, grad_cov=cg, task_fraction=0.5, svd="exact")
    assert np.array_equal(fresh.right_basis, plans[-1].right_basis)
