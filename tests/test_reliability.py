"""Reliability of the core: the covariances calibration really produces, and half precision.

Exactly singular covariances (fewer tokens than features, a dead unit, a
zero gradient), near-singular ones (condition number 1e8 to 1e16), ones
made indefinite by rounding, half-precision inputs, and determinism; each
through ``whiten``, ``projected_lowrank`` and ``jactus_layer``. The result
is finite, with the damping and effective rank reported, or a
``ValueError`` that names the argument and says what to do; never a NaN.
``docs/failure-modes.md`` lists the cases; the model-level ones are in
``tests/torch/`` (``test_bad_statistics.py``, ``test_half_precision.py``, ...).
"""

from __future__ import annotations

import numpy as np
import pytest

import jactus_linalg as jl

from .numerics import covariance_with_spectrum, factor_condition, tolerance

DAMP = jl.DEFAULT_DAMPING
N = 10  # features
M = 6  # outputs


def _finite(*arrays) -> bool:
    return all(np.all(np.isfinite(np.asarray(a, dtype=np.float64))) for a in arrays)


def _singular_covariance(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``(C, rank)`` for an exactly singular input covariance, as calibration makes them."""
    if kind == "fewer tokens than features":
        x = rng.standard_normal((3, N))  # three calibration tokens for ten features
        c = x.T @ x / 3
        return (c + c.T) / 2, 3
    x = rng.standard_normal((50, N))
    x[:, 4] = 0.0  # a dead input unit: never active
    c = x.T @ x / 50
    return (c + c.T) / 2, N - 1


def _check_whitening_info(info, cov: np.ndarray, rank: int, method: str) -> None:
    """The damping and effective rank are reported, and right."""
    delta = DAMP * float(np.mean(np.diag(cov)))
    assert info.damping == pytest.approx(delta, rel=tolerance(np.float64, N))
    assert info.relative_damping == DAMP
    lam = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    reference = float(np.sum(lam / (lam + delta)))
    kappa2 = factor_condition(cov, DAMP) ** 2
    assert info.effective_rank == pytest.approx(
        reference, abs=tolerance(np.float64, N, cond=kappa2)
    )
    assert info.effective_rank <= rank + tolerance(np.float64, N)  # no more than the data resolve
    if method == "eigh":
        assert info.numerical_rank == rank
        assert any(f"rank {rank} of {N}" in note for note in info.notes)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
@pytest.mark.parametrize("kind", ["fewer tokens than features", "dead unit"])
def test_exactly_singular_covariance_through_every_entry_point(kind, method, rng):
    """Damped: finite, with damping and effective rank reported. Undamped: a clear error."""
    cov, rank = _singular_covariance(kind, rng)
    assert np.linalg.matrix_rank(cov) == rank
    w = rng.standard_normal((M, N))
    square = rng.standard_normal((N, N))
    grad = rng.standard_normal((N, N))

    white = jl.whiten(cov, method=method)
    assert _finite(white.factor, white.inverse)
    _check_whitening_info(white, cov, rank, method)
    kappa = factor_condition(cov, DAMP)
    assert np.linalg.norm(white.factor @ white.inverse - np.eye(N), 2) <= tolerance(
        np.float64, N, cond=kappa
    )

    low = jl.projected_lowrank(w, 2, input_cov=cov, whitening=method)
    assert _finite(low.left, low.core, low.right)
    _check_whitening_info(low.input_whitening, cov, rank, method)
    measured = jl.curvature_error(w, low.left, low.core, low.right, input_cov=cov, whitening=method)
    assert measured == pytest.approx(low.error, rel=tolerance(np.float64, N, cond=kappa))

    lay = jl.jactus_layer(
        square, 4, input_cov=cov, grad_cov=cov, grad_mean=grad, task_fraction=0.5, whitening=method
    )
    assert _finite(lay.left, lay.core, lay.right)
    for info in (lay.input_whitening, lay.grad_whitening):
        _check_whitening_info(info, cov, rank, method)
    slack = tolerance(np.float64, N, cond=kappa**2) * np.sqrt(lay.total_energy)
    assert lay.eckart_young - slack <= lay.error <= lay.weight_bound + slack

    # damping=0 asks for an inverse that does not exist: say so, and what to do
    singular = rf"is singular \(numerical rank {rank} of {N}\) and damping=0.*Raise `damping`"
    with pytest.raises(ValueError, match=rf"`cov` {singular}"):
        jl.whiten(cov, damping=0.0, method=method)
    with pytest.raises(ValueError, match=rf"`input_cov` {singular}"):
        jl.projected_lowrank(w, 2, input_cov=cov, damping=0.0, whitening=method)
    with pytest.raises(ValueError, match=rf"`grad_cov` {singular}"):
        jl.jactus_layer(
            square,
            4,
            input_cov=np.eye(N),
            grad_cov=cov,
            grad_mean=grad,
            damping=0.0,
            whitening=method,
        )


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_zero_gradient_statistics(method, rng):
    """A zero C_g cannot whiten (clear error, what to do); a zero G just adds no task direction."""
    w = rng.standard_normal((M, N))
    cx = np.cov(rng.standard_normal((N, 40)))
    with pytest.raises(
        ValueError, match=r"`cov` is identically zero.*pass None for this statistic"
    ):
        jl.whiten(np.zeros((M, M)), method=method)
    with pytest.raises(ValueError, match=r"`grad_cov` is identically zero.*pass None"):
        jl.projected_lowrank(w, 2, input_cov=cx, grad_cov=np.zeros((M, M)), whitening=method)
    with pytest.raises(ValueError, match=r"`grad_cov` is identically zero"):
        jl.jactus_layer(
            w,
            2,
            input_cov=cx,
            grad_cov=np.zeros((M, M)),
            grad_mean=np.zeros((M, N)),
            whitening=method,
        )
    # G = 0 with task_fraction > 0: no task direction, exactly the tau = 0 (optimal) result
    task = jl.jactus_layer(
        w, 3, input_cov=cx, grad_mean=np.zeros((M, N)), task_fraction=0.5, whitening=method,
        task_directions="gradient",
    )
    plain = jl.jactus_layer(w, 3, input_cov=cx, task_fraction=0.0, whitening=method)
    assert task.task_directions == 0 and task.weight_directions == 3
    for a, b in ((task.left, plain.left), (task.core, plain.core), (task.right, plain.right)):
        np.testing.assert_array_equal(a, b)
    assert (
        task.error
        == plain.error
        == pytest.approx(plain.eckart_young, rel=tolerance(np.float64, N, cond=1e3))
    )


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
@pytest.mark.parametrize("cond", [1e8, 1e10, 1e12, 1e14, 1e16])
def test_near_singular_covariance(cond, method, rng):
    """Condition number 1e8 to 1e16: damped, accurate to eps times the damped condition number."""
    n = 12
    lam = np.geomspace(1.0, 1.0 / cond, n)
    cov = covariance_with_spectrum(rng, lam)
    w = rng.standard_normal((M, n))

    white = jl.whiten(cov, method=method)
    delta = white.damping
    assert _finite(white.factor, white.inverse)
    assert np.linalg.norm(white.factor @ white.factor.T - cov - delta * np.eye(n), 2) <= tolerance(
        np.float64, n
    ) * (1.0 + delta)
    kappa = factor_condition(cov, DAMP)  # at most sqrt(1 + n / damping), whatever cond is
    assert kappa <= np.sqrt(1 + n / DAMP)
    assert np.linalg.norm(white.factor @ white.inverse - np.eye(n), 2) <= tolerance(
        np.float64, n, cond=kappa
    )
    reference = float(np.sum(lam / (lam + delta)))
    assert white.effective_rank == pytest.approx(
        reference, abs=tolerance(np.float64, n, cond=kappa**2)
    )

    grad = rng.standard_normal((M, n))
    for res in (
        jl.projected_lowrank(w, 3, input_cov=cov, whitening=method),
        jl.jactus_layer(
            w, 3, input_cov=cov, grad_mean=grad, whitening=method, task_directions="gradient"
        ),
    ):
        assert _finite(res.left, res.core, res.right)
        info = res.input_whitening
        assert info.damping == pytest.approx(delta)
        assert info.effective_rank == pytest.approx(
            white.effective_rank, abs=tolerance(np.float64, n, cond=kappa**2)
        )
        measured = jl.curvature_error(
            w, res.left, res.core, res.right, input_cov=cov, whitening=method
        )
        assert measured == pytest.approx(res.error, rel=tolerance(np.float64, n, cond=kappa**2))

    # damping=0: exact to eps * kappa while the spectrum is resolved
    # (lambda_min > n eps lambda_max),
    # a clear "singular" error once it is not; never a NaN in between
    try:
        bare = jl.whiten(cov, damping=0.0, method=method)
    except ValueError as err:
        assert cond >= 1e14, f"cond={cond:g} is resolved in float64 but was refused: {err}"
        assert "is singular" in str(err) and "damping=0" in str(err)
        return
    assert cond <= 1e14, f"cond={cond:g} is beyond float64 but whiten(damping=0) accepted it"
    assert bare.damping == 0.0 and bare.effective_rank == n
    assert _finite(bare.factor, bare.inverse)
    assert np.linalg.norm(bare.factor @ bare.factor.T - cov, 2) <= tolerance(np.float64, n)
    assert np.linalg.norm(bare.factor @ bare.inverse - np.eye(n), 2) <= tolerance(
        np.float64, n, cond=np.sqrt(cond)
    )


def test_failed_cholesky_falls_back_once_and_says_so(monkeypatch):
    """No retry loop: a Cholesky that fails is not retried with more damping.

    ``C = 1 1^T`` (rank one, lambda_max = n, diagonal 1) plus a rounding-size
    negative eigenvalue: the Cholesky of ``C + 10 n eps max(diag C) I`` fails,
    the symmetric square root takes over once, and ``notes`` says so.
    """
    import jactus_linalg.whitening as whitening

    n = 8
    ones = np.ones((n, 1)) / np.sqrt(n)
    rest = np.linalg.qr(np.hstack([ones, np.eye(n)[:, 1:]]))[0][:, 1:]
    eps = np.finfo(np.float64).eps
    cov = n * ones @ ones.T - 5 * n * n * eps * rest[:, :1] @ rest[:, :1].T
    cov = (cov + cov.T) / 2
    calls = []

    def counted(xp, a):
        calls.append(1)
        return whitening_cholesky(xp, a)

    whitening_cholesky = whitening.cholesky_lower
    monkeypatch.setattr(whitening, "cholesky_lower", counted)
    white = jl.whiten(cov, method="cholesky")
    assert len(calls) == 1  # one attempt, no loop
    assert white.method == "eigh" and _finite(white.factor, white.inverse)
    assert any(
        "not numerically positive definite" in note and "eigh" in note for note in white.notes
    )
    assert any("clipped" in note for note in white.notes)
    # S S^T = C (negative eigenvalue clipped) + delta I, to rounding times lambda_max = n
    target = cov + white.damping * np.eye(n)
    assert np.linalg.norm(white.factor @ white.factor.T - target, 2) <= tolerance(np.float64, n) * n


def _rounding_indefinite_float32(rng: np.random.Generator, n: int = 16) -> np.ndarray:
    """A float32 Gram matrix (fewer samples than features) that rounding left indefinite."""
    for _ in range(50):
        x = rng.standard_normal((4, n)).astype(np.float32)
        c = (x.T @ x) / np.float32(4)
        c = (c + c.T) / np.float32(2)
        if np.linalg.eigvalsh(c.astype(np.float64))[0] < 0:
            return c
    raise AssertionError("no rounding-indefinite Gram matrix in 50 draws")  # pragma: no cover


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_rounding_indefinite_covariance_is_clipped(method, rng):
    """Rank 4 of 16 in float32: zero eigenvalues come out slightly negative.

    They are clipped and reported, and the result is finite.
    """
    cov = _rounding_indefinite_float32(rng)
    n = cov.shape[0]
    lam, vecs = np.linalg.eigh(cov.astype(np.float64))
    clipped = (vecs * np.clip(lam, 0.0, None)) @ vecs.T

    white = jl.whiten(cov, method=method)
    assert white.factor.dtype == np.float32 and _finite(white.factor, white.inverse)
    target = clipped + white.damping * np.eye(n)
    residual = white.factor.astype(np.float64) @ white.factor.T.astype(np.float64) - target
    assert np.linalg.norm(residual, 2) <= tolerance(np.float32, n) * lam[-1]
    # each rounding eigenvalue (at most ~ n eps lambda_max) adds at most lambda / delta
    rounding = tolerance(np.float32, n, cond=lam[-1] / white.damping)
    assert white.effective_rank <= 4 + rounding
    if method == "eigh":
        assert white.numerical_rank == 4
        assert any("clipped" in note and "rounding" in note for note in white.notes)
        assert np.all(white.spectrum >= 0)

    w = rng.standard_normal((M, n)).astype(np.float32)
    low = jl.projected_lowrank(w, 2, input_cov=cov, whitening=method)
    lay = jl.jactus_layer(
        w,
        2,
        input_cov=cov,
        grad_cov=np.eye(M, dtype=np.float32),
        grad_mean=rng.standard_normal((M, n)).astype(np.float32),
        whitening=method,
    )
    for res in (low, lay):
        assert res.left.dtype == np.float32 and _finite(res.left, res.core, res.right)
        assert res.input_whitening.effective_rank <= 4 + rounding


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_half_precision_is_upcast_then_rounded_once(dtype_name, rng):
    """torch refuses SVD/QR/Cholesky in half precision.

    The core upcasts to float32, decomposes, and rounds the result once.
    """
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    x = torch.as_tensor(rng.standard_normal((40, N)))
    g = torch.as_tensor(rng.standard_normal((40, M)))
    w = torch.as_tensor(rng.standard_normal((M, N))).to(dtype)
    cx, cg, grad = [t.to(dtype) for t in (x.T @ x / 40, g.T @ g / 40, g.T @ x / 40)]
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.linalg.svd(w)  # what the shim exists for
    half = jl.jactus_layer(w, 3, input_cov=cx, grad_cov=cg, grad_mean=grad)
    full = jl.jactus_layer(
        w.float(), 3, input_cov=cx.float(), grad_cov=cg.float(), grad_mean=grad.float()
    )
    for a, b in ((half.left, full.left), (half.core, full.core), (half.right, full.right)):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))  # the same float32 computation, rounded once
    assert half.error == full.error


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_core_results_are_bit_identical_across_calls(svd, backend_name, rng):
    """Same inputs, same statistics and factors, bit for bit.

    The randomized SVD draws its test matrices from a fixed seed.
    """
    data = rng.standard_normal((200, 60))
    arrays = [
        rng.standard_normal((40, 60)),
        np.cov(rng.standard_normal((40, 200))),
        rng.standard_normal((40, 60)),
    ]
    if backend_name == "torch":
        torch = pytest.importorskip("torch")
        data = torch.as_tensor(data)
        arrays = [torch.as_tensor(a) for a in arrays]
    w, cg, grad = arrays
    covs = []
    for _ in range(2):
        acc = jl.MomentAccumulator(60)
        for start in range(0, 200, 64):
            acc.update(data[start : start + 64])
        covs.append(acc.result())
    np.testing.assert_array_equal(np.asarray(covs[0]), np.asarray(covs[1]))
    runs = [
        jl.jactus_layer(w, 2, input_cov=covs[0], grad_cov=cg, grad_mean=grad, max_rank=4, svd=svd)
        for _ in range(2)
    ]
    for a, b in zip(runs[0][:3], runs[1][:3], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert runs[0].error == runs[1].error
