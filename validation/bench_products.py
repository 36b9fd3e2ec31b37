"""Accuracy and time of float32 Gram products summed in float64 (issue 16, calibrate).

``MomentAccumulator(products="compute")`` (the default) forms each batch's
:math:`X^\\top X` in the batch's dtype (float32 for a float32 model) and sums
the products in float64; ``products="accumulation"`` forms them in float64.
This script measures, against all-float64, on float32 tokens with a
covariance spectrum decaying over four decades and a few outlier channels
(as transformer activations have):

* the relative error of the top eigenvalues of :math:`C_x`;
* the relative change of the curvature-norm error of a compressed layer
  (``projected_lowrank(W, r, input_cov=C)``, both errors measured with the
  all-float64 covariance);
* the time of one batch's product in each dtype.

Run: ``python validation/bench_products.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jactus_linalg import projected_lowrank
from jactus_linalg.covariance import MomentAccumulator
from jactus_linalg.lowrank import curvature_error


def float32_tokens(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Tokens (float32) with a geometric spectrum from 1 to 1e-4 and 4 outlier channels x30."""
    scales = np.geomspace(1.0, 1e-2, dim)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    x = (rng.standard_normal((count, dim)) * scales) @ basis.T
    x[:, :4] *= 30.0
    return x.astype(np.float32)


def accumulate(batches: list[np.ndarray], products: str) -> np.ndarray:
    acc = MomentAccumulator(batches[0].shape[1], dtype="float64", products=products)
    for b in batches:
        acc.update(b)
    return acc.result()


def best_time(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(dim: int, batches: int, rows: int, rank: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    data = [float32_tokens(rng, rows, dim) for _ in range(batches)]
    c64 = accumulate(data, "accumulation")
    c32 = accumulate(data, "compute")
    top = 10
    lam64 = np.linalg.eigvalsh(c64)[::-1]
    lam32 = np.linalg.eigvalsh(c32)[::-1]
    weight = rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
    errors = {}
    for label, cov in (("float64", c64), ("float32", c32)):
        res = projected_lowrank(weight, rank, input_cov=cov)
        errors[label] = curvature_error(weight, res.left, res.core, res.right, input_cov=c64)
    b = data[0]
    b64 = b.astype(np.float64)
    return {
        "top_eig_rel": float(np.max(np.abs(lam32[:top] - lam64[:top]) / lam64[:top])),
        "all_eig_rel_to_max": float(np.max(np.abs(lam32 - lam64)) / lam64[0]),
        "cov_rel": float(np.linalg.norm(c32 - c64) / np.linalg.norm(c64)),
        "err_float64": errors["float64"],
        "err_cost": abs(errors["float32"] / errors["float64"] - 1.0),
        "t_f64": best_time(lambda: b64.T @ b64),
        "t_f32": best_time(lambda: b.T @ b),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--rows", type=int, default=1576, help="tokens per batch (8 ViT images)")
    args = p.parse_args(argv)
    print(f"{args.batches} batches of {args.rows} float32 tokens; float32 eps = "
          f"{np.finfo(np.float32).eps:.3g}")
    print(f"{'dim':>5} {'rank':>5} {'top-10 eig':>11} {'eig/max':>9} {'||dC||/||C||':>13} "
          f"{'err f64':>10} {'err cost':>9} {'t f64 s':>8} {'t f32 s':>8}")
    for dim, rank in ((768, 192), (3072, 384)):
        r = run(dim, args.batches, args.rows, rank)
        print(f"{dim:>5} {rank:>5} {r['top_eig_rel']:>11.2e} {r['all_eig_rel_to_max']:>9.2e} "
              f"{r['cov_rel']:>13.2e} {r['err_float64']:>10.4g} {r['err_cost']:>9.2e} "
              f"{r['t_f64']:>8.3f} {r['t_f32']:>8.3f}")


if __name__ == "__main__":
    main()
