"""A short numerical demo of the core: the four special cases on one layer.

Run: ``python validation/demo_core.py``. Builds a 96x64 weight with a
decaying spectrum and correlated calibration statistics, then compares the
curvature-norm error of truncated SVD, SVD-LLM-style input whitening,
two-sided K-FAC whitening and JACTUS at the same rank, against the
Eckart-Young floor.
"""

from __future__ import annotations

import numpy as np

import jactus_linalg as jl


def main() -> None:
    rng = np.random.default_rng(0)
    m, n, tokens, rank = 96, 64, 512, 12
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    weight = (u[:, :n] * np.geomspace(1, 1e-2, n)) @ v.T
    x = rng.standard_normal((tokens, n)) @ (v * np.geomspace(3, 0.1, n)).T
    g = rng.standard_normal((tokens, m)) @ (u * np.geomspace(2, 0.05, m)).T
    cx, cg, gm = x.T @ x / tokens, g.T @ g / tokens, g.T @ x / tokens

    print(f"layer {m}x{n}, rank {rank}, {tokens} calibration tokens")
    print(f"{'method':<28}{'curvature err':>14}{'Eckart-Young':>14}")
    cases = {
        "truncated SVD": jl.projected_lowrank(weight, rank),
        "input whitening (SVD-LLM)": jl.projected_lowrank(weight, rank, input_cov=cx),
        "two-sided (K-FAC)": jl.projected_lowrank(weight, rank, input_cov=cx, grad_cov=cg),
    }
    jactus = jl.jactus_layer(weight, rank, input_cov=cx, grad_cov=cg, grad_mean=gm)
    kfac_norm = jl.projected_lowrank(weight, rank, input_cov=cx, grad_cov=cg)
    for name, res in cases.items():
        # measure every method in the same (two-sided) curvature norm
        err = curvature_error(weight - res.left @ res.core @ res.right.T, cx, cg)
        print(f"{name:<28}{err:>14.4f}{kfac_norm.eckart_young:>14.4f}")
    err = curvature_error(weight - jactus.left @ jactus.core @ jactus.right.T, cx, cg)
    print(f"{'JACTUS (tau=0.25)':<28}{err:>14.4f}{jactus.eckart_young:>14.4f}")
    print(f"JACTUS upper bound from its {jactus.weight_directions} weight directions: "
          f"{jactus.weight_bound:.4f}")


def curvature_error(delta: np.ndarray, cx: np.ndarray, cg: np.ndarray) -> float:
    sx = jl.whiten(cx, damping=jl.DEFAULT_DAMPING).factor
    sg = jl.whiten(cg, damping=jl.DEFAULT_DAMPING).factor
    return float(np.linalg.norm(sg.T @ delta @ sx))


if __name__ == "__main__":
    main()
