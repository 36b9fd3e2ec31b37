"""Half-precision models: statistics and decompositions upcast, results in the model's dtype.

Two things go wrong when a float16 / bfloat16 model is compressed naively:

* the Gram matrix, accumulated in float16, overflows (float16 stops at
  65504; one outlier feature of size ~300 over 512 tokens is enough);
* LAPACK (numpy, scipy) and torch's CPU kernels have no half-precision
  Cholesky, QR, SVD or eigh at all.

:class:`jactus_linalg.MomentAccumulator` upcasts each batch before the
product (float64 on CPU), and every decomposition runs in at least float32
(here float64, the promoted dtype of the weight and the float64
covariance). Factors are returned in the weight's dtype, so the only loss
is the final rounding: checked here as ``‖A16 − A64‖ ≤ eps16 · ‖A64‖`` for
each factor.

Run: ``python docs/examples/half_precision.py``
"""

from __future__ import annotations

import warnings

import numpy as np

from jactus_linalg import MomentAccumulator, projected_lowrank

N_TOKENS, N_IN, N_OUT, RANK = 512, 64, 48, 8


def calibration_inputs(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((N_TOKENS, N_IN))
    x[:, 0] *= 300.0  # an outlier feature, common in LLM activations
    return x.astype(np.float16)


def as_float64(array) -> np.ndarray:
    """numpy float64 copy of a numpy array or a torch tensor."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def check_rounding_only(half, full, eps: float, label: str) -> None:
    # singular pairs are defined up to a sign, and the two weights are decomposed by
    # different routes (float64 SVD; for the half-precision weight, the float64 Gram's
    # eigenvectors and a QR, whose triangular core carries the signs): align each
    # side's signs before comparing (the product A C B^T does not see them)
    def side_signs(name: str) -> np.ndarray:
        a16, a64 = as_float64(getattr(half, name)), as_float64(getattr(full, name))
        return np.where(np.sum(a16 * a64, axis=0) < 0, -1.0, 1.0)

    s_left, s_right = side_signs("left"), side_signs("right")
    aligned = {
        "left": as_float64(half.left) * s_left,
        "core": s_left[:, None] * as_float64(half.core) * s_right[None, :],
        "right": as_float64(half.right) * s_right,
    }
    for name, a16 in aligned.items():
        a64 = as_float64(getattr(full, name))
        rel = np.linalg.norm(a16 - a64) / np.linalg.norm(a64)
        print(f"  {label} {name:5s}: ||A_half - A_64|| / ||A_64|| = {rel:.1e} (eps = {eps:.1e})")
        assert rel <= eps, (label, name, rel)


def main() -> None:
    rng = np.random.default_rng(4)
    x16 = calibration_inputs(rng)
    w16 = rng.standard_normal((N_OUT, N_IN)).astype(np.float16)

    print("naive float16 route")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns on the overflow
        gram16 = x16.T @ x16
    print(
        f"  float16 Gram: {int(np.isinf(gram16).sum())} of {gram16.size} entries are inf "
        f"(the outlier's diagonal entry: {gram16[0, 0]})"
    )
    try:
        np.linalg.cholesky(np.eye(4, dtype=np.float16))
    except TypeError as err:
        print(f"  np.linalg.cholesky(float16): TypeError: {err}")

    print("\njactus_linalg")
    acc = MomentAccumulator(N_IN, name="input_cov")
    acc.update(x16)
    cov = acc.result()
    print(f"  MomentAccumulator: dtype {cov.dtype}, all finite: {bool(np.isfinite(cov).all())}")
    half = projected_lowrank(w16, RANK, input_cov=cov)
    full = projected_lowrank(w16.astype(np.float64), RANK, input_cov=cov)
    print(
        f"  projected_lowrank(float16 weight): factors {half.left.dtype}, "
        f"error {half.error:.4f} (float64 weight: {full.error:.4f})"
    )
    check_rounding_only(half, full, float(np.finfo(np.float16).eps), "float16")

    try:
        import torch
    except ImportError:
        print("\ntorch is not installed: bfloat16 part skipped")
        return
    print("\ntorch bfloat16")
    try:
        torch.linalg.svd(torch.eye(4, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError) as err:
        print(f"  torch.linalg.svd(bfloat16): {type(err).__name__}: {err}")
    acc_t = MomentAccumulator(N_IN, name="input_cov")
    acc_t.update(torch.from_numpy(x16.astype(np.float32)).to(torch.bfloat16))
    cov_t = acc_t.result()
    w_bf16 = torch.from_numpy(w16.astype(np.float32)).to(torch.bfloat16)
    half_t = projected_lowrank(w_bf16, RANK, input_cov=cov_t)
    full_t = projected_lowrank(w_bf16.to(torch.float64), RANK, input_cov=cov_t)
    print(
        f"  MomentAccumulator on bfloat16 batches: dtype {cov_t.dtype}; "
        f"projected_lowrank factors: {half_t.left.dtype}"
    )
    check_rounding_only(half_t, full_t, 2.0**-7, "bfloat16")


if __name__ == "__main__":
    main()
