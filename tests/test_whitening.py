"""Whitening factors: S Sᵀ = C + δI, inverses, relative damping, hard cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jactus_linalg as jl

from .numerics import (
    covariance_with_spectrum,
    damped,
    factor_condition,
    orthonormal,
    spectrum,
    tolerance,
)
from .strategies import covariances, seeds

methods = st.sampled_from(["eigh", "cholesky"])
dampings = st.sampled_from([1e-6, 1e-3, 1e-1, 1.0])


def _lam_max(cov: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(cov)[-1])


@given(n=st.integers(1, 24), data=st.data(), method=methods, damping=dampings)
def test_factor_reproduces_damped_covariance(n, data, method, damping):
    c, lam = data.draw(covariances(n))
    w = jl.whiten(c, damping=damping, method=method)
    target, delta = damped(c, damping)
    s = w.factor
    assert s.shape == (n, n)
    assert w.damping == pytest.approx(delta, rel=tolerance(np.float64, n))
    assert w.relative_damping == damping
    # backward stable: ‖S Sᵀ - (C + δI)‖ = O(n eps ‖C + δI‖)
    assert np.linalg.norm(s @ s.T - target, 2) <= tolerance(np.float64, n) * (lam[0] + delta)
    if w.method == "cholesky":
        assert np.array_equal(s, np.tril(s)), "Cholesky factor is lower triangular"
    else:
        assert np.max(np.abs(s - s.T)) <= tolerance(np.float64, n) * np.max(np.abs(s))
        assert np.all(np.linalg.eigvalsh((s + s.T) / 2) > 0), "symmetric square root is SPD"


@given(n=st.integers(1, 24), data=st.data(), method=methods, damping=dampings)
def test_inverse_is_inverse_of_factor(n, data, method, damping):
    c, _ = data.draw(covariances(n))
    w = jl.whiten(c, damping=damping, method=method)
    kappa = factor_condition(c, damping)
    eye = np.eye(n)
    assert np.linalg.norm(w.factor @ w.inverse - eye, 2) <= tolerance(np.float64, n, cond=kappa)
    assert np.linalg.norm(w.inverse @ w.factor - eye, 2) <= tolerance(np.float64, n, cond=kappa)


@given(n=st.integers(1, 16), data=st.data(), cond=st.floats(1.0, 1e6))
def test_inverse_without_damping_on_a_definite_covariance(n, data, cond):
    seed = data.draw(seeds)
    lam = spectrum(data.draw(st.sampled_from(["decaying", "stepped", "flat"])), n, cond=cond)
    c = covariance_with_spectrum(np.random.default_rng(seed), lam)
    for method in ("eigh", "cholesky"):
        w = jl.whiten(c, damping=0.0, method=method)
        assert w.damping == 0.0
        assert w.effective_rank == n
        kappa = factor_condition(c, 0.0)
        assert np.linalg.norm(w.factor @ w.factor.T - c, 2) <= tolerance(np.float64, n)
        assert np.linalg.norm(w.factor @ w.inverse - np.eye(n), 2) <= tolerance(
            np.float64, n, cond=kappa
        )


@given(n=st.integers(1, 24), data=st.data(), damping=dampings, k=st.integers(1, 5))
def test_eigh_and_cholesky_give_same_whitened_norm(n, data, damping, k):
    c, lam = data.draw(covariances(n))
    x = np.random.default_rng(data.draw(seeds)).standard_normal((n, k))
    e = jl.whiten(c, damping=damping, method="eigh")
    ch = jl.whiten(c, damping=damping, method="cholesky")
    assert e.damping == ch.damping
    # ‖Sᵀ X‖² = tr Xᵀ (C + δI) X for every valid factor
    norm_e = np.linalg.norm(e.factor.T @ x) ** 2
    norm_c = np.linalg.norm(ch.factor.T @ x) ** 2
    exact = np.trace(x.T @ damped(c, damping)[0] @ x)
    bound = tolerance(np.float64, n) * (lam[0] + e.damping) * np.linalg.norm(x) ** 2
    assert abs(norm_e - norm_c) <= bound
    assert abs(norm_e - exact) <= bound
    # ... and the two factors differ by an orthogonal matrix: L = S_sym O
    o = e.inverse @ ch.factor
    kappa = factor_condition(c, damping)
    assert np.linalg.norm(o.T @ o - np.eye(n), 2) <= tolerance(np.float64, n, cond=kappa**2)


@given(
    n=st.integers(1, 16),
    data=st.data(),
    method=methods,
    damping=dampings,
    scale=st.floats(1e-6, 1e6),
)
def test_damping_is_relative_and_reported(n, data, method, damping, scale):
    c, _ = data.draw(covariances(n, max_cond=1e8))
    w = jl.whiten(c, damping=damping, method=method)
    ws = jl.whiten(scale * c, damping=damping, method=method)
    mean_diag = float(np.mean(np.diag(c)))
    assert w.damping == pytest.approx(damping * mean_diag, rel=tolerance(np.float64, n))
    assert ws.damping == pytest.approx(scale * w.damping, rel=tolerance(np.float64, n))
    assert w.relative_damping == ws.relative_damping == damping
    # invariant to rescaling: S(cC) = sqrt(c) S(C) (same method, same orthogonal freedom)
    kappa = factor_condition(c, damping)
    assert np.linalg.norm(ws.factor - np.sqrt(scale) * w.factor) <= tolerance(
        np.float64, n, cond=kappa
    ) * np.sqrt(scale) * np.linalg.norm(w.factor)
    # effective rank is scale free and between 0 and n
    assert 0.0 <= w.effective_rank <= n + tolerance(np.float64, n)
    assert ws.effective_rank == pytest.approx(w.effective_rank, abs=tolerance(np.float64, n, cond=kappa**2))


def test_damping_zero_is_no_damping(rng):
    c = covariance_with_spectrum(rng, spectrum("decaying", 6, cond=10.0))
    for method in ("eigh", "cholesky"):
        w = jl.whiten(c, damping=0.0, method=method)
        assert w.damping == 0.0
        assert np.linalg.norm(w.factor @ w.factor.T - c) <= tolerance(np.float64, 6)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@given(seed=seeds, n=st.integers(4, 24), samples=st.integers(1, 3), damping=dampings)
def test_rank_deficient_covariance_is_handled(method, seed, n, samples, damping):
    """More features than samples: C = XᵀX/N has rank N < n."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, n)) * np.geomspace(1.0, 1e-3, n)
    c = x.T @ x / samples
    c = (c + c.T) / 2
    w = jl.whiten(c, damping=damping, method=method)
    assert np.all(np.isfinite(w.factor)) and np.all(np.isfinite(w.inverse))
    target, delta = damped(c, damping)
    assert w.damping == pytest.approx(delta, rel=tolerance(np.float64, n)) and w.damping > 0
    assert np.linalg.norm(w.factor @ w.factor.T - target, 2) <= tolerance(np.float64, n) * (
        _lam_max(c) + delta
    )
    kappa = factor_condition(c, damping)
    assert np.linalg.norm(w.factor @ w.inverse - np.eye(n), 2) <= tolerance(np.float64, n, cond=kappa)
    # what was done is said: the data resolve about N directions above δ
    assert w.effective_rank <= samples + tolerance(np.float64, n)
    if w.method == "eigh":
        assert w.numerical_rank == samples
        assert any("rank" in note and f"{samples} of {n}" in note for note in w.notes)


