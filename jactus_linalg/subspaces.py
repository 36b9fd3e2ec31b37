r"""Orthogonal union of subspaces, rank-revealing.

:func:`union_of_subspaces` returns an orthonormal basis :math:`Q` of
:math:`\operatorname{span}(B_1) + \dots + \operatorname{span}(B_s)`. Inputs are
taken in order; each contributes only the part of its span that is not
already covered, so a direction already in the span adds nothing.

The dimension of the union after input :math:`i` is the numerical rank, at
threshold ``rtol``, of :math:`[\tilde B_1, \dots, \tilde B_i]`, the inputs each
scaled to unit spectral norm (so the union does not depend on how each basis
is scaled, and an ill-conditioned basis, whose weak directions are only known
to :math:`\epsilon\,\sigma_1/\sigma_k`, adds no rounding directions). Input
:math:`i` contributes the orthogonal complement of the running basis
:math:`Q` inside that rank-revealed span. For orthonormal inputs this keeps a
direction when its principal angle to the running span is resolvable at
``rtol``. Projections are done twice (CGS2, "twice is enough"), so :math:`Q`
is orthonormal to working precision.

:func:`union_of_subspaces` with ``nested=True`` is the ordered variant
JACTUS needs: given columns :math:`d_1, d_2, \dots` (all inputs, in order) it
returns :math:`Q` whose leading columns span every prefix
:math:`\{d_1, \dots, d_t\}`, dropping each :math:`d_t` that is already in
the span of its predecessors, and reports which columns were accepted.
"""

from __future__ import annotations

import itertools
import math
from types import ModuleType
from typing import NamedTuple

import numpy as np

from ._backend import (
    Array,
    as_numpy,
    astype,
    decomposition_dtype,
    eps,
    namespace,
    qr_reduced,
    svd_reduced,
)
from ._checks import check_array, check_matrix, check_nonnegative, finite_result

__all__ = [
    "SubspaceUnion",
    "default_rtol",
    "orthonormal_basis",
    "principal_angles",
    "union_of_subspaces",
]


class SubspaceUnion(NamedTuple):
    """Result of :func:`union_of_subspaces`.

    Attributes
    ----------
    basis : (m, d) array
        Orthonormal basis of the union; columns from earlier inputs first.
    contributions : tuple of int
        Number of new directions each input added (they sum to ``d``).
    input_ranks : tuple of int
        Numerical rank of each input on its own.
    principal_angles : tuple of arrays
        For each pair of consecutive inputs ``(B_i, B_{i+1})``, the principal
        angles between their spans in radians, ascending.
    rtol : float
        The rank threshold used (on singular values of orthonormal residuals,
        i.e. on sines of angles).
    accepted : (t,) numpy bool array or None
        ``nested=True`` only: for each input column, in order, whether it
        added a direction (``None`` otherwise).

    In nested mode ``input_ranks`` and ``principal_angles`` are empty (not
    computed: the nested basis needs one QR, not an SVD per input).
    """

    basis: Array
    contributions: tuple[int, ...]
    input_ranks: tuple[int, ...]
    principal_angles: tuple[Array, ...]
    rtol: float
    accepted: np.ndarray | None = None


def default_rtol(xp: ModuleType, dtype: object, *dims: int) -> float:
    """``eps(dtype) · max(dims)``, scipy's default rank cut."""
    return eps(xp, dtype) * max(dims)


def orthonormal_basis(b: Array, rtol: float) -> Array:
    r"""Orthonormal basis of :math:`\operatorname{span}(b)`, rank-revealing.

    Left singular vectors of ``b`` with :math:`\sigma_i > \text{rtol}\,\sigma_1`.
    """
    xp = namespace(b)
    u, s, _ = svd_reduced(xp, b)
    if float(s[0]) == 0.0:
        return u[:, :0]
    keep = int(xp.sum(xp.astype(s > rtol * s[0], xp.int64)))
    return u[:, :keep]


def _project_out(q: Array | None, x: Array) -> Array:
    """:math:`(I - QQ^T)` applied twice (CGS2)."""
    if q is None or int(q.shape[1]) == 0:
        return x
    x = x - q @ (q.T @ x)
    return x - q @ (q.T @ x)


