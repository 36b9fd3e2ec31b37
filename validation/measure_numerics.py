"""Two numerics measurements for the Numerics page (issue 17).

``python validation/measure_numerics.py [--quick]``

1. **Damping against SVD-LLM's numerics.** For synthetic layers at ViT-Base
   shapes, inputs with a decaying covariance spectrum plus a few outlier
   channels (30x larger, as in LLM activations), compress ``W`` at a fixed
   rank with ``projected_lowrank(W, r, input_cov=Gram)`` under the package's
   default relative damping (``1e-3``) and under ``damping="svd-llm"``
   (SVD-LLM's own numerics), and report the relative output error
   ``‖(W - W') Xᵀ‖ / ‖W Xᵀ‖`` on the calibration tokens and on held-out tokens
   from the same distribution, with enough tokens (``N = 2n``, SVD-LLM's
   Cholesky succeeds) and with too few (``N = n/2``, its eigenvalue shift).
2. **SVD in float32 after float64 whitening.** For a float32 weight and
   float64 statistics: the whitening factor and ``M = W S_x`` in float64,
   then the SVD of ``M`` in float64 or in float32 (``svd_reduced(...,
   dtype=float32)``, the option ``whitening.svd_dtype`` selects), factors
   back in float64. Reports the relative increase of the whitened error
   ``‖M - U_r Σ_r V_rᵀ‖`` and the relative change of ``W'``, and the time of
   both SVDs.
3. **PSD certificate.** Covariances with a smallest eigenvalue of 0,
   -δ/100, -δ/10, -δ/2 and -2δ (δ the absolute damping): the Krylov
   estimate on the damped Cholesky factor, whether ``whiten`` refuses, and
   its time against the second Cholesky it replaces.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.linalg

from jactus_linalg import projected_lowrank
from jactus_linalg._backend import svd_reduced
from jactus_linalg.whitening import (
    DEFAULT_DAMPING,
    _krylov_lambda_min,
    inverse_transpose_times,
    whitened_weight,
    whitening_operator,
)

SHAPES = [(768, 768), (3072, 768), (768, 3072)]
QUICK_SHAPES = [(96, 96), (192, 96), (96, 192)]
OUTLIERS = 6  # channels 30x larger than the rest
RETAIN = 0.5  # rank: factors hold half of the layer's parameters


def tokens(rng: np.random.Generator, count: int, dim: int, basis: np.ndarray) -> np.ndarray:
    """Inputs with a covariance spectrum from 1 down to 1e-4, and ``OUTLIERS`` channels x30."""
    x = (rng.standard_normal((count, dim)) * np.geomspace(1.0, 1e-2, dim)) @ basis.T
    x[:, :OUTLIERS] *= 30.0
    return x


def layer(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """Weight with singular values from 1 down to 1e-2."""
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return (u * np.geomspace(1.0, 1e-2, k)) @ v.T


def rank_for(m: int, n: int) -> int:
    return max(1, int(RETAIN * m * n / (m + n)))


def output_error(w: np.ndarray, approx: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((w - approx) @ x.T) / np.linalg.norm(w @ x.T))


def damping_effect(shapes) -> None:
    print("1. damping 1e-3 (package default) against SVD-LLM's numerics (damping='svd-llm')")
    head = (f"{'shape':>10} {'tokens':>7} {'svd-llm whitening':>26} "
            f"{'calib. err svd-llm':>18} {'calib. err 1e-3':>15} {'held-out svd-llm':>16} "
            f"{'held-out 1e-3':>13} {'W diff':>8}")
    print(head)
    for m, n in shapes:
        for per_feature in (2.0, 0.5):
            rng = np.random.default_rng(m * 7 + n)
            basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
            count = int(per_feature * n)
            x_cal, x_ho = tokens(rng, count, n, basis), tokens(rng, 4 * n, n, basis)
            w = layer(rng, m, n)
            gram = x_cal.T @ x_cal
            r = rank_for(m, n)
            out = {}
            for label, damping in (("svd-llm", "svd-llm"), ("1e-3", DEFAULT_DAMPING)):
                res = projected_lowrank(w, r, input_cov=gram, damping=damping)
                approx = res.left @ res.core @ res.right.T
                out[label] = (approx, res.input_whitening)
            info = out["svd-llm"][1]
            how = "Cholesky, no damping" if info.damping == 0 else f"shift {info.relative_damping:.1e} rel."
            diff = np.linalg.norm(out["1e-3"][0] - out["svd-llm"][0]) / np.linalg.norm(out["svd-llm"][0])
            print(f"{f'{m}x{n}':>10} {count:>7} {how:>26} "
                  f"{output_error(w, out['svd-llm'][0], x_cal):>18.4e} "
                  f"{output_error(w, out['1e-3'][0], x_cal):>15.4e} "
                  f"{output_error(w, out['svd-llm'][0], x_ho):>16.4e} "
                  f"{output_error(w, out['1e-3'][0], x_ho):>13.4e} {diff:>8.2%}")


def whitened_error(m_mat: np.ndarray, u, s, vh, r: int) -> float:
    """``‖M - U_r diag(s_r) V_rᵀ‖_F`` in float64."""
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return float(np.linalg.norm(m_mat - approx))


def svd_dtype_cost(shapes) -> None:
    print("\n2. SVD of M in float32 after float64 whitening (float32 weight, float64 statistics)")
    print(f"{'shape':>10} {'rank':>5} {'err float64':>12} {'err cost f32':>13} "
          f"{'W diff':>9} {'svd f64 s':>10} {'svd f32 s':>10}")
    for m, n in shapes:
        rng = np.random.default_rng(m * 11 + n)
        basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
        x = tokens(rng, 2 * n, n, basis)
        w32 = layer(rng, m, n).astype(np.float32)
        op = whitening_operator(x.T @ x / len(x), damping=DEFAULT_DAMPING, method="cholesky")
        m_mat = whitened_weight(w32.astype(np.float64), None, op)
        r = rank_for(m, n)
        svd_reduced(np, m_mat[:64, :64])  # warm-up (LAPACK workspace, threads)
        svd_reduced(np, m_mat[:64, :64], dtype=np.float32)
        start = time.perf_counter()
        u64, s64, vh64 = svd_reduced(np, m_mat)
        t64 = time.perf_counter() - start
        start = time.perf_counter()
        u32, s32, vh32 = svd_reduced(np, m_mat, dtype=np.float32)
        t32 = time.perf_counter() - start
        e64 = whitened_error(m_mat, u64, s64, vh64, r)
        e32 = whitened_error(m_mat, u32, s32, vh32, r)
        w64 = (u64[:, :r] * s64[:r]) @ inverse_transpose_times(op, vh64[:r].T).T
        w_32 = (u32[:, :r] * s32[:r]) @ inverse_transpose_times(op, vh32[:r].T).T
        diff = np.linalg.norm(w_32 - w64) / np.linalg.norm(w64)
        print(f"{f'{m}x{n}':>10} {r:>5} {e64:>12.6e} {(e32 - e64) / e64:>13.2e} {diff:>9.2e} "
              f"{t64:>10.3f} {t32:>10.3f}")
    print(f"(float32 eps = {np.finfo(np.float32).eps:.2e}; sqrt = {math.sqrt(np.finfo(np.float32).eps):.2e})")


def certificate(sizes) -> None:
    print("\n3. PSD certificate on the damped factor (damping 1e-3): Krylov estimate vs a second Cholesky")
    print(f"{'n':>5} {'spectrum':>15} {'lambda_min/delta':>16} {'estimate/delta':>15} "
          f"{'whiten':>9} {'krylov s':>9} {'cholesky s':>10}")
    for n in sizes:
        rng = np.random.default_rng(n)
        q = np.linalg.qr(rng.standard_normal((n, n)))[0]
        for kind in ("rank-deficient", "full rank"):
            for depth in (0.0, 0.01, 0.1, 0.5, 2.0):
                if kind == "rank-deficient":
                    lam = np.concatenate([np.geomspace(1.0, 1e-3, n // 2), np.zeros(n - n // 2)])
                else:
                    lam = np.geomspace(1.0, 1e-9, n)
                delta = DEFAULT_DAMPING * lam.sum() / n / (1.0 + DEFAULT_DAMPING * depth / n)
                lam[-1] = -depth * delta
                cov = (q * lam) @ q.T
                cov = (cov + cov.T) / 2
                damped = cov + delta * np.eye(n)
                try:
                    lower = scipy.linalg.cholesky(damped, lower=True)
                except np.linalg.LinAlgError:
                    estimate, t_k = math.nan, math.nan
                else:
                    start = time.perf_counter()
                    estimate = (_krylov_lambda_min(np, lower) - delta) / delta
                    t_k = time.perf_counter() - start
                shifted = cov + 10 * n * np.finfo(np.float64).eps * np.max(np.diag(cov)) * np.eye(n)
                start = time.perf_counter()  # the second Cholesky the certificate replaces
                try:
                    scipy.linalg.cholesky(shifted, lower=True, check_finite=False)
                except np.linalg.LinAlgError:
                    pass
                t_c = time.perf_counter() - start
                try:
                    whitening_operator(cov, damping=DEFAULT_DAMPING, method="cholesky")
                    verdict = "accepted"
                except ValueError:
                    verdict = "refused"
                print(f"{n:>5} {kind:>15} {-depth:>16.2f} {estimate:>15.4f} {verdict:>9} "
                      f"{t_k:>9.4f} {t_c:>10.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    p.add_argument("--only-certificate", action="store_true", help="part 3 only")
    args = p.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if not args.only_certificate:
        damping_effect(shapes)
        svd_dtype_cost(shapes)
    certificate([64, 200] if args.quick else [768, 3072])


if __name__ == "__main__":
    main()