def test_rank_deficient_covariance_reported_by_projected_lowrank(rng):
    n, samples = 12, 3
    x = rng.standard_normal((samples, n))
    c = x.T @ x / samples
    weight = rng.standard_normal((5, n))
    res = jl.projected_lowrank(weight, 2, input_cov=c, whitening="eigh")
    assert np.all(np.isfinite(res.left)) and np.all(np.isfinite(res.right))
    info = res.input_whitening
    assert info.numerical_rank == samples
    assert info.damping == pytest.approx(jl.DEFAULT_DAMPING * np.mean(np.diag(c)))
    assert any("rank 3 of 12" in note for note in info.notes)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@given(seed=seeds, n=st.integers(2, 16), n_rows=st.integers(1, 30), damping=dampings)
def test_root_whitening_matches_gram(method, seed, n, n_rows, damping):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n)) * np.geomspace(1.0, 1e-4, n)
    acc = jl.MomentAccumulator(n, mode="qr")
    acc.update(x)
    root = acc.result()
    c = x.T @ x / n_rows
    c = (c + c.T) / 2
    w_root = jl.whiten(root, damping=damping, method=method)
    w_gram = jl.whiten(c, damping=damping, method=method)
    target, delta = damped(c, damping)
    assert w_root.damping == pytest.approx(delta, rel=tolerance(np.float64, n + n_rows))
    lam_max = _lam_max(c)
    assert np.linalg.norm(w_root.factor @ w_root.factor.T - target, 2) <= tolerance(
        np.float64, n + n_rows
    ) * (lam_max + delta)
    kappa = factor_condition(c, damping)
    assert np.linalg.norm(w_root.factor @ w_root.inverse - np.eye(n), 2) <= tolerance(
        np.float64, n + n_rows, cond=kappa
    )
    # same whitened norm as the Gram route
    probe = rng.standard_normal((n, 2))
    a = np.linalg.norm(w_root.factor.T @ probe) ** 2
    b = np.linalg.norm(w_gram.factor.T @ probe) ** 2
    assert abs(a - b) <= tolerance(np.float64, n + n_rows) * (lam_max + delta) * np.linalg.norm(probe) ** 2
    if method == "eigh":
        assert w_root.numerical_rank == w_gram.numerical_rank
        assert np.max(np.abs(w_root.spectrum - np.linalg.eigvalsh(c))) <= tolerance(
            np.float64, n + n_rows
        ) * lam_max


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_rounding_indefinite_is_clipped(method, rng):
    n = 10
    v = orthonormal(rng, n, n)
    lam = np.concatenate([np.linspace(1.0, 0.5, 6), np.zeros(4)])
    lam[-1] = -0.5 * n * np.finfo(np.float64).eps  # within 10 n eps λ_max: rounding
    c = (v * lam) @ v.T
    c = (c + c.T) / 2
    assert np.linalg.eigvalsh(c)[0] < 0
    w = jl.whiten(c, method=method)
    clipped = (v * np.clip(lam, 0, None)) @ v.T
    target = clipped + w.damping * np.eye(n)
    assert np.all(np.isfinite(w.factor))
    assert np.linalg.norm(w.factor @ w.factor.T - target, 2) <= tolerance(np.float64, n)
    if w.method == "eigh":
        assert any("clipped" in note for note in w.notes)
        assert np.all(w.spectrum >= 0)
    # the eigh path always reports it
    e = jl.whiten(c, method="eigh")
    assert any("clipped" in note and "rounding" in note for note in e.notes)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@given(
    seed=seeds,
    n=st.integers(2, 16),
    neg=st.floats(1e-6, 1.0),
    damping=st.sampled_from([0.0, 1e-3, 1e-1, 1.0, 10.0]),
)
def test_indefinite_raises(method, seed, n, neg, damping):
    """An eigenvalue -neg·λ_max is no rounding error, whatever the damping hides."""
    rng = np.random.default_rng(seed)
    lam = np.linspace(1.0, 0.1, n)
    lam[-1] = -neg
    c = covariance_with_spectrum(rng, lam)
    if np.mean(np.diag(c)) <= 0:  # pragma: no cover - lam has positive trace for n >= 2
        return
    with pytest.raises(ValueError, match=r"`cov` is indefinite"):
        jl.whiten(c, damping=damping, method=method)
    with pytest.raises(ValueError, match=r"`input_cov` is indefinite"):
        jl.projected_lowrank(rng.standard_normal((3, n)), 1, input_cov=c, whitening=method)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@given(seed=seeds, n=st.integers(2, 24), data=st.data(), scale=st.floats(1e-4, 1e4))