def principal_angles(a: Array, b: Array) -> Array:
    r"""Principal angles (radians, ascending) between spans of orthonormal ``a`` and ``b``.

    Cosines :math:`\sigma_k(A^\top B)` resolve large angles and sines
    :math:`\sigma_k((I - AA^\top) B)` small ones (Knyazev and Argentati,
    2002): ``arccos`` alone loses half the digits near zero.
    """
    xp = namespace(a, b)
    if int(b.shape[1]) > int(a.shape[1]):
        a, b = b, a
    k = int(b.shape[1])
    if k == 0:
        return xp.zeros(0, dtype=a.dtype)
    cross = a.T @ b
    cosines = xp.clip(svd_reduced(xp, cross)[1], 0.0, 1.0)  # descending
    sines = xp.flip(xp.clip(svd_reduced(xp, b - a @ cross)[1], 0.0, 1.0))  # ascending
    from_cos = xp.acos(cosines)
    from_sin = xp.asin(sines)
    return xp.where(from_sin < math.pi / 4, from_sin, from_cos)


@finite_result
def union_of_subspaces(
    *bases: Array, rtol: float | None = None, nested: bool = False
) -> SubspaceUnion:
    r"""Orthonormal basis of the sum of the column spans of ``bases``.

    Parameters
    ----------
    *bases : (m, p_i) array_like
        One or more bases with the same number of rows. They need not be
        orthonormal or of full rank.
    rtol : float, optional
        Rank threshold. An input's own directions are kept when
        :math:`\sigma_k > \text{rtol}\,\sigma_1`; the union after input
        :math:`i` has the numerical rank (singular values above ``rtol``
        times the largest) of the inputs so far, each scaled to unit norm.
        Default :math:`\epsilon \max(m, \sum_i p_i)`. With ``nested=True``
        a column is dropped when its distance to the span of the accepted
        ones is at most ``rtol`` times its norm.
    nested : bool, optional
        Take the columns of all inputs one at a time, in order, so that the
        leading columns of ``basis`` span every prefix of them
        (:math:`\operatorname{span}(Q_{:, :a_s}) = \operatorname{span}(d_1,
        \dots, d_s)`, :math:`a_s` the accepted columns among the first
        :math:`s`), and report which were accepted in ``accepted``. This is
        the union JACTUS needs for every rank at once. Default ``False``.

    Returns
    -------
    SubspaceUnion
        ``basis`` (orthonormal, earlier inputs first), ``contributions``,
        ``input_ranks``, ``principal_angles``, ``rtol`` and, when ``nested``,
        ``accepted``.

    Raises
    ------
    TypeError
        If a basis is not a real floating array.
    ValueError
        If no basis is given, a basis is not 2-D, holds NaN/Inf, or the row
        counts differ; if ``rtol`` is negative.

    Notes
    -----
    With two passes of projection, :math:`\lVert Q^\top Q - I \rVert \le
    c\, d\, \epsilon` and every input satisfies
    :math:`\lVert (I - QQ^\top) B_i \rVert \le \text{rtol}\,\lVert B_i \rVert`
    up to rounding (containment; rounding here is relative to the accuracy
    :math:`\epsilon\,\kappa(B_j)` to which earlier inputs determine their
    spans). The dimension of the union is :math:`\dim(\sum_i
    \operatorname{span} B_i)` counted with threshold ``rtol``, as the
    numerical rank of the concatenated, unit-norm inputs.

    Nested mode, fast path: one Householder QR of the concatenated columns,
    whose :math:`|R_{ss}|` is exactly the distance of :math:`d_s` to the span
    of its predecessors. Only if some :math:`|R_{ss}| \le
    \text{rtol}\,\lVert d_s\rVert` (or there are more columns than rows)
    does it switch to a blocked CGS2 that drops dependent columns one by one.

    References
    ----------
    .. [1] L. Giraud, J. Langou, M. Rozložník, "The loss of orthogonality in
       the Gram-Schmidt orthogonalization process", Comput. Math. Appl., 2005.
    .. [2] G. H. Golub, C. F. Van Loan, *Matrix Computations*, 4th ed.,
       §6.4.3 (principal angles).
    """
    if not bases:
        msg = "`bases` must hold at least one array; got none"
        raise ValueError(msg)
    for i, b in enumerate(bases):
        check_array(b, f"bases[{i}]")
    xp = namespace(bases[0])  # check_matrix names any later basis of another library
    check_matrix(xp, bases[0], "bases[0]")
    m = int(bases[0].shape[0])
    for i, b in enumerate(bases[1:], start=1):
        check_matrix(xp, b, f"bases[{i}]", rows=m)
    work = decomposition_dtype(xp, *(b.dtype for b in bases))
    total_cols = sum(int(b.shape[1]) for b in bases)
    tol = (
        default_rtol(xp, work, m, total_cols)
        if rtol is None
        else check_nonnegative(rtol, "rtol")
    )
    if nested:
        return _nested_union(xp, [astype(xp, b, work) for b in bases], tol)
    q: Array | None = None
    scaled: list[Array] = []  # the inputs so far, each scaled to unit norm
    contributions: list[int] = []
    ranks: list[int] = []
    angles: list[Array] = []
    previous: Array | None = None
    for b in bases:
        b = astype(xp, b, work)
        u, s, _ = svd_reduced(xp, b)
        top = float(s[0])
        keep = 0 if top == 0.0 else int(xp.sum(xp.astype(s > tol * s[0], xp.int64)))
        own = u[:, :keep]
        ranks.append(keep)
        if previous is not None:
            angles.append(principal_angles(previous, own))
        previous = own
        if keep:
            scaled.append(b / top)
        new = _new_directions(q, scaled, tol, own)
        contributions.append(int(new.shape[1]))
        q = new if q is None else xp.concat([q, new], axis=1)
    assert q is not None
    return SubspaceUnion(q, tuple(contributions), tuple(ranks), tuple(angles), tol)


