"""``damping="svd-llm"`` is SVD-LLM: equality with a transcription of its per-layer code.

The reference is ``validation/svdllm_reference.py``, a transcription of
AIoT-MLSys-Lab/SVD-LLM ``SVDLLM.py`` (``profle_svdllm``: Cholesky of the
input Gram matrix, eigenvalue shift on failure; ``whitening``: inverse of
the factor, SVD of ``W S``, ``W' = U_r Σ_r V_rᵀ S⁻¹``), run in float64.
The package's special case is ``projected_lowrank(W, r, input_cov=XᵀX,
damping="svd-llm")``, and ``compress(method="svd-llm")`` uses it by default.

Tolerance: the reconstructions differ by rounding in the Cholesky, the
triangular solve (SVD-LLM: an explicit inverse) and the SVD, amplified by
``κ(S)`` and by ``σ_1 / (σ_r − σ_{r+1})`` of ``W S`` (the singular subspace's
condition); the test builds problems where that bound is below ``1e-10``
and checks both.
"""

from __future__ import annotations

import numpy as np
import pytest

import jactus_linalg as jl

from .numerics import orthonormal, tolerance

torch = pytest.importorskip("torch")

from validation.svdllm_reference import svdllm_layer, svdllm_whitening_factor  # noqa: E402

M, N = 24, 32


def _tokens(rng: np.random.Generator, count: int, dim: int, decay: float) -> np.ndarray:
    """``count`` tokens whose covariance spectrum decays geometrically to ``decay``."""
    scales = np.geomspace(1.0, np.sqrt(decay), dim)
    return (rng.standard_normal((count, dim)) * scales) @ orthonormal(rng, dim, dim).T


def _gapped_weight(rng: np.random.Generator, factor: np.ndarray, rank: int) -> np.ndarray:
    """``W`` with ``W S = P diag(s) Qᵀ``, ``s`` gapped by 10x at ``rank``: a well-posed truncation."""
    s = np.concatenate([np.geomspace(10.0, 5.0, rank), np.geomspace(0.5, 0.05, M - rank)])
    target = (orthonormal(rng, M, M) * s) @ orthonormal(rng, N, M).T
    return np.linalg.solve(factor.T, target.T).T  # target S^{-1}


def _bound(weight: np.ndarray, factor: np.ndarray, rank: int) -> float:
    """``c n eps κ(S) σ_1/gap``: the rounding bound of ``W'`` relative to ``‖W'‖``."""
    s = np.linalg.svd(weight @ factor, compute_uv=False)
    gap = (s[rank - 1] - s[rank]) / s[0]
    return tolerance(np.float64, N, cond=np.linalg.cond(factor) / gap)


def _package(weight: np.ndarray, gram: np.ndarray, rank: int):
    res = jl.projected_lowrank(
        torch.from_numpy(weight), rank, input_cov=torch.from_numpy(gram), damping="svd-llm"
    )
    return res, (res.left @ res.core @ res.right.T).numpy()


def test_definite_gram_is_svd_llm_without_damping():
    """Enough tokens: SVD-LLM's Cholesky succeeds, and so does the package's, undamped."""
    rng = np.random.default_rng(0)
    x = _tokens(rng, 4 * N, N, 1e-4)
    gram = x.T @ x  # SVD-LLM accumulates the sum, not the mean
    factor, shifted = svdllm_whitening_factor(torch.from_numpy(gram))
    assert not shifted
    rank = 6
    weight = _gapped_weight(rng, factor.numpy(), rank)
    ref = svdllm_layer(torch.from_numpy(weight), torch.from_numpy(gram), rank, dtype=torch.float64)
    res, ours = _package(weight, gram, rank)
    bound = _bound(weight, factor.numpy(), rank)
    assert bound <= 1e-10, "the problem must be well posed enough for the 1e-10 check"
    want = ref.weight.numpy()
    assert np.linalg.norm(ours - want) <= bound * np.linalg.norm(want)
    info = res.input_whitening
    assert info.damping == 0.0 and info.relative_damping == 0.0 and info.notes == ()