def test_singular_without_damping_raises(method, seed, n, data, scale):
    rank = data.draw(st.integers(1, n - 1))
    c = covariance_with_spectrum(np.random.default_rng(seed), scale * spectrum("rank", n, rank=rank))
    with pytest.raises(ValueError, match=r"`cov` is singular.*damping=0"):
        jl.whiten(c, damping=0.0, method=method)
    with pytest.raises(ValueError, match=r"`grad_cov` is singular"):
        jl.projected_lowrank(np.ones((n, 2)), 1, grad_cov=c, damping=0.0, whitening=method)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_singular_root_without_damping_raises(method, rng):
    acc = jl.MomentAccumulator(6, mode="qr")
    acc.update(rng.standard_normal((3, 6)))  # rank 3 of 6
    with pytest.raises(ValueError, match="singular"):
        jl.whiten(acc.result(), damping=0.0, method=method)


def test_zero_covariance_raises(rng):
    with pytest.raises(ValueError, match="identically zero"):
        jl.whiten(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="identically zero"):
        jl.whiten(np.zeros((3, 3)), method="cholesky")


def test_whiten_keeps_namespace(backend, rng):
    c = covariance_with_spectrum(rng, spectrum("decaying", 5, cond=100.0))
    for method in ("eigh", "cholesky"):
        w = jl.whiten(backend.asarray(c), method=method)
        like = backend.asarray(c)
        assert type(w.factor) is type(like) and type(w.inverse) is type(like)
        s = backend.to_numpy(w.factor)
        target, _ = damped(c, jl.DEFAULT_DAMPING)
        assert np.linalg.norm(s @ s.T - target) <= tolerance(np.float64, 5)


