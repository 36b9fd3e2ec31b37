"""Orthogonal union of subspaces: orthonormal, containing, rank-revealing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import jactus_linalg as jl

from .numerics import orth, orthonormal, subspace_distance, tolerance
from .strategies import seeds


@st.composite
def overlapping_bases(draw, max_m: int = 24, max_inputs: int = 4):
    """Bases spanning chosen columns of one orthonormal frame, with known union.

    Each input is ``F[:, idx] @ K`` for a random mixing ``K`` with condition
    number up to 1e6 (so inputs are far from orthonormal), sometimes with
    repeated columns (rank deficient inputs).
    """
    m = draw(st.integers(2, max_m))
    rng = np.random.default_rng(draw(seeds))
    frame = orthonormal(rng, m, m)
    n_inputs = draw(st.integers(1, max_inputs))
    bases, index_sets = [], []
    for _ in range(n_inputs):
        idx = draw(st.lists(st.integers(0, m - 1), min_size=1, max_size=min(m, 8), unique=True))
        k = len(idx)
        cond = draw(st.floats(1.0, 1e6))
        mix = orthonormal(rng, k, k) * np.geomspace(1.0, 1.0 / cond, k) @ orthonormal(rng, k, k).T
        b = frame[:, idx] @ mix * draw(st.floats(1e-3, 1e3))
        if draw(st.booleans()):
            b = np.concatenate([b, b[:, :1] * 2.0], axis=1)  # a repeated direction
        bases.append(b)
        index_sets.append(idx)
    return m, bases, index_sets


@given(data=overlapping_bases())
def test_union_is_orthonormal(data):
    m, bases, _ = data
    q = jl.union_of_subspaces(*bases).basis
    d = q.shape[1]
    assert q.shape[0] == m
    assert np.linalg.norm(q.T @ q - np.eye(d), 2) <= tolerance(np.float64, m + sum(b.shape[1] for b in bases))


@given(data=overlapping_bases())
def test_union_contains_every_input(data):
    m, bases, index_sets = data
    res = jl.union_of_subspaces(*bases)
    q = res.basis
    total = m + sum(b.shape[1] for b in bases)
    # an input determines its span only to eps·κ(B) in its weak directions,
    # so containment of later inputs holds to that accuracy
    kappa = 1.0
    for b, idx in zip(bases, index_sets, strict=True):
        residual = b - q @ (q.T @ b)
        assert np.linalg.norm(residual, 2) <= tolerance(np.float64, total, cond=kappa) * np.linalg.norm(b, 2)
        s = np.linalg.svd(b, compute_uv=False)
        kappa = max(kappa, s[0] / s[len(idx) - 1])
    # ... and nothing more: the dimension and the per-input counts are known
    seen: set[int] = set()
    expected = []
    for idx in index_sets:
        expected.append(len(set(idx) - seen))
        seen |= set(idx)
    assert res.contributions == tuple(expected)
    assert q.shape[1] == len(seen) == sum(res.contributions)
    assert res.input_ranks == tuple(len(idx) for idx in index_sets)
    # the union is the span of the frame columns used, and earlier inputs come first
    frame_span = np.concatenate(bases, axis=1)
    assert subspace_distance(q, frame_span) <= tolerance(np.float64, total, cond=1e6)
    first = expected[0]
    assert subspace_distance(q[:, :first], bases[0]) <= tolerance(np.float64, total, cond=1e6)


@given(data=overlapping_bases(max_inputs=3), seed=seeds, n_cols=st.integers(1, 6))
def test_direction_in_span_adds_nothing(data, seed, n_cols):
    m, bases, _ = data
    rng = np.random.default_rng(seed)
    before = jl.union_of_subspaces(*bases)
    # columns already in the span: combinations of the inputs' columns
    stacked = np.concatenate(bases, axis=1)
    inside = stacked @ rng.standard_normal((stacked.shape[1], n_cols))
    after = jl.union_of_subspaces(*bases, inside)
    assert after.contributions[-1] == 0
    assert after.basis.shape == before.basis.shape
    assert np.linalg.norm(after.basis - before.basis) <= tolerance(np.float64, m)
    # the same input twice adds nothing the second time
    twice = jl.union_of_subspaces(bases[0], bases[0])
    assert twice.contributions[1] == 0
    assert twice.basis.shape[1] == twice.input_ranks[0]


def test_direction_in_span_adds_nothing_to_a_line(rng):
    a = rng.standard_normal((7, 1))
    res = jl.union_of_subspaces(a, -3.0 * a, a + 0.0)
    assert res.contributions == (1, 0, 0)
    # a direction at a small but resolvable angle is kept
    v = rng.standard_normal((7, 1))
    perp = v - a @ (a.T @ v) / (a.T @ a).item()
    tilt = a + 1e-6 * np.linalg.norm(a) * perp / np.linalg.norm(perp)
    assert jl.union_of_subspaces(a, tilt).contributions == (1, 1)


@st.composite
def angle_pairs(draw):
    k = draw(st.integers(1, 6))
    m = draw(st.integers(2 * k, 2 * k + 8))
    exponents = draw(st.lists(st.floats(-10.0, np.log10(np.pi / 2)), min_size=k, max_size=k))
    theta = np.sort(np.minimum(10.0 ** np.array(exponents), np.pi / 2))
    return m, theta, draw(seeds)


@given(data=angle_pairs())
def test_principal_angles_match_construction(data):
    m, theta, seed = data
    k = theta.size
    rng = np.random.default_rng(seed)
    frame = orthonormal(rng, m, m)
    a = frame[:, :k]
    b = frame[:, :k] * np.cos(theta) + frame[:, k : 2 * k] * np.sin(theta)
    # rotate inside each subspace: the angles must not depend on the basis
    a = a @ orthonormal(rng, k, k)
    b = b @ orthonormal(rng, k, k)
    got = np.asarray(jl.principal_angles(a, b))
    assert got.shape == (k,)
    # accurate to O(eps) in absolute terms at every angle: arccos alone would
    # lose half the digits for the tiny ones
    assert np.max(np.abs(got - theta)) <= tolerance(np.float64, m)
    assert np.all(np.diff(got) >= 0), "ascending"
    assert np.max(np.abs(np.asarray(jl.principal_angles(b, a)) - theta)) <= tolerance(np.float64, m)
    # the union reports the same angles between consecutive inputs, and a
    # direction at an angle above rtol is a new direction
    res = jl.union_of_subspaces(a, b)
    assert np.max(np.abs(np.asarray(res.principal_angles[0]) - theta)) <= tolerance(np.float64, m)
    # every angle here (>= 1e-10) is far above rtol (~1e-14): all k are new
    assert res.contributions == (k, k)
    q = res.basis
    assert np.linalg.norm(q.T @ q - np.eye(q.shape[1]), 2) <= tolerance(np.float64, m)


def test_principal_angles_of_nested_and_different_sizes(rng):
    q = orthonormal(rng, 8, 5)
    angles = np.asarray(jl.principal_angles(q, q[:, :2]))
    assert angles.shape == (2,)
    assert np.max(np.abs(angles)) <= tolerance(np.float64, 8)
    perp = orthonormal(rng, 8, 8)
    angles = np.asarray(jl.principal_angles(perp[:, :3], perp[:, 3:5]))
    assert np.max(np.abs(angles - np.pi / 2)) <= tolerance(np.float64, 8)


@st.composite
def column_sequences(draw):
    """Columns ``d_1..d_t`` where some are exact combinations of earlier ones.

    Entries are small integers times powers of two and dependent columns use
    integer coefficients, so dependence is exact in floating point (a
    combination with cancellation would leave a rounding residual far above
    the rank threshold, and the column would rightly count as new).
    """
    m = draw(st.integers(2, 20))
    t = draw(st.integers(1, m + 6))
    rng = np.random.default_rng(draw(seeds))
    cols, independent = [], []
    for _ in range(t):
        n_indep = sum(independent)
        if n_indep and (n_indep >= m or draw(st.booleans())):
            basis = np.stack([c for c, ok in zip(cols, independent, strict=True) if ok], axis=1)
            coef = rng.integers(-3, 4, size=n_indep)
            coef[rng.integers(n_indep)] = rng.choice([-2, -1, 1, 2])
            cols.append(basis @ coef.astype(np.float64))
            independent.append(False)
        else:
            col = rng.integers(-9, 10, size=m).astype(np.float64)
            col[rng.integers(m)] += 20.0  # never zero
            cols.append(col * 2.0 ** draw(st.integers(-10, 10)))
            independent.append(True)
    columns = np.stack(cols, axis=1)
    independent = np.array(independent)
    assume(np.linalg.matrix_rank(columns[:, independent]) == int(independent.sum()))
    assume(np.linalg.cond(columns[:, independent]) < 1e6)
    return columns, independent


@given(data=column_sequences())
def test_nested_basis_spans_every_prefix(data):
    columns, independent = data
    m, t = columns.shape
    res = jl.union_of_subspaces(columns, nested=True)
    q, accepted = res.basis, res.accepted
    assert res.contributions == (int(independent.sum()),)
    assert accepted.dtype == bool and accepted.shape == (t,)
    assert np.array_equal(accepted, independent)
    d = q.shape[1]
    assert d == int(independent.sum())
    assert np.linalg.norm(q.T @ q - np.eye(d), 2) <= tolerance(np.float64, m + t)
    cond = np.linalg.cond(columns[:, independent])
    for s in range(1, t + 1):
        a_s = int(accepted[:s].sum())
        prefix = columns[:, :s]
        qs = q[:, :a_s]
        # the prefix lies in span(Q[:, :a_s]) ...
        residual = prefix - qs @ (qs.T @ prefix)
        assert np.linalg.norm(residual) <= tolerance(np.float64, m + t) * np.linalg.norm(prefix)
        # ... and Q[:, :a_s] lies in span(prefix) (same dimension, so equal spans)
        basis = orth(prefix[:, independent[:s]])
        assert basis.shape[1] == a_s
        spill = qs - basis @ (basis.T @ qs)
        assert np.linalg.norm(spill, 2) <= tolerance(np.float64, m + t, cond=max(cond, 1.0))


def test_nested_basis_switches_to_cgs2_when_t_exceeds_m(rng):
    cols = rng.standard_normal((4, 9))
    res = jl.union_of_subspaces(cols[:, :3], cols[:, 3:], nested=True)
    q, accepted = res.basis, res.accepted
    assert accepted.tolist() == [True] * 4 + [False] * 5
    assert res.contributions == (3, 1)
    assert np.linalg.norm(q.T @ q - np.eye(4)) <= tolerance(np.float64, 9)
    assert subspace_distance(q, np.eye(4)) <= tolerance(np.float64, 9)


def test_union_keeps_namespace(backend, rng):
    a = rng.standard_normal((6, 2))
    b = rng.standard_normal((6, 3))
    res = jl.union_of_subspaces(backend.asarray(a), backend.asarray(b))
    assert type(res.basis) is type(backend.asarray(a))
    q = backend.to_numpy(res.basis)
    assert res.contributions == (2, 3)
    assert np.linalg.norm(q.T @ q - np.eye(5)) <= tolerance(np.float64, 6)


def test_union_rtol_controls_what_counts_as_new(rng):
    a = orthonormal(rng, 6, 1)
    near = a + 1e-8 * orthonormal(rng, 6, 1)
    assert jl.union_of_subspaces(a, near).contributions == (1, 1)
    assert jl.union_of_subspaces(a, near, rtol=1e-6).contributions == (1, 0)
    with pytest.raises(ValueError, match="rtol"):
        jl.union_of_subspaces(a, near, rtol=-1.0)


def test_nested_union_keeps_namespace_and_order(backend, rng):
    """Nested mode on every backend: prefixes spanned in order, a repeated column dropped."""
    a = rng.standard_normal((7, 2))
    b = np.concatenate([a[:, :1] * 3.0, rng.standard_normal((7, 2))], axis=1)
    res = jl.union_of_subspaces(backend.asarray(a), backend.asarray(b), nested=True)
    assert type(res.basis) is type(backend.asarray(a))
    assert res.accepted.tolist() == [True, True, False, True, True]
    assert res.contributions == (2, 2)
    q = backend.to_numpy(res.basis)
    assert np.linalg.norm(q.T @ q - np.eye(4)) <= tolerance(np.float64, 7)
    assert subspace_distance(q[:, :2], orth(a)) <= tolerance(np.float64, 7, cond=np.linalg.cond(a))
