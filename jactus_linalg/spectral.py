r"""Top eigenvectors of a covariance from its whitening factor (the JACTUS task directions).

JACTUS unites the weight subspace with the principal subspaces of the two
covariances: :math:`E_g`, the top-:math:`j` eigenvectors of :math:`C_g`, and
:math:`E_x`, those of :math:`C_x`. They are read off the whitening factor
:math:`S` (:math:`S S^\top = C + \delta I`), which shares them with :math:`C`
(the damping shifts every eigenvalue by :math:`\delta`):

* ``eigh`` factor: the eigenvectors are already there (no extra work);
* Cholesky factor :math:`L`: the eigenvectors of :math:`C + \delta I = L L^\top`
  are the left singular vectors of :math:`L`. For small :math:`j` a
  randomized subspace iteration on :math:`L` (:func:`~jactus_linalg.randomized.randomized_svd`,
  :math:`O(n^2 (j + p)(2q + 1))`) finds them without a full
  eigendecomposition; otherwise the top-:math:`j` eigenpairs of
  :math:`L L^\top` (LAPACK ``syevr`` on that index range for numpy when
  :math:`j \le n/2`, a full eigendecomposition otherwise).

Results are kept on the operator (``op.eigen_cache``): layers that share one
input share its operator, so :math:`C_x` is decomposed once per input group
(q/k/v, gate/up) and a later, smaller :math:`j` is a slice of the exact
pairs already computed.

Accuracy is reported like the randomized SVD's: ``missed_eigenvalue_bound``
bounds, with probability at least :math:`1 - 10^{-6}`, the largest
eigenvalue of :math:`C + \delta I` whose direction the captured range misses,
:math:`\lVert (I - QQ^\top) L \rVert_2^2` (0 for the exact paths).
Compare it with :math:`\lambda_j + \delta`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._backend import (
    Array,
    as_numpy,
    device_of,
    eigh_top,
    eps,
    namespace,
    triangular_times,
)
from ._checks import check_rank
from .lowrank import numerical_rank
from .randomized import OVERSAMPLE, range_finder_svd, use_range_finder
from .whitening import WhiteningOperator

__all__ = ["TopEigenvectors", "top_eigenvectors"]

#: Subspace iterations on L: each one multiplies by L L^T = C + delta I.
POWER_ITERS = 3


class TopEigenvectors(NamedTuple):
    r"""Result of :func:`top_eigenvectors`.

    Attributes
    ----------
    vectors : (n, j') array
        Orthonormal eigenvectors of :math:`C`, eigenvalues descending
        (:math:`j' \le j` when the factor holds fewer directions).
    values : (j',) numpy array
        The eigenvalues of :math:`C` itself (damping removed), float64.
    rank : int
        How many of them are numerically nonzero
        (:math:`\lambda_i > n \epsilon \lambda_1`): the directions the data
        resolve. Directions beyond it carry no signal and are not used.
    method : str
        ``"eigh-factor"``, ``"exact"`` or ``"randomized"``.
    missed_eigenvalue_bound : float
        Probabilistic bound on the largest eigenvalue of :math:`C + \delta I`
        outside the captured range (0 on the exact paths).
    """

    vectors: Array
    values: np.ndarray
    rank: int
    method: str
    missed_eigenvalue_bound: float


def top_eigenvectors(op: WhiteningOperator, j: int, *, method: str = "auto") -> TopEigenvectors:
    r"""Top-``j`` eigenvectors of the covariance behind a whitening factor.

    Parameters
    ----------
    op : WhiteningOperator
        From :func:`jactus_linalg.whitening.whitening_operator` (any method,
        from an array or a :class:`~jactus_linalg.CovarianceRoot`).
    j : int
        Number of directions, ``1 <= j <= n``.
    method : {"auto", "exact", "randomized"}, optional
        For a Cholesky factor: ``"auto"`` is randomized when
        :math:`j + 10 \le 0.1 n`, exact otherwise. An ``eigh`` factor always
        reuses its own eigenvectors.

    Returns
    -------
    TopEigenvectors

    Raises
    ------
    ValueError
        ``j`` outside ``[1, n]`` or an unknown ``method``.

    Notes
    -----
    The eigenvalues of :math:`C` are :math:`\sigma_i(L)^2 - \delta`; the rank
    cut is on them, relative to the largest, at :math:`n\epsilon`.
    """
    use_range_finder(method, 1, (2, 2), "method")  # refuses an unknown method up front
    n = op.dim
    j = check_rank(j, n, "j")
    if op.method == "eigh":
        return _from_eigh_factor(op, j)
    lower = op.lower
    assert lower is not None  # a Cholesky operator always holds its factor
    xp = namespace(lower)
    cache = op.eigen_cache
    if use_range_finder(method, j, (n, n), "method"):
        key = ("randomized", j)
        if key not in cache:
            res = range_finder_svd(lower, j, oversample=OVERSAMPLE, power_iters=POWER_ITERS)
            damped = as_numpy(res.values).astype(np.float64) ** 2
            cache[key] = _result(
                res.left, damped, op, "randomized", res.residual_spectral_bound**2
            )
        return cache[key]
    held = cache.get("exact")
    if held is None or int(held[0].shape[1]) < j:
        source = op.covariance
        if source is not None:  # C itself: its eigenvalues + delta are those of C + delta I
            lam, vecs = eigh_top(xp, source, j)  # ascending, at least the top j
            lam = lam + op.damping
        else:  # L L^T = C + delta I (trmm: half a gemm)
            lam, vecs = eigh_top(xp, triangular_times(xp, lower, lower.T, lower=True), j)
        # keep the top j only (a full eigh holds n^2 numbers; the plan keeps the operator)
        held = (xp.flip(vecs[:, -j:], axis=1), as_numpy(xp.flip(lam[-j:])).astype(np.float64))
        cache["exact"] = held  # descending; every later j up to this many is a slice
    vectors, damped = held
    return _result(vectors[:, :j], damped[:j], op, "exact", 0.0)


def _from_eigh_factor(op: WhiteningOperator, j: int) -> TopEigenvectors:
    """Reuse the eigenvectors of a symmetric-root factor, largest roots first."""
    z, roots = op.vectors, op.roots
    assert z is not None and roots is not None  # an eigh operator always holds both
    xp = namespace(z)
    r = as_numpy(roots).astype(np.float64)
    order = np.argsort(-r, kind="stable")[: min(j, r.size)]
    index = xp.asarray(order, device=device_of(z))
    return _result(xp.take(z, index, axis=1), r[order] ** 2, op, "eigh-factor", 0.0)


def _result(
    vectors: Array, damped: np.ndarray, op: WhiteningOperator, method: str, missed: float
) -> TopEigenvectors:
    values = np.maximum(damped - op.damping, 0.0)
    rcond = op.dim * eps(namespace(vectors), vectors.dtype)
    rank = numerical_rank(values, rcond)
    return TopEigenvectors(vectors, values, rank, method, float(missed))
