r"""Randomized range finder for the top singular subspaces (Halko, Martinsson and Tropp, 2011).

JACTUS needs only the top :math:`k + j` singular directions of the whitened
weight :math:`M` and the top :math:`j` of the whitened gradient
:math:`\Gamma`. For :math:`\ell = k + p` columns (oversampling :math:`p`) and
:math:`q` power iterations:

.. math::

    Y = (A A^\top)^q A \Omega, \quad Q = \operatorname{orth}(Y), \quad
    B = Q^\top A = \tilde U \Sigma V^\top, \quad U = Q \tilde U .

Two a-posteriori checks come with it:

* the Frobenius residual of the captured range is exact, by Pythagoras:
  :math:`\lVert A - Q Q^\top A \rVert_F^2 = \lVert A \rVert_F^2 - \lVert B \rVert_F^2`;
* a probabilistic spectral bound from ``n_probes`` fresh Gaussian vectors
  :math:`\omega_i` (HMT §4.3): with probability at least
  :math:`1 - 10^{-\text{n\_probes}}`,
  :math:`\lVert A - QQ^\top A\rVert_2 \le 10\sqrt{2/\pi}\,\max_i
  \lVert (I - QQ^\top) A \omega_i \rVert`.

The expected error satisfies (HMT Cor. 10.10)

.. math::

    \mathbb E \lVert A - QQ^\top A \rVert_2 \le
    \Bigl[1 + 4\sqrt{\tfrac{k+p}{p-1}}\sqrt{\min(m,n)}\Bigr]^{1/(2q+1)} \sigma_{k+1},

which :func:`expected_error_factor` evaluates; the tests check the realised
error against it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._backend import Array, astype, device_of, namespace, qr_reduced, svd_reduced
from ._checks import check_matrix, check_rank, finite_result

__all__ = ["RandomizedSVD", "expected_error_factor", "randomized_svd"]


class RandomizedSVD(NamedTuple):
    """Result of :func:`randomized_svd`.

    Attributes
    ----------
    left : (m, k) array
    values : (k,) array, descending
    right : (n, k) array
        :math:`A \\approx` ``left @ diag(values) @ right.T``.
    residual_frobenius : float
        Exact :math:`\\lVert A - QQ^\\top A\\rVert_F` of the sampled range.
    residual_spectral_bound : float
        Probabilistic bound on :math:`\\lVert A - QQ^\\top A\\rVert_2`.
    """

    left: Array
    values: Array
    right: Array
    residual_frobenius: float
    residual_spectral_bound: float


def expected_error_factor(k: int, oversample: int, power_iters: int, m: int, n: int) -> float:
    r"""HMT's factor :math:`[1 + 4\sqrt{(k+p)/(p-1)}\sqrt{\min(m,n)}]^{1/(2q+1)}`."""
    p = max(oversample, 2)
    base = 1 + 4 * math.sqrt((k + p) / (p - 1)) * math.sqrt(min(m, n))
    return base ** (1 / (2 * power_iters + 1))


def _gaussian(xp, shape: tuple[int, int], dtype, like: Array, seed: int) -> Array:
    """Seeded Gaussian test matrix, made on the host (the array API has no RNG)."""
    draw = np.random.default_rng(seed).standard_normal(shape)
    return astype(xp, xp.asarray(draw, device=device_of(like)), dtype)


@finite_result
def randomized_svd(
    a: Array,
    k: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    n_probes: int = 6,
    seed: int = 0,
) -> RandomizedSVD:
    r"""Top-``k`` singular triplets of ``a`` by a randomized range finder.

    Parameters
    ----------
    a : (m, n) array
    k : int
        Number of triplets, ``1 <= k <= min(m, n)``.
    oversample : int, optional
        Extra sampled columns :math:`p` (default 10).
    power_iters : int, optional
        Subspace iterations :math:`q`, re-orthonormalised each time (default 2).
    n_probes : int, optional
        Gaussian probes for the spectral error bound (default 6).
    seed : int, optional
        Seed of the test matrices (results are deterministic).

    Returns
    -------
    RandomizedSVD

    Raises
    ------
    TypeError, ValueError
        On a non-floating or non-finite ``a``, or ``k`` outside ``[1, min(m, n)]``.

    Notes
    -----
    Cost :math:`O(mn\ell(2q+1))` with :math:`\ell = k + p`, against
    :math:`O(mn\min(m,n))` for a full SVD. When :math:`\ell \ge \min(m, n)`
    the exact SVD is used (the range is then captured exactly).
    """
    xp = namespace(a)
    check_matrix(xp, a, "a")
    return range_finder_svd(a, k, oversample=oversample, power_iters=power_iters,
                            n_probes=n_probes, seed=seed)


#: ``"auto"`` goes randomized when (needed + oversampling) <= this x the smaller dimension.
RANDOMIZED_FRACTION = 0.1
OVERSAMPLE = 10


def use_range_finder(method: str, k: int, shape: tuple, name: str = "svd") -> bool:
    """Whether the top ``k`` directions of a ``shape`` matrix come from the randomized finder.

    ``method="randomized"``, or ``"auto"`` with ``k`` plus :data:`OVERSAMPLE`
    at most :data:`RANDOMIZED_FRACTION` of the smaller dimension; never when
    ``k`` reaches that dimension (the exact decomposition is then as cheap).
    ``name``: the argument named when ``method`` is not one of
    ``"auto"``, ``"exact"``, ``"randomized"``.
    """
    if method not in ("auto", "exact", "randomized"):
        msg = f"`{name}` must be 'auto', 'exact' or 'randomized'; got {method!r}"
        raise ValueError(msg)
    small = min(int(d) for d in shape)
    wanted = method == "randomized" or (
        method == "auto" and k + OVERSAMPLE <= RANDOMIZED_FRACTION * small
    )
    return wanted and k < small


def range_finder_svd(
    a: Array, k: int, *, oversample: int = 10, power_iters: int = 2, n_probes: int = 6,
    seed: int = 0,
) -> RandomizedSVD:
    """:func:`randomized_svd` without the pass that checks ``a`` is finite.

    For the package's own calls on matrices it formed from checked inputs
    (a Cholesky factor, a whitened weight checked for overflow): at a
    3072x3072 factor that pass costs as much as a product with it.
    """
    xp = namespace(a)
    m, n = (int(d) for d in a.shape)
    k = check_rank(k, min(m, n), "k")
    ell = min(k + max(oversample, 0), min(m, n))
    if ell >= min(m, n):
        u, s, vh = svd_reduced(xp, a)
        return RandomizedSVD(u[:, :k], s[:k], vh[:k, :].T, 0.0, 0.0)
    omega = _gaussian(xp, (n, ell), a.dtype, a, seed)
    q, _ = qr_reduced(xp, a @ omega)
    for _ in range(power_iters):
        z, _ = qr_reduced(xp, a.T @ q)
        q, _ = qr_reduced(xp, a @ z)
    b = q.T @ a
    ub, s, vh = svd_reduced(xp, b)
    total = float(xp.sum(a * a))
    captured = float(xp.sum(b * b))
    probes = _gaussian(xp, (n, max(n_probes, 1)), a.dtype, a, seed + 1)
    ap = a @ probes
    resid = ap - q @ (q.T @ ap)
    worst = float(xp.max(xp.linalg.vector_norm(resid, axis=0)))
    return RandomizedSVD(
        left=q @ ub[:, :k],
        values=s[:k],
        right=vh[:k, :].T,
        residual_frobenius=math.sqrt(max(total - captured, 0.0)),
        residual_spectral_bound=10 * math.sqrt(2 / math.pi) * worst,
    )