def _with_smallest(rng, n: int, kind: str, damping: float, depth: float):
    """``C`` with a PSD part of spectrum ``kind`` and smallest eigenvalue ``-depth·δ``.

    ``δ = damping · mean(diag C)`` includes the negative eigenvalue itself, so
    it is solved for: ``δ = damping (Σλ⁺ - depth δ) / n``.
    """
    if kind == "rank-deficient":
        lam = np.concatenate([np.geomspace(1.0, 1e-3, n // 2), np.zeros(n - n // 2)])
    else:  # full rank, down to rounding-free but tiny eigenvalues
        lam = np.geomspace(1.0, 1e-9, n)
    delta = damping * lam.sum() / n / (1.0 + damping * depth / n)
    lam[-1] = -depth * delta
    return covariance_with_spectrum(rng, lam), delta


@pytest.mark.parametrize("kind", ["rank-deficient", "full rank"])
@pytest.mark.parametrize("n", [64, 200])
def test_psd_certificate_without_a_second_cholesky(kind, n, monkeypatch):
    """Damping makes C + δI factorable whenever λ_min(C) > -δ; the certificate on
    the damped factor still refuses λ_min = -δ/2 (the Cholesky succeeds), refuses
    -2δ (it fails), accepts λ_min = 0, and costs no second Cholesky."""
    import jactus_linalg.whitening as whitening

    calls = []
    real = whitening.cholesky_lower

    def counted(xp, a):
        calls.append(1)
        return real(xp, a)

    monkeypatch.setattr(whitening, "cholesky_lower", counted)
    rng = np.random.default_rng(n)
    damping = 1e-3
    for depth in (0.5, 2.0):
        c, delta = _with_smallest(rng, n, kind, damping, depth)
        assert np.linalg.eigvalsh(c)[0] == pytest.approx(
            -depth * delta, rel=tolerance(np.float64, n, cond=1.0 / delta)
        )
        damped_factorable = np.all(np.linalg.eigvalsh(c + delta * np.eye(n)) > 0)
        assert damped_factorable == (depth < 1.0)
        with pytest.raises(ValueError, match=r"`cov` is indefinite"):
            jl.whiten(c, damping=damping, method="cholesky")
    calls.clear()
    c, _ = _with_smallest(rng, n, kind, damping, 0.0)
    w = jl.whiten(c, damping=damping, method="cholesky")
    assert w.method == "cholesky" and w.notes == ()
    assert len(calls) == 1, "one Cholesky per covariance: the certificate reuses its factor"


def test_cholesky_effective_rank_is_computed_only_when_asked(rng, monkeypatch):
    """The effective rank costs a triangular inversion: a Cholesky operator defers it
    to first access (the low-rank hot path never pays for it unless it reports it)."""
    import jactus_linalg.whitening as whitening

    n = 30
    lam = np.concatenate([np.geomspace(1.0, 1e-3, 20), np.zeros(10)])
    c = covariance_with_spectrum(rng, lam)
    calls = []
    real = whitening.inverse_frobenius_squared

    def counted(xp, lower):
        calls.append(1)
        return real(xp, lower)

    monkeypatch.setattr(whitening, "inverse_frobenius_squared", counted)
    op = whitening.whitening_operator(c, damping=1e-3, method="cholesky")
    assert calls == [] and op.rank_cache == [None]
    delta = op.damping
    want = float(np.sum(np.clip(lam, 0, None) / (np.clip(lam, 0, None) + delta)))
    cond = (lam.max() + delta) / delta
    assert op.effective_rank == pytest.approx(want, abs=tolerance(np.float64, n, cond=cond))
    assert op.effective_rank == op.effective_rank and calls == [1]  # computed once, kept


@given(n=st.integers(33, 80), data=st.data(), damping=dampings)
def test_psd_certificate_has_no_false_alarms(n, data, damping):
    """Above 32 features the certificate is a Krylov estimate; on positive semidefinite
    covariances of any spectrum (rank deficient, cond up to 1e12, any scale) it never
    claims an eigenvalue below rounding: the Cholesky factor is kept, with no note."""
    c, _ = data.draw(covariances(n))
    w = jl.whiten(c, damping=damping, method="cholesky")
    assert w.method == "cholesky", w.notes
    assert not any("not numerically positive definite" in note for note in w.notes)


@pytest.mark.parametrize(("where", "bad", "label"), [((250, 10), np.nan, "1 NaN"),
                                                     ((260, 260), np.inf, "1 Inf"),
                                                     ((5, 299), -np.inf, "1 Inf")])
def test_nonfinite_covariance_found_by_the_symmetry_pass(where, bad, label, rng):
    """The symmetry check reads every entry tile by tile and refuses NaN and Inf anywhere
    (beyond its first 128 x 128 tile too), with the counts of the finiteness check."""
    x = rng.standard_normal((400, 300))
    cov = x.T @ x / 400
    cov[where] = bad
    with pytest.raises(ValueError, match=rf"`cov` contains non-finite values \(.*{label}"):
        jl.whiten(cov)
