"""Streaming statistics: batches of any shape, merging, the QR root, bad batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jactus_linalg as jl

from .numerics import covariance_with_spectrum, spectrum, tolerance
from .strategies import seeds

leading_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


def _samples(rng, n_rows: int, dim: int, cond: float = 1e4) -> np.ndarray:
    """Rows with a correlated, ill-conditioned second moment."""
    mix = covariance_with_spectrum(rng, np.sqrt(spectrum("decaying", dim, cond=cond)))
    return rng.standard_normal((n_rows, dim)) @ mix


def _split(x: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    cuts = sorted({c % (x.shape[0] + 1) for c in cuts})
    return [p for p in np.split(x, cuts, axis=0) if p.shape[0] > 0]


@given(
    seed=seeds,
    dim=st.integers(1, 12),
    lead=leading_shapes,
    batches=st.integers(1, 4),
    mode=st.sampled_from(["gram", "qr"]),
)
def test_streaming_equals_batch(seed, dim, lead, batches, mode):
    rng = np.random.default_rng(seed)
    xs = [_samples(rng, int(np.prod(lead)) if lead else 1, dim).reshape((*lead, dim))
          for _ in range(batches)]
    acc = jl.MomentAccumulator(dim, mode=mode)
    for x in xs:
        acc.update(x)
    rows = np.concatenate([x.reshape(-1, dim) for x in xs], axis=0)
    n_rows = rows.shape[0]
    assert acc.count == n_rows
    expected = rows.T @ rows / n_rows
    got = acc.result()
    if mode == "qr":
        assert isinstance(got, jl.CovarianceRoot)
        assert got.n_samples == n_rows
        root = got.root
        assert np.allclose(np.tril(root, -1), 0.0, atol=0), "root is upper triangular"
        got = root.T @ root
    scale = float(np.trace(expected))
    assert got.dtype == np.float64
    assert np.max(np.abs(got - expected)) <= tolerance(np.float64, n_rows + dim) * scale


@given(seed=seeds, dim=st.integers(1, 10), lead=leading_shapes)
def test_cross_moment_streaming_equals_batch(seed, dim, lead):
    rng = np.random.default_rng(seed)
    m = dim + 2
    shape = lead if lead else (1,)
    gs = [rng.standard_normal((*shape, m)) for _ in range(3)]
    xs = [rng.standard_normal((*shape, dim)) for _ in range(3)]
    acc = jl.CrossMomentAccumulator(m, dim)
    for g, x in zip(gs, xs, strict=True):
        acc.update(g, x)
    g_rows = np.concatenate([g.reshape(-1, m) for g in gs])
    x_rows = np.concatenate([x.reshape(-1, dim) for x in xs])
    expected = g_rows.T @ x_rows / g_rows.shape[0]
    scale = np.linalg.norm(g_rows) * np.linalg.norm(x_rows) / g_rows.shape[0]
    assert acc.count == g_rows.shape[0]
    assert np.max(np.abs(acc.result() - expected)) <= tolerance(np.float64, g_rows.shape[0]) * scale


@pytest.mark.parametrize("mode", ["gram", "qr"])
@given(seed=seeds, dim=st.integers(1, 10), n_a=st.integers(1, 30), n_b=st.integers(1, 30))
def test_merge_equals_single_pass(mode, seed, dim, n_a, n_b):
    rng = np.random.default_rng(seed)
    x = _samples(rng, n_a + n_b, dim)
    single = jl.MomentAccumulator(dim, mode=mode)
    single.update(x)
    a = jl.MomentAccumulator(dim, mode=mode)
    b = jl.MomentAccumulator(dim, mode=mode)
    a.update(x[:n_a])
    b.update(x[n_a:])
    merged = a.merge(b)
    assert merged.count == single.count == n_a + n_b
    # merging must not touch its operands
    assert a.count == n_a and b.count == n_b

    def gram(acc):
        res = acc.result()
        return res.root.T @ res.root if mode == "qr" else res

    scale = float(np.trace(gram(single)))
    tol = tolerance(np.float64, n_a + n_b + dim) * scale
    assert np.max(np.abs(gram(merged) - gram(single))) <= tol
    # an empty accumulator is the identity of merge
    empty = jl.MomentAccumulator(dim, mode=mode)
    assert np.max(np.abs(gram(empty.merge(single)) - gram(single))) == 0.0
    assert np.max(np.abs(gram(single.merge(empty)) - gram(single))) == 0.0


@given(seed=seeds, dim=st.integers(1, 8))
def test_cross_moment_merge_equals_single_pass(seed, dim):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((20, dim + 1))
    x = rng.standard_normal((20, dim))
    single = jl.CrossMomentAccumulator(dim + 1, dim)
    single.update(g, x)
    a = jl.CrossMomentAccumulator(dim + 1, dim)
    b = jl.CrossMomentAccumulator(dim + 1, dim)
    a.update(g[:7], x[:7])
    b.update(g[7:], x[7:])
    merged = a.merge(b)
    assert merged.count == 20
    scale = np.linalg.norm(g) * np.linalg.norm(x) / 20
    assert np.max(np.abs(merged.result() - single.result())) <= tolerance(np.float64, 20) * scale


@given(
    seed=seeds,
    dim=st.integers(2, 16),
    n_rows=st.integers(1, 40),
    cond=st.floats(1.0, 1e12),
    method=st.sampled_from(["eigh", "cholesky"]),
)
def test_qr_mode_root_reproduces_gram(seed, dim, n_rows, cond, method):
    rng = np.random.default_rng(seed)
    x = _samples(rng, n_rows, dim, cond=cond)  # n_rows < dim: rank deficient
    gram = jl.MomentAccumulator(dim, mode="gram")
    qr = jl.MomentAccumulator(dim, mode="qr")
    for part in _split(x, [n_rows // 3, 2 * n_rows // 3]):
        gram.update(part)
        qr.update(part)
    c = gram.result()
    root = qr.result()
    assert root.root.shape == (min(n_rows, dim), dim)
    assert np.max(np.abs(root.root.T @ root.root - c)) <= tolerance(np.float64, n_rows + dim) * np.trace(c)
    # whitening from the root and from the Gram matrix agree: same δ, same norm
    w_root = jl.whiten(root, method=method)
    w_gram = jl.whiten(c, method=method)
    assert w_root.damping == pytest.approx(w_gram.damping, rel=tolerance(np.float64, n_rows + dim))
    probe = rng.standard_normal((dim, 3))
    a = np.linalg.norm(w_root.factor.T @ probe)
    b = np.linalg.norm(w_gram.factor.T @ probe)
    bound = tolerance(np.float64, n_rows + dim) * (np.trace(c) + w_gram.damping * dim)
    assert abs(a**2 - b**2) <= bound * np.linalg.norm(probe) ** 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["gram", "qr"])
def test_nonfinite_batch_names_statistic(bad, mode, rng):
    acc = jl.MomentAccumulator(4, name="layers.3.mlp:input_cov", mode=mode)
    good = rng.standard_normal((2, 5, 4))
    acc.update(good)
    before = acc.result()
    poisoned = rng.standard_normal((2, 5, 4))
    poisoned[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"layers\.3\.mlp:input_cov") as info:
        acc.update(poisoned)
    kind = "NaN" if np.isnan(bad) else "Inf"
    assert f"1 {kind}" in str(info.value)
    # the statistic was not updated
    assert acc.count == 10
    after = acc.result()
    if mode == "qr":
        before, after = before.root, after.root
    assert np.array_equal(before, after)


def test_float32_product_overflow_is_refused_not_summed(rng):
    """Finite float32 rows whose float32 Gram product overflows (|x| = 1e20: x^2 = 1e40 >
    3.4e38) are refused with a pointer to float64 products; products="accumulation"
    takes the same batch (1e40 fits in float64)."""
    rows = rng.standard_normal((6, 3)).astype(np.float32)
    rows[2, 1] = 1e20
    acc = jl.MomentAccumulator(3, name="fc2:input_cov", dtype="float64", products="compute")
    with pytest.raises(ValueError, match=r"overflows float32 for statistic `fc2:input_cov`.*"
                                         r"products='accumulation'"):
        acc.update(rows)
    assert acc.count == 0 and acc.total is None
    exact = jl.MomentAccumulator(3, dtype="float64", products="accumulation")
    exact.update(rows)
    assert np.isfinite(exact.result()).all()
    column = rows[:, 1].astype(np.float64)
    assert exact.result()[1, 1] == pytest.approx(column @ column / 6, rel=tolerance(np.float64, 6))


def test_nonfinite_cross_batch_names_statistic(rng):
    acc = jl.CrossMomentAccumulator(3, 2, name="fc1:grad_mean")
    g = rng.standard_normal((4, 3))
    x = rng.standard_normal((4, 2))
    g[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"fc1:grad_mean.*`g`|`g`.*fc1:grad_mean"):
        acc.update(g, x)
    assert acc.count == 0
    g[0, 0] = 1.0
    x[1, 1] = np.inf
    with pytest.raises(ValueError, match="fc1:grad_mean"):
        acc.update(g, x)
    assert acc.count == 0


@pytest.mark.parametrize("mode", ["gram", "qr"])
def test_float32_accumulation_on_request(mode, rng):
    x32 = rng.standard_normal((50, 6)).astype(np.float32)
    default = jl.MomentAccumulator(6, mode=mode)
    f32 = jl.MomentAccumulator(6, mode=mode, dtype="float32")
    default.update(x32)
    f32.update(x32)
    r64, r32 = default.result(), f32.result()
    if mode == "qr":
        r64, r32 = r64.root.T @ r64.root, r32.root.T @ r32.root
    assert r64.dtype == np.float64, "float64 on CPU by default, even for float32 input"
    assert r32.dtype == np.float32
    scale = float(np.trace(r64))
    assert np.max(np.abs(r32.astype(np.float64) - r64)) <= tolerance(np.float32, 50) * scale
    # and float32 accumulation really is float32: it differs from float64 by rounding
    assert np.max(np.abs(r32.astype(np.float64) - r64)) > 0.0


def test_float32_accumulation_on_request_torch():
    torch = pytest.importorskip("torch")
    x = torch.randn(3, 7, 5, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    acc = jl.MomentAccumulator(5, dtype="float32")
    acc.update(x)
    assert acc.result().dtype == torch.float32
    acc64 = jl.MomentAccumulator(5)
    acc64.update(x)
    assert acc64.result().dtype == torch.float64
    cross = jl.CrossMomentAccumulator(5, 5, dtype="float32")
    cross.update(x, x)
    assert cross.result().dtype == torch.float32


def test_accumulators_work_on_every_backend(backend, rng):
    x = rng.standard_normal((2, 9, 4))
    for mode in ("gram", "qr"):
        acc = jl.MomentAccumulator(4, mode=mode)
        acc.update(backend.asarray(x[0]))
        acc.update(backend.asarray(x[1]))
        res = acc.result()
        arr = res.root if mode == "qr" else res
        assert type(arr) is type(backend.asarray(x[0]))
        got = backend.to_numpy(arr)
        got = got.T @ got if mode == "qr" else got
        rows = x.reshape(-1, 4)
        expected = rows.T @ rows / 18
        assert np.max(np.abs(got - expected)) <= tolerance(np.float64, 18) * np.trace(expected)


def test_empty_accumulator_result_names_statistic():
    with pytest.raises(ValueError, match="q_proj:input_cov"):
        jl.MomentAccumulator(3, name="q_proj:input_cov").result()
    with pytest.raises(ValueError, match="grad_mean"):
        jl.CrossMomentAccumulator(3, 2).result()


def test_wrong_last_dimension_names_statistic(rng):
    acc = jl.MomentAccumulator(4, name="fc2:input_cov")
    with pytest.raises(ValueError, match=r"fc2:input_cov.*last dimension 4"):
        acc.update(rng.standard_normal((3, 5)))
    cross = jl.CrossMomentAccumulator(3, 4, name="fc2:grad_mean")
    with pytest.raises(ValueError, match="leading"):
        cross.update(rng.standard_normal((2, 3)), rng.standard_normal((3, 4)))


def test_gram_products_in_the_compute_dtype(rng):
    """products="compute": float32 batches multiply in float32 and sum in float64; the
    result is float64 and within float32's rounding of the all-float64 moment
    (|ΔC_ij| <= c N eps32 mean(|x_i||x_j|) per batch product, bounded here by the
    diagonal); "accumulation" (default) is the float64 product itself."""
    from jactus_linalg.covariance import MomentAccumulator

    n, rows, batches = 24, 50, 4
    data = [rng.standard_normal((rows, n)).astype(np.float32) * np.geomspace(1, 1e-3, n).astype(np.float32)
            for _ in range(batches)]
    exact = sum(b.astype(np.float64).T @ b.astype(np.float64) for b in data) / (rows * batches)
    results = {}
    for products in ("accumulation", "compute"):
        acc = MomentAccumulator(n, dtype="float64", products=products)
        for b in data:
            acc.update(b)
        results[products] = acc.result()
        assert results[products].dtype == np.float64
        merged = acc.merge(MomentAccumulator(n, dtype="float64", products=products))
        assert merged.products == products
    bound = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(results["accumulation"] - exact) / bound) <= tolerance(np.float64, rows)
    error = np.max(np.abs(results["compute"] - exact) / bound)
    assert error <= tolerance(np.float32, rows)
    assert error > tolerance(np.float64, rows), "the products did run in float32"
    with pytest.raises(ValueError, match="`products` must be one of"):
        MomentAccumulator(n, products="float16")
