r"""Test matrices with a known spectrum, in one place for the tests, the benchmarks and the docs examples.

Every matrix is built from its factors: random orthonormal bases (QR of a
Gaussian matrix, signs fixed so the basis is a function of the generator's
state) around a chosen spectrum. The singular values, eigenvalues and so the
condition number are therefore known exactly, not hoped for:

* :func:`with_spectrum`: :math:`W = P \operatorname{diag}(\sigma) Q^\top`;
* :func:`covariance_with_spectrum`: :math:`C = V \operatorname{diag}(\lambda) V^\top`,
  exactly symmetric;
* :func:`tokens_with_spectrum`: rows :math:`x_t` whose second moment
  :math:`\mathbb{E}[x x^\top]` is :math:`V \operatorname{diag}(\lambda) V^\top`
  (the sample moment converges to it), as calibration data gives;
* :func:`spectrum`: the descending spectra the tests sweep.

numpy only (importing :mod:`jactus_linalg` does not import this module, and
this module never imports torch). The tolerances the tests derive from the
dtype, the dimension and the condition number stay in ``tests/numerics.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["covariance_with_spectrum", "orthonormal", "spectrum", "tokens_with_spectrum", "with_spectrum"]


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    r"""``n x k`` matrix with orthonormal columns: :math:`Q` of :math:`G = QR`, :math:`G` Gaussian.

    The signs are fixed (:math:`\operatorname{diag} R > 0`), so the result is
    a function of ``rng``'s state and distributed uniformly (Haar) on the
    Stiefel manifold.
    """
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def with_spectrum(rng: np.random.Generator, m: int, n: int, sigma: np.ndarray) -> np.ndarray:
    r"""``m x n`` matrix :math:`P \operatorname{diag}(\sigma) Q^\top` with the given singular values.

    ``sigma`` (length :math:`k \le \min(m, n)`, non-negative) are its
    singular values up to float64 rounding; the rank is the number of
    non-zero entries. :math:`P` (``m x k``) is drawn before :math:`Q`.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    k = sigma.size
    return (orthonormal(rng, m, k) * sigma) @ orthonormal(rng, n, k).T


def covariance_with_spectrum(rng: np.random.Generator, eigenvalues: np.ndarray) -> np.ndarray:
    r"""Symmetric :math:`V \operatorname{diag}(\lambda) V^\top`, exactly symmetric (averaged with its transpose).

    Negative ``eigenvalues`` are allowed (indefinite test cases).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    v = orthonormal(rng, lam.size, lam.size)
    c = (v * lam) @ v.T
    return (c + c.T) / 2


def tokens_with_spectrum(rng: np.random.Generator, count: int, eigenvalues: np.ndarray) -> np.ndarray:
    r"""``count x n`` rows :math:`x_t = V \operatorname{diag}(\sqrt\lambda)\, z_t`, :math:`z_t \sim N(0, I)`.

    Their second moment :math:`\mathbb{E}[x x^\top] = V \operatorname{diag}(\lambda) V^\top`;
    the sample moment :math:`X^\top X / N` converges to it at rate
    :math:`1/\sqrt N`. The Gaussian rows are drawn before :math:`V`.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if np.any(lam < 0):
        msg = "`eigenvalues` of a second moment must be non-negative"
        raise ValueError(msg)
    z = rng.standard_normal((count, lam.size)) * np.sqrt(lam)
    return z @ orthonormal(rng, lam.size, lam.size).T


def spectrum(kind: str, k: int, *, cond: float = 1e3, rank: int | None = None) -> np.ndarray:
    """Descending spectra of length ``k``.

    * ``decaying``: geometric from 1 to 1/cond;
    * ``stepped``: three plateaus 1, 1/sqrt(cond), 1/cond;
    * ``rank``: ``rank`` ones (default ``k // 2``), then exact zeros;
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
    msg = f"`kind` must be 'decaying', 'stepped', 'rank' or 'flat'; got {kind!r}"
    raise ValueError(msg)