@pytest.mark.parametrize("case", ["fewer tokens than features", "dead input unit"])
def test_rank_deficient_gram_takes_svd_llm_shift(case):
    """A singular Gram: SVD-LLM's Cholesky fails, it shifts by -λ_min + 1e-6; so does the package, and says so."""
    rng = np.random.default_rng(1)
    if case == "fewer tokens than features":
        x = _tokens(rng, N - 4, N, 1e-2)  # rank N - 4
        x[:, 0] = 0.0  # and a zero pivot, so the float64 Cholesky fails for certain
    else:
        x = _tokens(rng, 4 * N, N, 1e-2)
        x[:, 3] = 0.0  # a unit that never fires: zero row and column in XᵀX
    x *= 0.05  # small activations: kappa(S)^2 ~ lambda_max / 1e-6 stays near 1e3
    gram = x.T @ x
    factor, shifted = svdllm_whitening_factor(torch.from_numpy(gram))
    assert shifted, "the reference must take its fallback for this test to mean anything"
    rank = 6
    weight = _gapped_weight(rng, factor.numpy(), rank)
    ref = svdllm_layer(torch.from_numpy(weight), torch.from_numpy(gram), rank, dtype=torch.float64)
    res, ours = _package(weight, gram, rank)
    bound = _bound(weight, factor.numpy(), rank)
    assert bound <= 1e-10
    want = ref.weight.numpy()
    assert np.linalg.norm(ours - want) <= bound * np.linalg.norm(want)
    info = res.input_whitening
    lam = np.linalg.eigvalsh(gram)
    shift = -lam[0] + 1e-6
    # the shift is SVD-LLM's, reported as the absolute damping and in the notes
    assert info.damping == pytest.approx(shift, rel=tolerance(np.float64, N, cond=lam[-1] / shift))
    assert info.relative_damping == pytest.approx(info.damping / np.mean(np.diag(gram)))
    assert any("SVD-LLM's fallback" in note and "Cholesky of C failed" in note for note in info.notes)


def test_svd_llm_damping_refuses_an_indefinite_gram():
    """SVD-LLM would shift any negative eigenvalue away; below rounding it is refused here."""
    rng = np.random.default_rng(2)
    q = orthonormal(rng, N, N)
    lam = np.linspace(1.0, 0.1, N)
    lam[-1] = -1e-3
    cov = (q * lam) @ q.T
    cov = (cov + cov.T) / 2
    with pytest.raises(ValueError, match=r"`input_cov` is indefinite"):
        jl.projected_lowrank(rng.standard_normal((M, N)), 2, input_cov=cov, damping="svd-llm")


def test_svd_llm_damping_needs_cholesky_and_a_matrix():
    rng = np.random.default_rng(3)
    x = _tokens(rng, 2 * N, N, 1e-2)
    with pytest.raises(ValueError, match=r"`damping`='svd-llm'.*method='cholesky'"):
        jl.whiten(x.T @ x, damping="svd-llm", method="eigh")
    with pytest.raises(TypeError, match=r"`damping` must be a number >= 0 or 'svd-llm'"):
        jl.whiten(x.T @ x, damping="svdllm")


def test_svd_llm_damping_from_a_root_factors_its_gram():
    """Statistics kept as a root R (RᵀR = C) give SVD-LLM's factor of the Gram RᵀR."""
    rng = np.random.default_rng(4)
    x = _tokens(rng, 2 * N, N, 1e-2)
    acc = jl.MomentAccumulator(N, mode="qr")
    acc.update(x)
    root = acc.result()
    gram = root.root.T @ root.root
    from_root = jl.whiten(root, damping="svd-llm", method="cholesky")
    direct = jl.whiten(gram, damping="svd-llm", method="cholesky")
    assert from_root.damping == direct.damping == 0.0
    assert np.array_equal(from_root.factor, direct.factor)


