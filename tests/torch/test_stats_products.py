"""Gram products in the model's compute dtype, summed in float64 (issue 16, calibrate).

A float32 Gram product over ``k`` rows leaves rounding of order
``sqrt(k) u32 tr C`` in the float64 sum (:meth:`GramProducts.tolerance`). The
statistics record how each covariance was formed, and the whitening's
indefiniteness check uses that tolerance: a rank-deficient float32-formed
Gram passes, an eigenvalue far below the float32 rounding level
(``-1e-2 lambda_max``, ``-delta/2``) is still refused. Files keep the record;
older files load as formed in their own dtype.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jactus_linalg.covariance import GramProducts, LayerStatistics, MomentAccumulator
from jactus_linalg.torch import CalibrationStats, calibrate, compress
from jactus_linalg.whitening import DEFAULT_DAMPING, whiten, whitening_operator

from ..numerics import tolerance
from .tiny_mlp import HIDDEN, make_batches, make_mlp, mlp_loss, rewrite_safetensors_header

U32 = 2.0**-24


def low_rank_float32(rng, rows: int, n: int, rank: int, dead: int = 0, seed: int = 7) -> np.ndarray:
    """``rows`` float32 tokens in one ``rank``-dimensional subspace (the same for every call
    with this ``seed``) with ``dead`` all-zero channels."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    x = (rng.standard_normal((rows, rank)) * np.geomspace(1.0, 1e-2, rank)) @ basis[:, :rank].T
    if dead:
        x[:, -dead:] = 0.0
    return x.astype(np.float32)


def formed(batches, products: str = "compute") -> MomentAccumulator:
    acc = MomentAccumulator(batches[0].shape[-1], dtype="float64", products=products)
    for b in batches:
        acc.update(b)
    return acc


@pytest.fixture
def rank_deficient(rng):
    """Fewer tokens (2 x 40) than features (96), and 6 dead channels: C has rank <= 80."""
    batches = [low_rank_float32(rng, 40, 96, 60, dead=6) for _ in range(2)]
    return formed(batches)


def test_the_accumulator_records_how_each_gram_was_formed(rng):
    x32 = [rng.standard_normal((r, 8)).astype(np.float32) for r in (5, 9, 7)]
    assert formed(x32).gram_products == GramProducts("float32", 9)  # most rows in one product
    # all in float64: one long float64 sum over every row
    assert formed(x32, "accumulation").gram_products == GramProducts("float64", 21)
    # float64 batches under "compute" multiply in float64
    assert formed([b.astype(np.float64) for b in x32]).gram_products == GramProducts("float64", 21)
    # merging keeps the coarser dtype and the longer product
    merged = formed(x32).merge(formed(x32[:1], "accumulation"))
    assert merged.gram_products == GramProducts("float32", 9)
    assert MomentAccumulator(8, mode="qr").gram_products is None
    qr = MomentAccumulator(8, mode="qr")
    qr.update(x32[0])
    assert qr.gram_products is None  # a streamed QR forms no Gram product
    # the scale multiplies the float64 sum: s^2 X^T X, the same as scaling the rows
    scaled, plain = formed(x32), MomentAccumulator(8, dtype="float64", products="compute")
    for b in x32:
        plain.update(b, scale=3.0)
    assert np.allclose(plain.total, 9.0 * scaled.total, rtol=tolerance(np.float64, 8), atol=0)


def test_a_rank_deficient_float32_gram_passes_with_its_record(rank_deficient):
    cov, products = rank_deficient.result(), rank_deficient.gram_products
    lam = np.linalg.eigvalsh(cov)
    n = cov.shape[0]
    # float32 rounding pushed eigenvalues below zero, far below float64's tolerance ...
    assert lam[0] < -tolerance(np.float64, n) * lam[-1]
    with pytest.raises(ValueError, match="indefinite"):
        whiten(cov)  # ... which refuses it without the record
    # ... and far inside sqrt(k) u32 tr C: the measured margin of the tolerance
    assert -lam[0] <= 1e-1 * products.tolerance(float(np.trace(cov)))
    for method in ("eigh", "cholesky"):
        w = whiten(cov, method=method, products=products)
        assert w.method == method  # the Cholesky path needs no eigh to decide
        factor = np.asarray(w.factor)
        target = cov + w.damping * np.eye(n)
        err = np.linalg.norm(factor @ factor.T - target) / np.linalg.norm(target)
        # eigh clips the negative eigenvalues: S S^T differs from C + delta I by them
        clipped = np.sqrt(n) * -lam[0] / np.linalg.norm(target)
        assert err <= tolerance(np.float64, n, cond=1 / DEFAULT_DAMPING) + clipped
    svd_llm = whiten(cov, method="cholesky", damping="svd-llm", products=products)
    assert svd_llm.damping > 0  # its Cholesky of C failed; its shift applied, not refused


