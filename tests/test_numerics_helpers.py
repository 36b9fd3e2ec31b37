"""Tests of the test helpers themselves: a tolerance that ignores its arguments
(matfree's once silently ignored its own ``rtol``) would make every other test
vacuous, and so would a "known spectrum" that is not the one asked for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from .numerics import (
    covariance_with_spectrum,
    orthonormal,
    spectrum,
    tokens_with_spectrum,
    tolerance,
    with_spectrum,
)
from .strategies import covariances, seeds, weights

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def test_tolerance_is_c_n_eps_cond():
    assert tolerance(np.float64, 1, c=1.0) == EPS64
    assert tolerance(np.float64, 7, c=3.0, cond=5.0) == pytest.approx(3.0 * 7 * EPS64 * 5.0, rel=0)
    assert tolerance("float32", 4) == pytest.approx(10.0 * 4 * EPS32, rel=0)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_tolerance_scales_linearly_with_n_c_and_cond(dtype):
    base = tolerance(dtype, 3, c=2.0, cond=1.0)
    assert tolerance(dtype, 6, c=2.0, cond=1.0) == pytest.approx(2 * base, rel=1e-15)
    assert tolerance(dtype, 3, c=8.0, cond=1.0) == pytest.approx(4 * base, rel=1e-15)
    assert tolerance(dtype, 3, c=2.0, cond=1e6) == pytest.approx(1e6 * base, rel=1e-15)


def test_tolerance_scales_with_eps_of_dtype():
    t64 = tolerance(np.float64, 10)
    t32 = tolerance(np.float32, 10)
    t16 = tolerance(np.float16, 10)
    tbf = tolerance("bfloat16", 10)
    assert t32 / t64 == pytest.approx(EPS32 / EPS64)
    assert t16 == pytest.approx(10 * 10 * 2.0**-10)
    assert tbf == pytest.approx(10 * 10 * 2.0**-7)
    assert t64 < t32 < t16 < tbf


def test_tolerance_accepts_numpy_torch_and_named_dtypes():
    torch = pytest.importorskip("torch")
    for np_dtype, torch_dtype in (
        (np.float64, torch.float64),
        (np.float32, torch.float32),
        (np.float16, torch.float16),
    ):
        ref = tolerance(np_dtype, 5)
        assert tolerance(torch_dtype, 5) == ref
        assert tolerance(np.dtype(np_dtype), 5) == ref
        assert tolerance(np.dtype(np_dtype).name, 5) == ref
    assert tolerance(torch.bfloat16, 5) == tolerance("bfloat16", 5)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": 0}, ValueError),
        ({"n": -3}, ValueError),
        ({"n": 2.5}, TypeError),
        ({"n": True}, TypeError),
        ({"n": 4, "c": 0.0}, ValueError),
        ({"n": 4, "c": -1.0}, ValueError),
        ({"n": 4, "c": math.nan}, ValueError),
        ({"n": 4, "c": math.inf}, ValueError),
        ({"n": 4, "cond": 0.5}, ValueError),
        ({"n": 4, "cond": math.nan}, ValueError),
        ({"n": 4, "cond": math.inf}, ValueError),
        ({"n": 4, "cond": "big"}, TypeError),
    ],
)
def test_tolerance_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        tolerance(np.float64, **kwargs)


@pytest.mark.parametrize("dtype", ["int64", np.int32, "complex128", "float8", None])
def test_tolerance_rejects_unknown_dtypes(dtype):
    with pytest.raises(ValueError, match="epsilon"):
        tolerance(dtype, 3)


def test_tolerance_accepts_numpy_integers_and_floats():
    assert tolerance(np.float64, np.int64(3), c=np.float64(2.0), cond=np.float32(4.0)) == (
        pytest.approx(2.0 * 3 * EPS64 * 4.0)
    )


@given(seed=seeds, n=st.integers(1, 30), k=st.integers(1, 30))
def test_orthonormal_has_orthonormal_columns(seed, n, k):
    k = min(k, n)
    q = orthonormal(np.random.default_rng(seed), n, k)
    assert q.shape == (n, k)
    assert np.linalg.norm(q.T @ q - np.eye(k)) <= tolerance(np.float64, n)


@pytest.mark.parametrize("kind", ["decaying", "stepped", "rank", "flat"])
@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_spectrum_kinds(kind, k):
    cond = 1e8
    s = spectrum(kind, k, cond=cond, rank=min(3, k))
    assert s.shape == (k,)
    assert np.all(np.diff(s) <= 0), "spectra are descending"
    assert s[0] == 1.0
    if kind == "decaying" and k > 1:
        assert s[-1] == pytest.approx(1.0 / cond)
    if kind == "stepped" and k >= 3:
        assert set(np.round(np.log10(s)).astype(int)) == {0, -4, -8}
    if kind == "rank":
        assert int(np.sum(s > 0)) == min(3, k)
        assert np.all(s[min(3, k) :] == 0.0)
    if kind == "flat":
        assert np.all(s == 1.0)


def test_spectrum_rejects_unknown_kind():
    with pytest.raises(ValueError):
        spectrum("gaussian", 4)


@given(data=weights(max_side=20))
def test_weights_have_the_advertised_singular_values(data):
    w, sigma = data
    got = np.linalg.svd(w, compute_uv=False)
    assert np.max(np.abs(got - sigma)) <= tolerance(np.float64, max(w.shape)) * sigma[0]


@given(n=st.integers(1, 24), data=st.data())
def test_covariances_have_the_advertised_spectrum(n, data):
    c, lam = data.draw(covariances(n))
    assert np.array_equal(c, c.T), "exactly symmetric"
    got = np.linalg.eigvalsh(c)[::-1]
    assert np.max(np.abs(got - lam)) <= tolerance(np.float64, n) * lam[0]


def test_with_spectrum_and_covariance_with_spectrum_are_reproducible():
    a = with_spectrum(np.random.default_rng(3), 5, 4, [3.0, 2.0, 1.0])
    b = with_spectrum(np.random.default_rng(3), 5, 4, [3.0, 2.0, 1.0])
    assert np.array_equal(a, b)
    assert np.linalg.matrix_rank(a) == 3
    c = covariance_with_spectrum(np.random.default_rng(4), [2.0, 1.0, 0.0])
    assert np.linalg.matrix_rank(c) == 2


def test_tokens_have_the_advertised_second_moment():
    """``X = Z diag(√λ) Vᵀ``: the columns span ``V``'s first ``rank`` columns exactly, and
    ``XᵀX / N`` tends to ``V diag(λ) Vᵀ`` at the rate 1/√N of Gaussian sample moments."""
    n, rank = 12, 8
    lam = np.concatenate([np.geomspace(4.0, 1e-2, rank), np.zeros(n - rank)])
    errors = []
    for count in (400, 40_000):
        x = tokens_with_spectrum(np.random.default_rng(5), count, lam)
        assert x.shape == (count, n)
        got = np.linalg.eigvalsh(x.T @ x / count)[::-1]
        # exact zeros stay zeros (to rounding); the rank is the number of positive eigenvalues
        assert np.max(np.abs(got[rank:])) <= tolerance(np.float64, count) * got[0]
        errors.append(np.max(np.abs(got[:rank] - lam[:rank]) / lam[:rank]))
    # a hundred times the tokens: the relative error of every eigenvalue shrinks, roughly tenfold
    assert errors[1] < errors[0] / 3
    assert errors[1] <= 6 / math.sqrt(40_000) * math.sqrt(n)
    with pytest.raises(ValueError, match="non-negative"):
        tokens_with_spectrum(np.random.default_rng(0), 4, [1.0, -1.0])


def test_the_shared_test_matrices_import_no_torch():
    """``jactus_linalg.testing`` serves the benchmarks and docs examples too: numpy only."""
    import subprocess
    import sys

    probe = "import sys, jactus_linalg.testing; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"