def _new_directions(q: Array | None, scaled: list[Array], tol: float, own: Array) -> Array:
    """Orthonormal complement of ``span(q)`` in the rank-revealed span of ``scaled``.

    ``scaled`` holds the inputs so far at unit norm; their concatenation has
    numerical rank ``d`` at ``tol``, and ``d - dim(q)`` directions are new.
    """
    done = 0 if q is None else int(q.shape[1])
    if not scaled or int(own.shape[1]) == 0:
        return own[:, :0]
    xp = namespace(own)
    z, s, _ = svd_reduced(xp, xp.concat(scaled, axis=1))
    rank = int(xp.sum(xp.astype(s > tol * s[0], xp.int64)))
    extra = rank - done
    if extra <= 0:
        return own[:, :0]
    if q is None:
        return z[:, :rank]
    # span(z) holds span(q) to rounding: the complement has sines ~1, the
    # rest ~rounding, so the top ``extra`` directions are well separated
    u, _, _ = svd_reduced(xp, _project_out(q, z[:, :rank]))
    new = u[:, :extra]
    # a small residual's singular vectors lose orthogonality to q by eps/s:
    # project once more and re-orthonormalise
    return qr_reduced(xp, _project_out(q, new))[0]


def _nested_union(xp: ModuleType, bases: list[Array], tol: float) -> SubspaceUnion:
    """Nested mode of :func:`union_of_subspaces` (see its Notes)."""
    columns = bases[0] if len(bases) == 1 else xp.concat(bases, axis=1)
    m, t = (int(d) for d in columns.shape)
    norms = as_numpy(xp.linalg.vector_norm(columns, axis=0))
    q = None
    accepted = np.ones(t, dtype=bool)
    if t <= m:
        q, r = qr_reduced(xp, columns)
        diag = np.abs(as_numpy(xp.linalg.diagonal(r)))
        if not bool(np.all(diag > tol * norms)):
            q = None
    if q is None:
        q, accepted = _blocked_rank_revealing_cgs2(columns, norms, tol)
    bounds = np.cumsum([0] + [int(b.shape[1]) for b in bases])
    contributions = tuple(
        int(accepted[lo:hi].sum()) for lo, hi in itertools.pairwise(bounds)
    )
    return SubspaceUnion(q, contributions, (), (), tol, accepted)


def _blocked_rank_revealing_cgs2(
    columns: Array, norms: np.ndarray, tol: float, block: int = 32
) -> tuple[Array, np.ndarray]:
    xp = namespace(columns)
    t = int(columns.shape[1])
    q: Array | None = None
    accepted = np.zeros(t, dtype=bool)
    for start in range(0, t, block):
        stop = min(start + block, t)
        panel = _project_out(q, columns[:, start:stop])
        kept: list[Array] = []
        for i in range(stop - start):
            col = panel[:, i : i + 1]
            for _ in range(2):
                for k in kept:
                    col = col - k @ (k.T @ col)
            if q is not None:
                col = _project_out(q, col)
            size = float(xp.linalg.vector_norm(col))
            if size > tol * float(norms[start + i]) and size > 0.0:
                kept.append(_reorthonormalize(q, kept, col / size))
                accepted[start + i] = True
        if kept:
            new = xp.concat(kept, axis=1)
            q = new if q is None else xp.concat([q, new], axis=1)
    if q is None:
        q = columns[:, :0]
    return q, accepted


def _reorthonormalize(q: Array | None, kept: list[Array], col: Array) -> Array:
    """One more projection after normalising a small residual, then renormalise.

    Normalising a residual of size ``s`` magnifies its rounding error by
    ``1/s``; a third pass restores orthogonality to working precision.
    """
    xp = namespace(col)
    for k in kept:
        col = col - k @ (k.T @ col)
    if q is not None:
        col = col - q @ (q.T @ col)
    return col / xp.linalg.vector_norm(col)
