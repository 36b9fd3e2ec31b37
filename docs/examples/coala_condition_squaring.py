"""Failure mode 1: forming and inverting the Gram matrix squares the condition number.

Whitening data ``X`` (N tokens x n features) means finding ``S`` with
``S Sᵀ = C = XᵀX / N``; the whitened data ``Z = X S⁻ᵀ`` then satisfies
``ZᵀZ / N = I`` *exactly*, whatever the factor. Its departure from the
identity is a reference-free measure of how well a route whitens.

* The Gram route (SVD-LLM style: ``C = XᵀX/N``, ``L = cholesky(C)``,
  ``S⁻¹ = inv(L)``) works on ``C``, whose condition number is ``κ(X)²``:
  its error grows like ``eps · κ(X)²``.
* ``MomentAccumulator(mode="qr")`` streams a QR of the batches and keeps only
  ``R`` with ``RᵀR = XᵀX``; :func:`jactus_linalg.whiten` factors from ``R``
  and never forms ``XᵀX``: the error grows like ``eps · κ(X)``.

Everything is float64, undamped (``damping=0``) to isolate rounding. ``X`` is
built with a known spectrum: singular values ``geomspace(1, 1/κ)``, so
``κ(X)`` is known, not hoped for.

Run: ``python docs/examples/coala_condition_squaring.py``
"""

from __future__ import annotations

import numpy as np

from jactus_linalg import MomentAccumulator, whiten

N_TOKENS, N_FEATURES, N_BATCHES = 2048, 64, 8
EPS = float(np.finfo(np.float64).eps)


def data_with_condition(rng: np.random.Generator, kappa: float) -> np.ndarray:
    """``X = P diag(s) Qᵀ · sqrt(N)`` with ``s = geomspace(1, 1/kappa)``."""
    p, _ = np.linalg.qr(rng.standard_normal((N_TOKENS, N_FEATURES)))
    q, _ = np.linalg.qr(rng.standard_normal((N_FEATURES, N_FEATURES)))
    s = np.geomspace(1.0, 1.0 / kappa, N_FEATURES)
    return (p * s) @ q.T * np.sqrt(N_TOKENS)


def whitening_error(x: np.ndarray, inverse_factor: np.ndarray) -> float:
    """``‖ZᵀZ/N − I‖₂`` for ``Z = X S⁻ᵀ`` (0 in exact arithmetic)."""
    z = x @ inverse_factor.T
    return float(np.linalg.norm(z.T @ z / len(x) - np.eye(x.shape[1]), 2))


def gram_route(x: np.ndarray) -> float | str:
    gram = x.T @ x / len(x)
    try:
        lower = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError as err:
        return f"fails: {err}"
    return whitening_error(x, np.linalg.inv(lower))


def package_route(x: np.ndarray) -> float:
    acc = MomentAccumulator(N_FEATURES, name="input_cov", mode="qr")
    for batch in np.array_split(x, N_BATCHES):
        acc.update(batch)
    white = whiten(acc.result(), damping=0.0, method="cholesky")
    return whitening_error(x, white.inverse)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"N={N_TOKENS} tokens, n={N_FEATURES} features, float64, damping=0")
    print(
        f"{'kappa(X)':>9} | {'Gram + cholesky + inv':>37} | "
        f"{'streamed QR root':>16} | {'tol 10 n eps kappa':>18}"
    )
    for kappa in (1e4, 1e6, 1e8, 1e9):
        x = data_with_condition(rng, kappa)
        classic = gram_route(x)
        ours = package_route(x)
        tol = 10 * N_FEATURES * EPS * kappa
        shown = classic if isinstance(classic, str) else f"{classic:.2e}"
        print(f"{kappa:9.0e} | {shown:>37} | {ours:16.2e} | {tol:18.2e}")
        assert ours <= tol, f"kappa={kappa:g}: whitening error {ours:.3g} > {tol:.3g}"


if __name__ == "__main__":
    main()