def test_compress_svd_llm_uses_svd_llm_numerics_by_default():
    """``compress(method="svd-llm")``: every layer's W' is SVD-LLM's on the same statistics."""
    from jactus_linalg.torch import calibrate, compress

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10)
    ).double()
    # 16 tokens < 24 features: the second layer's Gram is singular (SVD-LLM's fallback)
    batches = [torch.randn(8, 12, dtype=torch.float64) for _ in range(2)]

    def loss_fn(m, batch):
        return m(batch).pow(2).mean()

    stats = calibrate(model, batches, loss_fn, progress=False)
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in ("0", "2")}
    report = compress(model, stats, method="svd-llm", retain=0.6, progress=False)
    checked = 0
    for layer in report.layers:
        if layer.rank is None:
            continue
        cov = stats.layer(layer.name).input_cov
        ref = svdllm_layer(dense[layer.name], cov, layer.rank, dtype=torch.float64)
        got = model.get_submodule(layer.name).weight.detach()
        factor, shifted = svdllm_whitening_factor(cov)
        w = dense[layer.name].numpy()
        s = np.linalg.svd(w @ factor.numpy(), compute_uv=False)
        gap = (s[layer.rank - 1] - s[layer.rank]) / s[0]
        bound = tolerance(np.float64, w.shape[1], cond=np.linalg.cond(factor.numpy()) / gap)
        assert torch.linalg.norm(got - ref.weight) <= bound * torch.linalg.norm(ref.weight)
        info = layer.input_whitening
        if shifted:
            assert any("SVD-LLM's fallback" in note for note in layer.notes)
            assert info.damping > 0.0
        else:
            assert info.damping == 0.0
        checked += 1
    assert checked == 2


def test_float32_weight_matches_svd_llm_float32_code_at_equal_error():
    """SVD-LLM's own setting: float32 weight, float64 Gram. The package takes the top
    subspaces from the float64 Gram of ``W S`` (``lowrank.gram_truncation``), SVD-LLM
    from a float32 SVD; both W' are the float64 W' to float32's bound, and their
    output errors ``‖(W − W')L‖`` agree to float32 rounding."""
    rng = np.random.default_rng(6)
    x = _tokens(rng, 4 * N, N, 1e-4)
    gram = x.T @ x
    factor, _ = svdllm_whitening_factor(torch.from_numpy(gram))
    rank = 6
    weight = _gapped_weight(rng, factor.numpy(), rank).astype(np.float32)
    exact = svdllm_layer(
        torch.from_numpy(weight.astype(np.float64)), torch.from_numpy(gram), rank, dtype=torch.float64
    ).weight.numpy()
    theirs = svdllm_layer(torch.from_numpy(weight), torch.from_numpy(gram), rank).weight.numpy()
    res, ours = _package(weight, gram, rank)
    assert ours.dtype == np.float32
    s = np.linalg.svd(weight.astype(np.float64) @ factor.numpy(), compute_uv=False)
    gap = (s[rank - 1] - s[rank]) / s[0]
    bound = tolerance(np.float32, N, cond=np.linalg.cond(factor.numpy()) / gap)
    assert np.linalg.norm(ours - exact) <= bound * np.linalg.norm(exact)
    lower = factor.numpy()
    err_ours = np.linalg.norm((weight - ours).astype(np.float64) @ lower)
    err_theirs = np.linalg.norm((weight - theirs).astype(np.float64) @ lower)
    scale = np.linalg.norm(weight.astype(np.float64) @ lower)
    assert abs(err_ours - err_theirs) <= tolerance(np.float32, N, cond=np.linalg.cond(lower)) * scale
    # the reported error is the float64 one (float64 Gram), not float32's
    err_exact = np.linalg.norm((weight.astype(np.float64) - exact) @ lower)
    assert abs(res.error - err_exact) <= tolerance(np.float64, N, cond=np.linalg.cond(lower)) * scale
