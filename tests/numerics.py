"""Test matrices with a known spectrum, and tolerances from the dtype.

Matrices are built from factors: a random orthonormal basis (QR of a
Gaussian) times a chosen spectrum, so the condition number is known, not
hoped for. Tolerances are ``c · n · eps(dtype)``, times the condition number
where the error theory says so.
"""

from __future__ import annotations

import numpy as np


def tolerance(dtype, n: int, *, c: float = 10.0, cond: float = 1.0) -> float:
    """``c · n · eps(dtype) · cond``: the tolerance every numeric test uses.

    ``dtype`` may be a numpy dtype, a torch dtype or a dtype name.
    """
    if c <= 0 or n < 1 or cond < 1:
        msg = f"tolerance needs c > 0, n >= 1, cond >= 1; got c={c}, n={n}, cond={cond}"
        raise ValueError(msg)
    return float(c * n * _eps(dtype) * cond)


def _eps(dtype) -> float:
    name = str(dtype).replace("torch.", "")
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


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n x k`` matrix with orthonormal columns (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def with_spectrum(rng: np.random.Generator, m: int, n: int, sigma: np.ndarray) -> np.ndarray:
    """``m x n`` matrix ``P diag(sigma) Qᵀ`` with the given singular values."""
    sigma = np.asarray(sigma, dtype=np.float64)
    k = sigma.size
    return (orthonormal(rng, m, k) * sigma) @ orthonormal(rng, n, k).T


def covariance_with_spectrum(rng: np.random.Generator, eigenvalues: np.ndarray) -> np.ndarray:
    """Symmetric PSD ``V diag(λ) Vᵀ``, exactly symmetric."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    v = orthonormal(rng, lam.size, lam.size)
    c = (v * lam) @ v.T
    return (c + c.T) / 2


def spectrum(kind: str, k: int, *, cond: float = 1e3, rank: int | None = None) -> np.ndarray:
    """Descending spectra of length ``k``.

    * ``decaying``: geometric from 1 to 1/cond;
    * ``stepped``: three plateaus 1, 1/sqrt(cond), 1/cond;
    * ``rank``: ``rank`` ones, then exact zeros;
    * ``flat``: all ones.
    """
    if kind == "decaying":
        return np.geomspace(1.0, 1.0 / cond, k)
    if kind == "stepped":
        levels = np.array([1.0, cond**-0.5, 1.0 / cond])
        return np.sort(levels[np.arange(k) * 3 // max(k, 1)])[::-1]
    if kind == "rank":
        r = k // 2 if rank is None else rank
        return np.concatenate([np.ones(r), np.zeros(k - r)])
    if kind == "flat":
        return np.ones(k)
    raise ValueError(kind)
