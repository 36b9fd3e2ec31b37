"""Bad input gets a ValueError / TypeError whose message names the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jactus_linalg as jl

RNG = np.random.default_rng(11)
W = RNG.standard_normal((6, 4))
CX = np.cov(RNG.standard_normal((4, 30)))
CG = np.cov(RNG.standard_normal((6, 30)))
G = RNG.standard_normal((6, 4))


def _with(a: np.ndarray, index, value) -> np.ndarray:
    a = a.copy()
    a[index] = value
    return a


def _asym(c: np.ndarray) -> np.ndarray:
    c = c.copy()
    c[0, 1] += 0.1 * np.abs(c).max()
    return c


def _indefinite(n: int) -> np.ndarray:
    c = np.eye(n)
    c[-1, -1] = -0.5
    return c


CASES = [
    # --- whiten --------------------------------------------------------------
    ("whiten NaN", lambda: jl.whiten(_with(CX, (0, 0), np.nan)), ValueError, r"`cov`.*1 NaN"),
    ("whiten Inf", lambda: jl.whiten(_with(CX, (1, 2), np.inf)), ValueError, r"`cov`.*Inf"),
    ("whiten non-square", lambda: jl.whiten(np.ones((3, 4))), ValueError, r"`cov` must be square.*\(3, 4\)"),
    ("whiten 1-D", lambda: jl.whiten(np.ones(3)), ValueError, r"`cov` must be 2-D"),
    ("whiten empty", lambda: jl.whiten(np.ones((0, 0))), ValueError, r"`cov` must be non-empty"),
    ("whiten non-symmetric", lambda: jl.whiten(_asym(CX)), ValueError, r"`cov` must be symmetric"),
    ("whiten indefinite eigh", lambda: jl.whiten(_indefinite(4)), ValueError, r"`cov` is indefinite"),
    ("whiten indefinite cholesky", lambda: jl.whiten(_indefinite(4), method="cholesky"), ValueError, r"`cov` is indefinite"),
    ("whiten integer", lambda: jl.whiten(np.eye(3, dtype=np.int64)), TypeError, r"`cov`.*floating"),
    ("whiten list", lambda: jl.whiten([[1.0, 0.0], [0.0, 1.0]]), TypeError, r"`cov` must be an array"),
    ("whiten negative damping", lambda: jl.whiten(CX, damping=-1e-3), ValueError, r"`damping`.*>= 0"),
    ("whiten NaN damping", lambda: jl.whiten(CX, damping=math.nan), ValueError, r"`damping`"),
    ("whiten damping str", lambda: jl.whiten(CX, damping="1e-3"), TypeError, r"`damping`"),
    ("whiten unknown method", lambda: jl.whiten(CX, method="svd"), ValueError, r"`method`.*'svd'"),
    ("whiten zero", lambda: jl.whiten(np.zeros((3, 3))), ValueError, r"`cov` is identically zero"),
    # --- projected_lowrank -------------------------------------------------------
    ("lowrank NaN weight", lambda: jl.projected_lowrank(_with(W, (2, 1), np.nan), 2), ValueError, r"`weight`.*NaN"),
    ("lowrank Inf weight", lambda: jl.projected_lowrank(_with(W, (0, 0), -np.inf), 2), ValueError, r"`weight`.*Inf"),
    ("lowrank 1-D weight", lambda: jl.projected_lowrank(np.ones(5), 1), ValueError, r"`weight` must be 2-D"),
    ("lowrank 3-D weight", lambda: jl.projected_lowrank(np.ones((2, 3, 4)), 1), ValueError, r"`weight` must be 2-D"),
    ("lowrank rank 0", lambda: jl.projected_lowrank(W, 0), ValueError, r"`rank` must be at least 1; got 0"),
    ("lowrank rank negative", lambda: jl.projected_lowrank(W, -2), ValueError, r"`rank`"),
    ("lowrank rank too big", lambda: jl.projected_lowrank(W, 5), ValueError, r"`rank` must be at most 4.*got 5"),
    ("lowrank rank float", lambda: jl.projected_lowrank(W, 2.0), TypeError, r"`rank` must be an integer"),
    ("lowrank rank bool", lambda: jl.projected_lowrank(W, True), TypeError, r"`rank`"),
    ("lowrank input_cov size", lambda: jl.projected_lowrank(W, 2, input_cov=CG), ValueError, r"`input_cov` must be 4x4"),
    ("lowrank grad_cov size", lambda: jl.projected_lowrank(W, 2, grad_cov=CX), ValueError, r"`grad_cov` must be 6x6"),
    ("lowrank input_cov non-square", lambda: jl.projected_lowrank(W, 2, input_cov=np.ones((4, 3))), ValueError, r"`input_cov`"),
    ("lowrank input_cov 1-D", lambda: jl.projected_lowrank(W, 2, input_cov=np.ones(4)), ValueError, r"`input_cov`"),
    ("lowrank input_cov non-symmetric", lambda: jl.projected_lowrank(W, 2, input_cov=_asym(CX)), ValueError, r"`input_cov` must be symmetric"),
    ("lowrank grad_cov NaN", lambda: jl.projected_lowrank(W, 2, grad_cov=_with(CG, (0, 0), np.nan)), ValueError, r"`grad_cov`.*NaN"),
    ("lowrank grad_cov indefinite", lambda: jl.projected_lowrank(W, 2, grad_cov=_indefinite(6)), ValueError, r"`grad_cov` is indefinite"),
    ("lowrank left rows", lambda: jl.projected_lowrank(W, 2, left=np.ones((5, 2)), right=np.ones((4, 2))), ValueError, r"`left` must have 6 rows"),
    ("lowrank right rows", lambda: jl.projected_lowrank(W, 2, left=np.ones((6, 2)), right=np.ones((6, 2))), ValueError, r"`right` must have 4 rows"),
    ("lowrank right NaN", lambda: jl.projected_lowrank(W, 2, right=_with(np.ones((4, 2)), (0, 0), np.nan)), ValueError, r"`right`.*NaN"),
    ("lowrank left zero", lambda: jl.projected_lowrank(W, 2, left=np.zeros((6, 2))), ValueError, r"`left` spans nothing"),
    ("lowrank negative damping", lambda: jl.projected_lowrank(W, 2, input_cov=CX, damping=-1.0), ValueError, r"`damping`"),
    ("lowrank damping triple", lambda: jl.projected_lowrank(W, 2, input_cov=CX, damping=(1e-3, 1e-3, 1e-3)), ValueError, r"`damping`"),
    ("lowrank unknown whitening", lambda: jl.projected_lowrank(W, 2, input_cov=CX, whitening="qr"), ValueError, r"`method`.*'qr'"),
    ("lowrank integer weight", lambda: jl.projected_lowrank(np.ones((3, 3), dtype=np.int32), 1), TypeError, r"`weight`.*floating"),
    # --- union_of_subspaces -------------------------------------------------------
    ("union none", lambda: jl.union_of_subspaces(), ValueError, r"`bases`.*none"),
    ("union rows differ", lambda: jl.union_of_subspaces(np.ones((5, 2)), np.ones((4, 2))), ValueError, r"`bases\[1\]` must have 5 rows"),
    ("union NaN", lambda: jl.union_of_subspaces(np.ones((5, 2)), _with(np.ones((5, 1)), (3, 0), np.nan)), ValueError, r"`bases\[1\]`.*NaN"),
    ("union 1-D", lambda: jl.union_of_subspaces(np.ones(5)), ValueError, r"`bases\[0\]` must be 2-D"),
    ("union negative rtol", lambda: jl.union_of_subspaces(np.ones((5, 2)), rtol=-1e-3), ValueError, r"`rtol`"),
    # --- jactus_layer / plan_layer --------------------------------------------------
    ("jactus rank 0", lambda: jl.jactus_layer(W, 0, grad_mean=G), ValueError, r"`rank` must be at least 1"),
    ("jactus rank too big", lambda: jl.jactus_layer(W, 5, grad_mean=G), ValueError, r"`rank` must be at most 4"),
    ("jactus grad_mean shape", lambda: jl.jactus_layer(W, 2, grad_mean=G.T), ValueError, r"`grad_mean` must have 6 rows"),
    ("jactus grad_mean NaN", lambda: jl.jactus_layer(W, 2, grad_mean=_with(G, (1, 1), np.nan)), ValueError, r"`grad_mean`.*NaN"),
    ("jactus grad_mean missing", lambda: jl.jactus_layer(W, 2, task_fraction=0.5, task_directions="gradient"), ValueError, r"`grad_mean` is required"),
    ("jactus task_fraction > 1", lambda: jl.jactus_layer(W, 2, grad_mean=G, task_fraction=1.5), ValueError, r"`task_fraction` must lie in \[0, 1\]"),
    ("jactus task_fraction < 0", lambda: jl.jactus_layer(W, 2, grad_mean=G, task_fraction=-0.1), ValueError, r"`task_fraction`"),
    ("jactus max_rank < rank", lambda: jl.jactus_layer(W, 3, grad_mean=G, max_rank=2), ValueError, r"`max_rank` must be >= rank=3"),
    ("plan max_rank too big", lambda: jl.plan_layer(W, grad_mean=G, max_rank=7), ValueError, r"`max_rank` must be at most 4"),
    ("plan factorize beyond max_rank", lambda: jl.plan_layer(W, grad_mean=G, max_rank=2, task_directions="gradient").factorize(3), ValueError, r"`rank` must be at most 2"),
    ("jactus input_cov size", lambda: jl.jactus_layer(W, 2, grad_mean=G, input_cov=CG), ValueError, r"`input_cov` must be 4x4"),
    # --- allocate_ranks ------------------------------------------------------------
    ("alloc budget 0", lambda: jl.allocate_ranks([np.ones(2)], [np.ones(2)], 0.0), ValueError, r"`budget` must lie in \(0, 1\]; got 0.0"),
    ("alloc budget negative", lambda: jl.allocate_ranks([np.ones(2)], [np.ones(2)], -0.5), ValueError, r"`budget`"),
    ("alloc budget > 1", lambda: jl.allocate_ranks([np.ones(2)], [np.ones(2)], 1.2), ValueError, r"`budget` must lie in \(0, 1\]; got 1.2"),
    ("alloc budget NaN", lambda: jl.allocate_ranks([np.ones(2)], [np.ones(2)], math.nan), ValueError, r"`budget`"),
    ("alloc budget str", lambda: jl.allocate_ranks([np.ones(2)], [np.ones(2)], "0.8"), TypeError, r"`budget`"),
    ("alloc budget bool", lambda: jl.allocate_ranks([np.ones(2)], [np.ones(2)], True), TypeError, r"`budget`"),
    ("alloc layers differ", lambda: jl.allocate_ranks([np.ones(2), np.ones(1)], [np.ones(2)], 0.5), ValueError, r"`gains` and `costs`.*2 and 1"),
    ("alloc units differ", lambda: jl.allocate_ranks([np.ones(3)], [np.ones(2)], 0.5), ValueError, r"`gains\[0\]` and `costs\[0\]` must have the same length; got 3 and 2"),
    ("alloc no layers", lambda: jl.allocate_ranks([], [], 0.5), ValueError, r"`gains`"),
    ("alloc negative gain", lambda: jl.allocate_ranks([np.array([1.0, -1.0])], [np.ones(2)], 0.5), ValueError, r"`gains\[0\]`"),
    ("alloc NaN gain", lambda: jl.allocate_ranks([np.array([np.nan])], [np.ones(1)], 0.5), ValueError, r"`gains\[0\]`"),
    ("alloc zero cost", lambda: jl.allocate_ranks([np.ones(2)], [np.array([1.0, 0.0])], 0.5), ValueError, r"`costs\[0\]`"),
    ("alloc 2-D gains", lambda: jl.allocate_ranks([np.ones((2, 2))], [np.ones((2, 2))], 0.5), ValueError, r"`gains\[0\]`.*1-D"),
    ("alloc gains array", lambda: jl.allocate_ranks(np.ones((2, 2)), [np.ones(2), np.ones(2)], 0.5), TypeError, r"`gains` must be a sequence"),
    # --- statistics ------------------------------------------------------------------
    ("moment dim 0", lambda: jl.MomentAccumulator(0), ValueError, r"`dim`"),
    ("moment mode", lambda: jl.MomentAccumulator(3, mode="svd"), ValueError, r"`mode`.*'svd'"),
    ("moment dtype", lambda: jl.MomentAccumulator(3, dtype="float16"), ValueError, r"`dtype`"),
    ("cross rows", lambda: jl.CrossMomentAccumulator(0, 3), ValueError, r"`rows`"),
    ("moment merge other", lambda: jl.MomentAccumulator(3).merge(jl.MomentAccumulator(4)), ValueError, r"`other` must have dim=3"),
    ("moment merge type", lambda: jl.MomentAccumulator(3).merge(object()), TypeError, r"`other`"),
]


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_dtype_error_for_statistics_on_update():
    acc = jl.MomentAccumulator(3, dtype="float64")
    with pytest.raises(ValueError, match=r"`x`.*last dimension 3"):
        acc.update(np.ones((2, 4)))
    assert acc.count == 0


def test_bad_input_is_named_on_every_backend(backend):
    w = backend.asarray(_with(W, (0, 0), np.nan))
    with pytest.raises(ValueError, match=r"`weight`.*1 NaN"):
        jl.projected_lowrank(w, 2)
    with pytest.raises(ValueError, match=r"`cov` must be symmetric"):
        jl.whiten(backend.asarray(_asym(CX)))
    with pytest.raises(ValueError, match=r"`cov` is indefinite"):
        jl.whiten(backend.asarray(_indefinite(4)), method="cholesky")


@pytest.mark.parametrize("name", ["whiten", "projected_lowrank"])
def test_symmetry_is_checked_at_rounding_level(name):
    """Asymmetry of 100 n eps is rejected; rounding-level asymmetry is not."""
    n = CX.shape[0]
    scale = np.abs(CX).max()
    eps = np.finfo(np.float64).eps

    def run(c):
        if name == "whiten":
            return jl.whiten(c)
        return jl.projected_lowrank(W, 2, input_cov=c)

    bad = CX.copy()
    bad[0, 1] += 100 * n * eps * scale
    with pytest.raises(ValueError, match="must be symmetric"):
        run(bad)
    fine = CX.copy()
    fine[0, 1] += eps * scale
    run(fine)


def _negative_definite(n: int) -> np.ndarray:
    return -np.cov(RNG.standard_normal((n, 30))) - np.eye(n)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
@pytest.mark.parametrize(
    "cov",
    [_negative_definite(4), np.array([[0.0, 1.0], [1.0, 0.0]]), -np.eye(3)],
    ids=["negative definite", "zero diagonal", "minus identity"],
)
def test_indefinite_is_never_called_zero(method, cov):
    """A covariance with a negative (or zero) diagonal mean is indefinite on both paths.

    Only the all-zero matrix is "identically zero".
    """
    with pytest.raises(ValueError, match=r"`cov` is indefinite"):
        jl.whiten(cov, method=method)
    with pytest.raises(ValueError, match=r"`grad_cov` is indefinite"):
        jl.projected_lowrank(np.ones((cov.shape[0], 2)), 1, grad_cov=cov, whitening=method)
    with pytest.raises(ValueError, match=r"`cov` is identically zero"):
        jl.whiten(np.zeros_like(cov), method=method)


def _mixed_library_cases():
    import torch

    t = torch.from_numpy
    return [
        ("input_cov", lambda: jl.projected_lowrank(W, 2, input_cov=t(CX)), "torch.Tensor", "numpy"),
        ("input_cov", lambda: jl.projected_lowrank(t(W), 2, input_cov=CX), "numpy.ndarray", "torch"),
        ("grad_cov", lambda: jl.projected_lowrank(W, 2, input_cov=CX, grad_cov=t(CG)), "torch.Tensor", "numpy"),
        ("left", lambda: jl.projected_lowrank(W, 2, left=t(W[:, :2].copy())), "torch.Tensor", "numpy"),
        ("grad_cov", lambda: jl.jactus_layer(W, 2, input_cov=CX, grad_cov=t(CG)), "torch.Tensor", "numpy"),
        ("grad_mean", lambda: jl.jactus_layer(t(W), 2, input_cov=t(CX), grad_cov=t(CG), grad_mean=G), "numpy.ndarray", "torch"),
        ("bases\\[1\\]", lambda: jl.union_of_subspaces(W[:, :2].copy(), t(W[:, 2:].copy())), "torch.Tensor", "numpy"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_numpy_and_torch_mixed_in_one_call_name_the_argument(case):
    """Mixing libraries gives a TypeError naming the argument and both libraries.

    Before: "Cannot interpret 'torch.float64' as a data type" or an AttributeError.
    """
    name, call, seen, works_on = _mixed_library_cases()[case]
    with pytest.raises(TypeError, match=rf"`{name}` is a {seen}.*works on {works_on} arrays.*pass every array as"):
        call()


@pytest.mark.parametrize("where", ["diagonal tile", "off-diagonal tile", "ragged edge tile"])
def test_symmetry_check_is_exact_at_the_tolerance_boundary(backend, where):
    """The tiled check finds max |C - Cᵀ| exactly wherever it is (n = 300: tiles of 128
    and a ragged edge): 5% above 10 n eps max|C| is refused naming the argument, 5% below
    is accepted."""
    from jactus_linalg._checks import SYMMETRY_TILE

    n = 300
    assert n > 2 * SYMMETRY_TILE and n % SYMMETRY_TILE
    a = np.random.default_rng(3).standard_normal((n, 40))
    c = a @ a.T / 40
    c = (c + c.T) / 2  # exactly symmetric
    scale = float(np.abs(c).max())
    boundary = 10 * n * np.finfo(np.float64).eps * scale
    i, j = {"diagonal tile": (3, 70), "off-diagonal tile": (20, 200),
            "ragged edge tile": (299, 150)}[where]
    for factor, refused in ((1.05, True), (0.95, False)):
        bad = c.copy()
        bad[i, j] += factor * boundary
        if refused:
            with pytest.raises(ValueError, match=r"`input_cov` must be symmetric; max \|C - C\^T\|"):
                jl.projected_lowrank(backend.asarray(np.ones((5, n))), 2,
                                     input_cov=backend.asarray(bad))
        else:
            jl.whiten(backend.asarray(bad), method="cholesky")


def test_moment_accumulators_name_a_batch_from_another_library():
    """A torch batch after numpy ones (or the reverse) is a TypeError naming the argument
    and the statistic, not numpy's concatenation error; nothing is absorbed."""
    torch = pytest.importorskip("torch")
    from jactus_linalg.covariance import CrossMomentAccumulator, MomentAccumulator

    for mode in ("gram", "qr"):
        acc = MomentAccumulator(3, name="layer:input_cov", mode=mode)
        acc.update(np.ones((4, 3)))
        with pytest.raises(TypeError, match=r"`x` for statistic `layer:input_cov` is a torch\.Tensor.*numpy"):
            acc.update(torch.ones(2, 3, dtype=torch.float64))
        assert acc.count == 4
        back = MomentAccumulator(3, mode=mode)
        back.update(torch.ones(2, 3))
        with pytest.raises(TypeError, match=r"`x` .* numpy\.ndarray, but the earlier batches were torch"):
            back.update(np.ones((2, 3)))
    cross = CrossMomentAccumulator(2, 3, name="layer:grad_mean")
    cross.update(np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(TypeError, match=r"`g` for statistic `layer:grad_mean`"):
        cross.update(torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64))
    assert cross.count == 4
