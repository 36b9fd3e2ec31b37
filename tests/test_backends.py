"""numpy, array-api-strict and torch agree; results stay in the input's namespace."""

from __future__ import annotations

import numpy as np
import pytest

import jactus_linalg as jl

from .conftest import Backend
from .numerics import (
    covariance_with_spectrum,
    orthonormal,
    relative_gap,
    spectrum,
    tolerance,
    with_spectrum,
)
from .test_lowrank import Reference

M, N, R = 14, 10, 4


@pytest.fixture(scope="module")
def problem():
    """A layer with well-separated spectra, so every result is well defined."""
    rng = np.random.default_rng(7)
    w = with_spectrum(rng, M, N, np.geomspace(1.0, 1e-2, N))
    cx = covariance_with_spectrum(rng, spectrum("decaying", N, cond=1e2))
    cg = covariance_with_spectrum(rng, spectrum("decaying", M, cond=1e2))
    g = with_spectrum(rng, M, N, np.geomspace(1.0, 1e-1, 3))
    bases = (rng.standard_normal((M, 3)), rng.standard_normal((M, 4)) + 0.5)
    return {"W": w, "Cx": cx, "Cg": cg, "G": g, "bases": bases}


def _same_kind(result, like) -> None:
    assert type(result) is type(like)
    assert result.dtype == like.dtype


def _product(res) -> np.ndarray:
    b = Backend("numpy")
    return b.to_numpy(res.left) @ b.to_numpy(res.core) @ b.to_numpy(res.right).T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backends_agree(backend, dtype, problem):
    w, cx, cg, g = problem["W"], problem["Cx"], problem["Cg"], problem["G"]
    x = {k: backend.asarray(v, dtype) for k, v in (("W", w), ("Cx", cx), ("Cg", cg), ("G", g))}
    ref = Reference(w, cx, cg)
    cond_cov = float(np.linalg.cond(cx))

    # whiten: both methods, against the float64 numpy result
    for method in ("eigh", "cholesky"):
        got = jl.whiten(x["Cx"], method=method)
        want = jl.whiten(cx, method=method)
        _same_kind(got.factor, x["Cx"])
        _same_kind(got.inverse, x["Cx"])
        diff = backend.to_numpy(got.factor) - want.factor
        assert np.linalg.norm(diff) <= tolerance(dtype, N, cond=cond_cov) * np.linalg.norm(want.factor)
        assert got.damping == pytest.approx(want.damping, rel=tolerance(dtype, N))

    # union of subspaces: same dimension, same span
    bases = [backend.asarray(b, dtype) for b in problem["bases"]]
    got_u = jl.union_of_subspaces(*bases)
    want_u = jl.union_of_subspaces(*problem["bases"])
    _same_kind(got_u.basis, bases[0])
    assert got_u.contributions == want_u.contributions == (3, 4)
    q = backend.to_numpy(got_u.basis)
    cond_b = max(np.linalg.cond(np.concatenate(problem["bases"], axis=1)), 1.0)
    assert np.linalg.norm(q @ q.T - want_u.basis @ want_u.basis.T) <= tolerance(dtype, M, cond=cond_b)

    # projected_lowrank: no bases, with bases, with both covariances
    gap = relative_gap(ref.sigma, R)
    cases = [
        ({}, {}),
        ({"input_cov": x["Cx"], "grad_cov": x["Cg"]}, {"input_cov": cx, "grad_cov": cg}),
        (
            {
                "input_cov": x["Cx"],
                "left": backend.asarray(w[:, :5], dtype),
                "right": backend.asarray(w.T[:, :4], dtype),
            },
            {"input_cov": cx, "left": w[:, :5], "right": w.T[:, :4]},
        ),
    ]
    for kwargs, np_kwargs in cases:
        got_r = jl.projected_lowrank(x["W"], R, **kwargs)
        want_r = jl.projected_lowrank(w, R, **np_kwargs)
        for field in ("left", "core", "right"):
            _same_kind(getattr(got_r, field), x["W"])
        assert got_r.core.shape == want_r.core.shape
        diff = _product(got_r) - _product(want_r)
        tol = tolerance(dtype, M + N, cond=ref.kappa**2 / gap)
        assert np.linalg.norm(diff) <= tol * np.linalg.norm(w)
        assert abs(got_r.error - want_r.error) <= tol * np.linalg.norm(ref.m_white)

    # jactus_layer
    got_j = jl.jactus_layer(x["W"], R, input_cov=x["Cx"], grad_cov=x["Cg"], grad_mean=x["G"], task_fraction=0.5)
    want_j = jl.jactus_layer(w, R, input_cov=cx, grad_cov=cg, grad_mean=g, task_fraction=0.5)
    for field in ("left", "core", "right"):
        _same_kind(getattr(got_j, field), x["W"])
    assert (got_j.weight_directions, got_j.task_directions) == (2, 2)
    assert got_j.core.shape == want_j.core.shape
    diff = _product(got_j) - _product(want_j)
    assert np.linalg.norm(diff) <= tolerance(dtype, M + N, cond=ref.kappa**2 / gap) * np.linalg.norm(w)
    assert np.max(np.abs(np.asarray(got_j.gains) - want_j.gains)) <= tolerance(
        dtype, M + N, cond=ref.kappa**2 / gap
    ) * ref.energy


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_is_upcast(half, problem):
    torch = pytest.importorskip("torch")
    half_dtype = getattr(torch, half)
    w_h = torch.as_tensor(problem["W"]).to(half_dtype)
    cx_h = torch.as_tensor(problem["Cx"]).to(half_dtype)
    cg_h = torch.as_tensor(problem["Cg"]).to(half_dtype)
    g_h = torch.as_tensor(problem["G"]).to(half_dtype)
    # the same (rounded) data in float32: what the computation must run on
    w_32, cx_32, cg_32, g_32 = (t.float() for t in (w_h, cx_h, cg_h, g_h))

    res_h = jl.projected_lowrank(w_h, R, input_cov=cx_h, grad_cov=cg_h)
    res_32 = jl.projected_lowrank(w_32, R, input_cov=cx_32, grad_cov=cg_32)
    for field in ("left", "core", "right"):
        got, want = getattr(res_h, field), getattr(res_32, field)
        assert got.dtype == half_dtype, "factors come back in the weight's dtype"
        # computed in float32 and rounded once at the end
        assert torch.equal(got, want.to(half_dtype))
    assert res_h.error == pytest.approx(res_32.error, rel=tolerance(torch.float32, M + N, cond=1e4))

    lay_h = jl.jactus_layer(w_h, R, input_cov=cx_h, grad_cov=cg_h, grad_mean=g_h, task_fraction=0.5)
    lay_32 = jl.jactus_layer(w_32, R, input_cov=cx_32, grad_cov=cg_32, grad_mean=g_32, task_fraction=0.5)
    for field in ("left", "core", "right"):
        got, want = getattr(lay_h, field), getattr(lay_32, field)
        assert got.dtype == half_dtype
        assert torch.equal(got, want.to(half_dtype))

    # whiten decomposes in float32 (torch has no half-precision eigh/cholesky)
    for method in ("eigh", "cholesky"):
        w_half = jl.whiten(cx_h, method=method)
        w_f32 = jl.whiten(cx_32, method=method)
        assert w_half.factor.dtype == torch.float32
        assert torch.equal(w_half.factor, w_f32.factor)

    # a half-precision result is as good as float32 rounded to half
    ref = Reference(w_32.double().numpy(), cx_32.double().numpy(), cg_32.double().numpy())
    approx = (lay_h.left.double() @ lay_h.core.double() @ lay_h.right.double().T).numpy()
    exact = (lay_32.left.double() @ lay_32.core.double() @ lay_32.right.double().T).numpy()
    assert np.linalg.norm(approx - exact) <= tolerance(half_dtype, M + N, cond=ref.kappa) * np.linalg.norm(exact)


