"""Failure mode 4: a float32 Gram matrix loses the directions JACTUS needs most.

A model run in float32 hands over float32 activations. Forming
``C = XᵀX / N`` *in float32* and factoring it (Cholesky, then an inverse)
loses about ``eps32 · κ(X)²`` relative accuracy. The whitened gradient
``Γ = G Sx⁻ᵀ`` multiplies each input direction by ``1/sqrt(λ)``, so the
low-variance directions, where the float32 Gram is least accurate, are the
ones it amplifies: its top singular values and task directions go wrong.

Compared (all undamped, to isolate rounding):

* float32 Gram + ``np.linalg.cholesky`` + ``np.linalg.inv``;
* the package default: :class:`jactus_linalg.MomentAccumulator`
  accumulates in float64 on CPU (the float32 batches are upcast before the
  product), then :func:`jactus_linalg.whiten`;
* the package in float32 throughout, but with the streamed QR root
  (``mode="qr", dtype="float32"``), which never squares ``κ``.

Measured against a float64 reference computed from the same float32 values
by a QR of ``X`` (no Gram matrix): the relative error of the top-j
singular values of ``Γ`` and the largest principal angle between the task
subspaces ``span(Sx⁻ᵀ Q'_j)`` in layer coordinates. Both are independent of
which whitening factor is used, so the routes are comparable.

Run: ``python docs/examples/coala_float32_accuracy.py``
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from jactus_linalg import MomentAccumulator, principal_angles, whiten

N_TOKENS, N_IN, N_OUT, N_TASK, N_BATCHES = 4096, 96, 64, 8, 8
EPS64 = float(np.finfo(np.float64).eps)


def activations(rng: np.random.Generator, kappa: float) -> np.ndarray:
    """float32 ``X`` with singular values ``geomspace(1, 1/kappa) · sqrt(N)``."""
    p, _ = np.linalg.qr(rng.standard_normal((N_TOKENS, N_IN)))
    q, _ = np.linalg.qr(rng.standard_normal((N_IN, N_IN)))
    s = np.geomspace(1.0, 1.0 / kappa, N_IN)
    return ((p * s) @ q.T * np.sqrt(N_TOKENS)).astype(np.float32)


def task_geometry(grad: np.ndarray, inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top singular values of ``Γ = G S⁻ᵀ`` and an orthonormal basis of ``span(S⁻ᵀ Q'_j)``."""
    inverse = np.asarray(inverse, dtype=np.float64)
    _, sigma, qt = np.linalg.svd(grad @ inverse.T)
    directions, _ = np.linalg.qr(inverse.T @ qt[:N_TASK].T)
    return sigma[:N_TASK], directions


def score(grad: np.ndarray, inverse: np.ndarray, reference) -> tuple[float, float]:
    """Relative error of the top-j sigma(Γ), and the largest angle between task subspaces."""
    ref_sigma, ref_dirs = reference
    sigma, dirs = task_geometry(grad, inverse)
    rel = float(np.max(np.abs(sigma - ref_sigma) / ref_sigma))
    return rel, float(np.max(principal_angles(ref_dirs, dirs)))


def main() -> None:
    rng = np.random.default_rng(3)
    grad32 = rng.standard_normal((N_OUT, N_IN)).astype(np.float32)
    grad = grad32.astype(np.float64)
    print(f"N={N_TOKENS}, n={N_IN}, m={N_OUT}, top j={N_TASK} task directions; damping=0")
    print("columns: relative error of top-j sigma(Gamma) / largest principal angle (rad)")
    print(
        f"{'kappa(X)':>9} | {'float32 Gram + cholesky':>38} | "
        f"{'package default (f64)':>23} | {'package f32 QR root':>21}"
    )
    for kappa in (1e2, 1e3, 1e4, 1e5):
        x32 = activations(rng, kappa)
        # reference: float64 QR of the float32 values, S = Rᵀ (no Gram matrix)
        r = scipy.linalg.qr(x32.astype(np.float64), mode="r")[0][:N_IN] / np.sqrt(N_TOKENS)
        reference = task_geometry(grad, scipy.linalg.solve_triangular(r, np.eye(N_IN)).T)

        gram32 = x32.T @ x32 / np.float32(N_TOKENS)
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(gram32))
            classic = "{:.1e} / {:.1e}".format(*score(grad, inverse, reference))
        except np.linalg.LinAlgError as err:
            classic = f"fails: {err}"

        default = MomentAccumulator(N_IN, name="input_cov")  # float64 on CPU
        qr32 = MomentAccumulator(N_IN, name="input_cov", mode="qr", dtype="float32")
        for batch in np.array_split(x32, N_BATCHES):
            default.update(batch)
            qr32.update(batch)
        white = whiten(default.result(), damping=0.0, method="cholesky")
        white32 = whiten(qr32.result(), damping=0.0, method="cholesky")
        ours = score(grad, white.inverse, reference)
        ours32 = score(grad, white32.inverse, reference)
        print(
            f"{kappa:9.0e} | {classic:>38} | {ours[0]:9.1e} / {ours[1]:.1e}"
            f"   | {ours32[0]:9.1e} / {ours32[1]:.1e}"
        )
        # float64 Gram: the error theory says eps64 · κ(C) = eps64 · κ(X)²
        tol = 10 * N_IN * EPS64 * kappa**2
        assert max(ours) <= tol, (kappa, ours, tol)


if __name__ == "__main__":
    main()
