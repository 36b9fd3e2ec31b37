"""Fuzzing the public core: every call returns finite results or raises ValueError / TypeError.

Arbitrary shapes, dtypes and values (NaN, ±Inf, huge, tiny, zeros, integers,
wrong ranks): never another exception type, never a NaN in a result.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jactus_linalg as jl

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1e-300, -1e-300, 1e300, -1e300, 1.0, -1.0]),
)
DTYPES = st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.bool_, np.complex128])


@st.composite
def arrays(draw, max_dims: int = 3, max_side: int = 6):
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.integers(0, max_side)) for _ in range(ndim))
    dtype = draw(DTYPES)
    width = {np.float64: 64, np.float32: 32, np.float16: 16}.get(dtype)
    if width is not None:
        big = float(np.finfo(dtype).max)
        elements = st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=width),
            st.sampled_from([0.0, 1.0, -1.0, big, -big, float(np.finfo(dtype).tiny)]),
        )
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def square_psd_or_not(draw, max_side: int = 6):
    """Mostly valid-looking covariances, sometimes broken ones."""
    n = draw(st.integers(1, max_side))
    if draw(st.booleans()):
        x = draw(hnp.arrays(np.float64, (draw(st.integers(1, 8)), n), elements=st.floats(-1e3, 1e3)))
        return x.T @ x
    return draw(hnp.arrays(np.float64, (n, n), elements=FLOATS))


def _finite(obj) -> bool:
    """Every array or float inside a (nested) result is finite."""
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind not in "fc" or bool(np.all(np.isfinite(obj)))
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, tuple | list):
        return all(_finite(o) for o in obj)
    return True


def _call(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except (ValueError, TypeError):
        return None
    assert _finite(out), f"non-finite result from {fn.__name__}"
    return out


@settings(max_examples=150)
@given(cov=st.one_of(arrays(), square_psd_or_not()), damping=st.sampled_from([0.0, 1e-3, 1.0, -1.0, float("nan")]),
       method=st.sampled_from(["eigh", "cholesky", "qr"]))
def test_whiten_fuzz(cov, damping, method):
    _call(jl.whiten, cov, damping=damping, method=method)


@settings(max_examples=150)
@given(a=arrays(), b=arrays(), rtol=st.sampled_from([None, 0.0, 1e-8, -1.0]))
def test_union_fuzz(a, b, rtol):
    _call(jl.union_of_subspaces, a, b, rtol=rtol)


@settings(max_examples=150)
@given(
    w=arrays(),
    rank=st.one_of(st.none(), st.integers(-2, 8), st.just(2.5), st.just(True)),
    cx=st.one_of(st.none(), square_psd_or_not()),
    cg=st.one_of(st.none(), square_psd_or_not()),
    left=st.one_of(st.none(), arrays(max_dims=2)),
)
def test_projected_lowrank_fuzz(w, rank, cx, cg, left):
    _call(jl.projected_lowrank, w, rank, input_cov=cx, grad_cov=cg, left=left)


@settings(max_examples=100)
@given(
    w=arrays(max_dims=2),
    g=arrays(max_dims=2),
    rank=st.integers(0, 6),
    tau=st.sampled_from([0.0, 0.25, 1.0, 1.5, -0.1, float("nan")]),
)
def test_jactus_layer_fuzz(w, g, rank, tau):
    _call(jl.jactus_layer, w, rank, grad_mean=g, task_fraction=tau)


@settings(max_examples=150)
@given(
    gains=st.lists(arrays(max_dims=2), max_size=4),
    costs=st.lists(arrays(max_dims=2), max_size=4),
    budget=st.one_of(FLOATS, st.integers(-1, 2)),
)
def test_allocate_ranks_fuzz(gains, costs, budget):
    out = _call(jl.allocate_ranks, gains, costs, budget)
    if out is not None:
        assert all(isinstance(r, int) and r >= 0 for r in out)


@settings(max_examples=100)
@given(left=arrays(max_dims=2), core=arrays(max_dims=2), right=arrays(max_dims=2))
def test_orthonormal_factors_fuzz(left, core, right):
    _call(jl.orthonormal_factors, left, core, right)


@settings(max_examples=100)
@given(
    w=arrays(max_dims=2),
    left=arrays(max_dims=2),
    core=arrays(max_dims=2),
    right=arrays(max_dims=2),
    cx=st.one_of(st.none(), square_psd_or_not()),
    cg=st.one_of(st.none(), square_psd_or_not()),
)
def test_curvature_error_fuzz(w, left, core, right, cx, cg):
    out = _call(jl.curvature_error, w, left, core, right, input_cov=cx, grad_cov=cg)
    if out is not None:
        assert out >= 0.0


@settings(max_examples=100)
@given(
    shapes=st.lists(
        st.tuples(st.integers(-2, 40), st.integers(-2, 40)) | st.just((1.5, 2)) | st.just(("a", 2)),
        max_size=4,
    ),
    budget=st.one_of(FLOATS, st.integers(-1, 2)),
)
def test_allocate_uniform_fuzz(shapes, budget):
    out = _call(jl.allocate_uniform, shapes, budget)
    if out is not None:
        assert len(out) == len(shapes)
        assert all(isinstance(r, int) and r >= 1 for r in out)


@settings(max_examples=100)
@given(
    a=arrays(max_dims=3),
    k=st.one_of(st.integers(-1, 8), st.just(2.5), st.just(True)),
    oversample=st.integers(-2, 12),
    power_iters=st.integers(0, 2),
)
def test_randomized_svd_fuzz(a, k, oversample, power_iters):
    from jactus_linalg.randomized import randomized_svd

    _call(randomized_svd, a, k, oversample=oversample, power_iters=power_iters)


@settings(max_examples=100)
@given(
    dim=st.integers(1, 5),
    mode=st.sampled_from(["gram", "qr"]),
    batches=st.lists(arrays(max_dims=3, max_side=5), min_size=1, max_size=3),
)
def test_moment_accumulator_update_fuzz(dim, mode, batches):
    """A rejected batch leaves the accumulator as it was; the result stays finite."""
    acc = jl.MomentAccumulator(dim, mode=mode)
    for x in batches:
        before = (acc.count, None if acc.total is None else acc.total.copy())
        try:
            acc.update(x)
        except (ValueError, TypeError):
            assert acc.count == before[0]
            assert (acc.total is None) == (before[1] is None)
            if acc.total is not None:
                np.testing.assert_array_equal(acc.total, before[1])
    if acc.count:
        res = acc.result()
        assert _finite(res.root if mode == "qr" else res)


@settings(max_examples=100)
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    g=arrays(max_dims=3, max_side=4),
    x=arrays(max_dims=3, max_side=4),
)
def test_cross_moment_accumulator_update_fuzz(rows, cols, g, x):
    acc = jl.CrossMomentAccumulator(rows, cols)
    try:
        acc.update(g, x)
    except (ValueError, TypeError):
        assert acc.count == 0 and acc.total is None
        return
    assert _finite(acc.result())


@settings(max_examples=100)
@given(
    shapes=st.lists(
        st.tuples(st.integers(-2, 12), st.integers(-2, 12)) | st.just((1.5, 2)) | st.just(("a", 2)),
        max_size=3,
    ),
    gains=st.lists(arrays(max_dims=2), max_size=3),
    energies=st.lists(FLOATS, max_size=3),
    retain=st.one_of(FLOATS, st.integers(-1, 2)),
    total=st.one_of(st.integers(-5, 2000), st.just(1.5)),
    min_rank=st.integers(-1, 3),
    allocation=st.sampled_from(["global", "uniform", "other"]),
)
def test_allocate_budget_fuzz(shapes, gains, energies, retain, total, min_rank, allocation):
    out = _call(
        jl.allocate_budget, shapes, gains, energies, retain, total, min_rank=min_rank,
        allocation=allocation,
    )
    if out is not None:
        assert len(out) == len(shapes)
        assert all(r is None or (isinstance(r, int) and r >= 1) for r in out)


@settings(max_examples=100)
@given(
    w=arrays(max_dims=2),
    cx=st.one_of(st.none(), square_psd_or_not()),
    cg=st.one_of(st.none(), square_psd_or_not()),
    rank=st.integers(0, 6),
    tau=st.sampled_from([0.0, 0.25, 1.0]),
    svd=st.sampled_from(["auto", "randomized", "exact"]),
)
def test_jactus_layer_covariance_mode_fuzz(w, cx, cg, rank, tau, svd):
    _call(jl.jactus_layer, w, rank, input_cov=cx, grad_cov=cg, task_fraction=tau, svd=svd)