def test_union_of_subspaces_half_precision_upcasts():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a = torch.as_tensor(orthonormal(rng, 8, 3)).to(torch.float16)
    b = torch.as_tensor(orthonormal(rng, 8, 2)).to(torch.float16)
    res = jl.union_of_subspaces(a, b)
    assert res.basis.dtype == torch.float32
    q = res.basis.double().numpy()
    assert np.linalg.norm(q.T @ q - np.eye(q.shape[1])) <= tolerance(torch.float32, 8)


@pytest.mark.cuda
def test_cuda_matches_cpu(backend_cuda, problem):
    torch = pytest.importorskip("torch")
    w, cx, cg, g = problem["W"], problem["Cx"], problem["Cg"], problem["G"]
    ref = Reference(w, cx, cg)
    gap = relative_gap(ref.sigma, R)
    for dtype in (np.float64, np.float32):
        x = {k: backend_cuda.asarray(v, dtype) for k, v in (("W", w), ("Cx", cx), ("Cg", cg), ("G", g))}
        res = jl.projected_lowrank(x["W"], R, input_cov=x["Cx"], grad_cov=x["Cg"])
        cpu = jl.projected_lowrank(w, R, input_cov=cx, grad_cov=cg)
        for field in ("left", "core", "right"):
            arr = getattr(res, field)
            assert arr.device.type == "cuda" and arr.dtype == x["W"].dtype
        diff = _product(res) - _product(cpu)
        assert np.linalg.norm(diff) <= tolerance(dtype, M + N, cond=ref.kappa**2 / gap) * np.linalg.norm(w)
        lay = jl.jactus_layer(x["W"], R, input_cov=x["Cx"], grad_cov=x["Cg"], grad_mean=x["G"])
        lay_cpu = jl.jactus_layer(w, R, input_cov=cx, grad_cov=cg, grad_mean=g)
        assert lay.left.device.type == "cuda"
        diff = _product(lay) - _product(lay_cpu)
        assert np.linalg.norm(diff) <= tolerance(dtype, M + N, cond=ref.kappa**2 / gap) * np.linalg.norm(w)
        wh = jl.whiten(x["Cx"], method="cholesky")
        assert wh.factor.device.type == "cuda"
        acc = jl.MomentAccumulator(N)
        acc.update(x["W"])
        assert acc.result().dtype == torch.float32, "float32 statistics on CUDA by default"