def _push_down(cov: np.ndarray, depth: float) -> np.ndarray:
    """``cov`` with the eigenvalue of its smallest eigenvector set to ``-depth``."""
    lam, vecs = np.linalg.eigh(cov)
    v = vecs[:, :1]
    return cov - (lam[0] + depth) * (v @ v.T)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_an_indefinite_matrix_far_below_float32_rounding_is_refused(rank_deficient, method):
    """-1e-2 lambda_max (the damped Cholesky fails) and -delta/2 (it succeeds; the
    certificate must find it) are both far below sqrt(k) u32 tr C here."""
    cov, products = rank_deficient.result(), rank_deficient.gram_products
    lam_max = float(np.linalg.eigvalsh(cov)[-1])
    delta = DEFAULT_DAMPING * float(np.mean(np.diag(cov)))
    tol = products.tolerance(float(np.trace(cov)))
    for depth in (1e-2 * lam_max, delta / 2):
        assert depth > 10 * tol
        bad = _push_down(cov, depth)
        with pytest.raises(ValueError, match="indefinite"):
            whitening_operator(bad, method=method, products=products)
    with pytest.raises(ValueError, match="indefinite"):
        whitening_operator(
            _push_down(cov, 1e-2 * lam_max), method="cholesky", damping="svd-llm", products=products
        )
    # a zero eigenvalue pushed down by less than the tolerance is rounding: accepted
    whitening_operator(_push_down(cov, tol / 2), method=method, products=products)
    with pytest.raises(TypeError, match="`products` must be a GramProducts"):
        whitening_operator(cov, products=("float32", 40))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize(("rows", "n", "rank"), [(32, 64, 32), (256, 64, 40), (512, 256, 200)])
def test_float32_rounding_stays_far_inside_the_tolerance(rng, lib, rows, n, rank):
    """The negative eigenvalues of float32-formed Grams of rank-deficient data are
    under 10% of sqrt(k) u32 tr C (numpy's and torch's BLAS; measured: at most a few
    percent), and the formed moment is within it of the all-float64 one."""
    data = [low_rank_float32(rng, rows, n, rank) for _ in range(3)]
    if lib == "torch":
        data = [torch.from_numpy(b) for b in data]
    acc = formed(data)
    cov = np.asarray(acc.result())
    exact = np.asarray(formed(data, "accumulation").result())
    lam_exact = np.linalg.eigvalsh(exact)
    assert lam_exact[0] <= tolerance(np.float64, n) * lam_exact[-1]  # rank-deficient: rank <= rank
    tol = acc.gram_products.tolerance(float(np.trace(cov)))
    assert acc.gram_products == GramProducts("float32", rows)
    lam = np.linalg.eigvalsh(cov)
    assert lam[0] < 0  # float32 rounding does push the zero eigenvalues below zero
    assert -lam[0] <= 1e-1 * tol
    assert np.linalg.norm(cov - exact, 2) <= tol
    assert np.linalg.norm(cov - exact, 2) > tolerance(np.float64, n) * np.linalg.norm(exact, 2)


def float32_stats(**kwargs) -> CalibrationStats:
    """The float32 MLP calibrated on 2 batches of 5 tokens: 10 tokens < 12 inputs, 32 units."""
    model = make_mlp(dtype=torch.float32)
    batches = make_batches(n=2, size=5, dtype=torch.float32)
    return calibrate(model, batches, mlp_loss, targets=["0", "2"], progress=False, **kwargs)


