"""Tolerances from the dtype, float64 references, and the test matrices with a known spectrum.

The matrices (a random orthonormal basis, QR of a Gaussian, times a chosen
spectrum, so the condition number is known, not hoped for) live in
:mod:`jactus_linalg.testing`, shared with ``validation/bench*.py`` and the
docs examples; they are re-exported here. Tolerances are
``c · n · eps(dtype)``, times the condition number where the error theory
says so.
"""

from __future__ import annotations

import numpy as np

from jactus_linalg.testing import (  # noqa: F401  (re-exported for the tests)
    covariance_with_spectrum,
    orthonormal,
    spectrum,
    tokens_with_spectrum,
    with_spectrum,
)


def tolerance(dtype, n: int, *, c: float = 10.0, cond: float = 1.0) -> float:
    """``c · n · eps(dtype) · cond``: the tolerance every numeric test uses.

    ``dtype`` may be a numpy dtype, a torch dtype or a dtype name.
    """
    import math
    import numbers

    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        msg = f"tolerance needs an integer n; got {n!r}"
        raise TypeError(msg)
    for name, value in (("c", c), ("cond", cond)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            msg = f"tolerance needs a real {name}; got {value!r}"
            raise TypeError(msg)
    # written so that NaN fails every comparison and is rejected
    if not (math.isfinite(c) and c > 0 and n >= 1 and math.isfinite(cond) and cond >= 1):
        msg = f"tolerance needs finite c > 0, n >= 1, finite cond >= 1; got c={c}, n={n}, cond={cond}"
        raise ValueError(msg)
    return float(c * int(n) * _eps(dtype) * float(cond))


def _eps(dtype) -> float:
    name = str(dtype).replace("torch.", "")
    if dtype is not None and not isinstance(dtype, str) and not name.startswith("bfloat"):
        try:  # numpy scalar types and dtype objects (np.float64, np.dtype("f4"), ...)
            name = np.dtype(dtype).name
        except TypeError:
            pass
    table = {
        "float64": np.finfo(np.float64).eps,
        "float32": np.finfo(np.float32).eps,
        "float16": np.finfo(np.float16).eps,
        "bfloat16": 2.0**-7,
    }
    if name not in table:
        msg = f"no epsilon known for dtype {dtype!r}"
        raise ValueError(msg)
    return float(table[name])


# --- float64 references (naive on purpose: explicit factors, plain numpy) ----


def damped(cov: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """``(C + δI, δ)`` with ``δ = damping · mean(diag C)``, in float64."""
    cov = np.asarray(cov, dtype=np.float64)
    delta = float(damping) * float(np.mean(np.diag(cov)))
    return cov + delta * np.eye(cov.shape[0]), delta


def reference_factor(cov: np.ndarray | None, damping: float, dim: int) -> np.ndarray:
    """Lower Cholesky factor of ``C + δI`` in float64 (identity when ``cov`` is None)."""
    if cov is None:
        return np.eye(dim)
    return np.linalg.cholesky(damped(cov, damping)[0])


def factor_condition(cov: np.ndarray | None, damping: float) -> float:
    """``κ(S) = sqrt(κ(C + δI))`` from the eigenvalues (negatives clipped), float64."""
    if cov is None:
        return 1.0
    lam = np.clip(np.linalg.eigvalsh(np.asarray(cov, dtype=np.float64)), 0.0, None)
    delta = float(damping) * float(np.mean(np.diag(cov)))
    lo = lam[0] + delta
    if lo <= 0.0:
        return float("inf")
    return float(np.sqrt((lam[-1] + delta) / lo))


def tail_energy(sigma: np.ndarray, k: int) -> float:
    """``Σ_{i>k} σ_i²`` for descending ``sigma``."""
    s = np.asarray(sigma, dtype=np.float64)
    return float(np.sum(s[k:] ** 2))


def proj(basis: np.ndarray) -> np.ndarray:
    """Orthogonal projector onto ``span(basis)`` (rank-revealing, float64)."""
    q = orth(basis)
    return q @ q.T


def orth(b: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """Orthonormal basis of ``span(b)`` from a float64 SVD, with a relative rank cut."""
    b = np.asarray(b, dtype=np.float64)
    if b.shape[1] == 0:
        return b
    u, s, _ = np.linalg.svd(b, full_matrices=False)
    if s[0] == 0.0:
        return u[:, :0]
    cut = (np.finfo(np.float64).eps * max(b.shape)) if rtol is None else rtol
    return u[:, : int(np.sum(s > cut * s[0]))]


def subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``‖P_a - P_b‖₂``: the sine of the largest principal angle (1 if dims differ)."""
    return float(np.linalg.norm(proj(a) - proj(b), 2))


def relative_gap(sigma: np.ndarray, k: int) -> float:
    """``(σ_k - σ_{k+1}) / σ_1``: how well separated the top-k singular subspace is."""
    s = np.asarray(sigma, dtype=np.float64)
    if k <= 0 or k >= s.size or s[0] == 0.0:
        return 1.0
    return float((s[k - 1] - s[k]) / s[0])