@pytest.mark.parametrize("n", [1, 7, 60])
def test_inverse_frobenius_squared_every_route(n):
    """‖L⁻¹‖_F² by LAPACK trtri (numpy, torch CPU), by ``cholesky_inverse``
    (the route torch takes on other devices, run here on CPU) and by the
    generic solve (array-api-strict) against an explicit inverse."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp_torch
    import array_api_strict as xp_strict

    from jactus_linalg import _backend

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    lower = np.linalg.cholesky(a @ a.T + 0.1 * np.eye(n))
    want = float(np.sum(np.linalg.inv(lower) ** 2))
    cond = np.linalg.cond(lower) ** 2
    tol = tolerance(np.float64, n, cond=cond) * want
    got = {
        "numpy": _backend.inverse_frobenius_squared(np, lower),
        "torch cpu": _backend.inverse_frobenius_squared(xp_torch, torch.from_numpy(lower)),
        "torch device route": _backend._inverse_frobenius_squared_on_device(torch.from_numpy(lower)),
        "array-api-strict": _backend.inverse_frobenius_squared(xp_strict, xp_strict.asarray(lower)),
    }
    for route, value in got.items():
        assert abs(value - want) <= tol, route


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("tri_order", ["C", "F"])
@pytest.mark.parametrize("x_order", ["C", "F"])
def test_triangular_times_is_the_triangular_product(dtype, transpose, tri_order, x_order):
    """BLAS ``trmm`` on every memory layout equals ``op(L) @ X`` (and torch's ``@`` route)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp_torch

    from jactus_linalg import _backend

    rng = np.random.default_rng(7)
    n, k = 37, 11
    lower = np.tril(rng.standard_normal((n, n))).astype(dtype)
    x = rng.standard_normal((n, k)).astype(dtype)
    lower = np.asfortranarray(lower) if tri_order == "F" else np.ascontiguousarray(lower)
    x = np.asfortranarray(x) if x_order == "F" else np.ascontiguousarray(x)
    want = (lower.T if transpose else lower).astype(np.float64) @ x.astype(np.float64)
    got = _backend.triangular_times(np, lower, x, lower=True, transpose=transpose)
    scale = np.abs(lower).astype(np.float64) @ np.abs(x).astype(np.float64)
    bound = tolerance(dtype, n) * np.max(scale)
    assert got.shape == want.shape and got.dtype == dtype
    assert np.max(np.abs(got - want)) <= bound
    upper = np.ascontiguousarray(lower.T)
    got_upper = _backend.triangular_times(np, upper, x, lower=False, transpose=not transpose)
    assert np.max(np.abs(got_upper - want)) <= bound
    via_torch = _backend.triangular_times(
        xp_torch, torch.from_numpy(lower), torch.from_numpy(x), lower=True, transpose=transpose
    )
    assert np.max(np.abs(via_torch.numpy() - want)) <= bound


def test_torch_inputs_never_call_scipy(monkeypatch):
    """No BLAS mixing: with torch tensors, every factorization, solve, product and the
    effective rank run in torch's own LAPACK/BLAS (a scipy/OpenBLAS call between MKL
    calls leaves OpenBLAS threads spinning and slows the next MKL SVD, issue 17)."""
    torch = pytest.importorskip("torch")
    import scipy.linalg

    import jactus_linalg as jl

    def forbidden(*args, **kwargs):
        msg = "scipy called on the torch path"
        raise AssertionError(msg)

    for name in ("cholesky", "solve_triangular", "svd", "qr", "eigh", "get_lapack_funcs",
                 "get_blas_funcs", "inv"):
        monkeypatch.setattr(scipy.linalg, name, forbidden)
    rng = np.random.default_rng(3)
    m, n = 20, 40
    x = rng.standard_normal((3 * n, n))
    cx = torch.from_numpy(x.T @ x / len(x))
    g = rng.standard_normal((3 * m, m))
    cg = torch.from_numpy(g.T @ g / len(g))
    w = torch.from_numpy(rng.standard_normal((m, n)))
    for method in ("cholesky", "eigh"):
        white = jl.whiten(cx, method=method)
        assert 0.0 < white.effective_rank <= n
    jl.whiten(cx, method="cholesky", damping="svd-llm")
    res = jl.projected_lowrank(w, 5, input_cov=cx, grad_cov=cg)
    assert res.input_whitening.effective_rank is not None
    jl.projected_lowrank(w, 5, input_cov=cx, damping="svd-llm")