def test_calibrate_forms_float32_products_for_a_float32_model():
    stats = float32_stats()
    assert stats.meta["products"] == "compute"
    for name in ("0", "2"):
        layer = stats.layer(name)
        assert layer.input_cov.dtype == torch.float64  # summed in float64
        # the gradients too: the per-token scale is applied after the float32 product
        assert layer.input_products == layer.grad_products == GramProducts("float32", 5)
    exact = float32_stats(products="accumulation")
    for name in ("0", "2"):
        a, b = stats.layer(name), exact.layer(name)
        assert b.input_products == b.grad_products == GramProducts("float64", 10)
        for cov, ref, products in ((a.input_cov, b.input_cov, a.input_products),
                                   (a.grad_cov, b.grad_cov, a.grad_products)):
            tol = products.tolerance(float(torch.trace(ref)))
            assert 0 < float(torch.linalg.matrix_norm(cov - ref, 2)) <= tol
    with pytest.raises(ValueError, match="`products` must be one of"):
        float32_stats(products="float16")


def test_compress_whitens_rank_deficient_float32_statistics():
    """10 tokens for 32 hidden features: C_x of layer 2 has rank <= 10 and, formed in
    float32, negative eigenvalues that only the recorded tolerance accepts."""
    stats = float32_stats()
    layer = stats.layer("2")
    lam = torch.linalg.eigvalsh(layer.input_cov)
    assert float(lam[0]) < -tolerance(torch.float64, HIDDEN) * float(lam[-1])
    with pytest.raises(ValueError, match="indefinite"):
        whitening_operator(layer.input_cov)
    whitening_operator(layer.input_cov, products=layer.input_products)
    model = make_mlp(dtype=torch.float32)
    report = compress(model, stats, retain=0.5, progress=False)
    assert {r.name for r in report.layers} >= {"0", "2"}


def test_the_record_survives_save_and_load(tmp_path):
    stats = float32_stats()
    path = stats.save(tmp_path / "s.safetensors")
    loaded = CalibrationStats.load(path)
    for key in ("0", "2"):
        assert loaded.inputs[key].gram_products == stats.inputs[key].gram_products
        assert loaded.grads[key].gram_products == stats.grads[key].gram_products
        assert loaded.inputs[key].products == "compute"  # a resume forms float32 products
        assert loaded.layer(key).input_products == GramProducts("float32", 5)


def test_a_file_without_the_record_loads_as_float64_products(tmp_path):
    stats = float32_stats(products="accumulation")
    path = stats.save(tmp_path / "old.safetensors")

    def drop(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["jactus"])
        del meta["products"]
        header["__metadata__"]["jactus"] = json.dumps(meta)

    rewrite_safetensors_header(path, drop)
    loaded = CalibrationStats.load(path)
    for key in ("0", "2"):
        count = loaded.inputs[key].count
        assert loaded.inputs[key].gram_products == GramProducts("float64", count)
        assert loaded.inputs[key].products == "accumulation"
        assert torch.equal(loaded.inputs[key].total, stats.inputs[key].total)


@pytest.mark.parametrize(
    "record",
    [{"dtype": "float16", "rows": 5}, {"dtype": "float32", "rows": 0},
     {"dtype": "float32"}, ["float32", 5]],
)
def test_a_malformed_record_is_refused(tmp_path, record):
    path = float32_stats().save(tmp_path / "bad.safetensors")

    def tamper(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["jactus"])
        meta["products"]["input/0"] = record
        header["__metadata__"]["jactus"] = json.dumps(meta)

    rewrite_safetensors_header(path, tamper)
    with pytest.raises(ValueError, match=r"malformed.*products\.input/0"):
        CalibrationStats.load(path)


def test_resuming_with_other_products_is_refused(tmp_path):
    model = make_mlp(dtype=torch.float32)
    batches = make_batches(n=2, size=5, dtype=torch.float32)
    ckpt = tmp_path / "ckpt.safetensors"
    calibrate(model, batches[:1], mlp_loss, targets=["0", "2"], progress=False,
              checkpoint=ckpt, checkpoint_every=1)
    with pytest.raises(ValueError, match="products"):
        calibrate(model, batches, mlp_loss, targets=["0", "2"], progress=False,
                  checkpoint=ckpt, products="accumulation")


def test_layer_statistics_default_to_no_record():
    """Statistics built by hand (four fields) carry no record: their own dtype's tolerance."""
    stats = LayerStatistics(np.eye(3), None, None, 10)
    assert stats.input_products is None and stats.grad_products is None
    assert math.isclose(GramProducts("float32", 100).tolerance(2.0), 10 * U32 * 2.0)
