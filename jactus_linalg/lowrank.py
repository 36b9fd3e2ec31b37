r"""Projected low-rank approximation in the curvature (whitened) norm.

For a layer weight :math:`W` (``m x n``) with whitening factors
:math:`S_x S_x^\top = C_x + \delta_x I` and :math:`S_g S_g^\top = C_g + \delta_g I`,
the K-FAC curvature norm of a change is :math:`\lVert S_g^\top \Delta W S_x
\rVert_F`. In whitened coordinates :math:`M = S_g^\top W S_x` it is the
Frobenius norm, so for orthonormal :math:`U` (``m x a``) and :math:`V`
(``n x b``) the best core is the orthogonal projection

.. math::

    C = U^\top M V, \qquad
    \lVert M - U C V^\top \rVert_F^2 = \lVert M \rVert_F^2 - \lVert C \rVert_F^2 ,

and the deployable factors are :math:`A = S_g^{-\top} U`, :math:`B = S_x^{-\top} V`
with :math:`W \approx A C B^\top`. Truncated SVD, SVD-LLM-style input
whitening, two-sided K-FAC whitening and JACTUS are the special cases of
:func:`projected_lowrank` with no covariance, ``input_cov`` only, both, and
both plus union bases.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._backend import (
    Array,
    as_numpy,
    astype,
    decomposition_dtype,
    diag_matrix,
    eigh,
    eps,
    namespace,
    qr_reduced,
    svd_reduced,
)
from ._checks import (
    check_array,
    check_matrix,
    check_no_overflow,
    check_rank,
    check_same_library,
    finite_result,
)
from .covariance import CovarianceRoot
from .subspaces import default_rtol, orthonormal_basis
from .whitening import (
    DEFAULT_DAMPING,
    WhiteningOperator,
    factor_transpose_times,
    inverse_transpose_times,
    svd_dtype,
    whitened_weight,
    whitening_operator,
)

__all__ = [
    "DeferredRank",
    "Factors",
    "LowRankResult",
    "ProjectedCore",
    "WhiteningInfo",
    "curvature_error",
    "deployable_factors",
    "eckart_young_tail",
    "numerical_rank",
    "orthonormal_factors",
    "project_to_core",
    "projected_lowrank",
    "pythagoras_error",
    "whitening_operators",
    "working_dtype",
]


class DeferredRank:
    r"""The effective rank of a whitening operator, computed on first use.

    For a Cholesky factor :math:`\operatorname{tr}\, C (C + \delta I)^{-1}`
    costs a triangular inversion, as much as the factorization itself (1.1 s
    at n = 3072 on 2 cores), so a :class:`WhiteningInfo` holds this
    placeholder and reads the value only when ``info.effective_rank`` is
    asked for. A deep copy (``dataclasses.asdict`` of a compression report)
    resolves it to a float.
    """

    __slots__ = ("_op",)

    def __init__(self, op: WhiteningOperator) -> None:
        self._op = op

    @property
    def resolved(self) -> bool:
        """True once the operator has computed (and kept) its effective rank."""
        return self._op.method != "cholesky" or self._op.rank_cache[0] is not None

    def value(self) -> float:
        return float(self._op.effective_rank)

    def __float__(self) -> float:
        return self.value()

    def __deepcopy__(self, memo: dict) -> float:
        return self.value()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeferredRank):
            return self.value() == other.value()
        return self.value() == other

    def __hash__(self) -> int:
        return hash(self.value())

    def __repr__(self) -> str:
        return repr(self.value()) if self.resolved else "<computed on access>"


class _WhiteningFields(NamedTuple):
    method: str
    damping: float
    relative_damping: float
    numerical_rank: int | None
    notes: tuple[str, ...]
    effective_rank: float | DeferredRank | None = None


class WhiteningInfo(_WhiteningFields):
    r"""What whitening did to one side of a layer (reported, never silent).

    Attributes
    ----------
    method : str
        ``"eigh"`` or ``"cholesky"`` (the method actually used).
    damping : float
        The absolute :math:`\delta` added to the diagonal.
    relative_damping : float
        :math:`\delta / \operatorname{mean}(\operatorname{diag} C)`.
    numerical_rank : int or None
        Eigenvalues above :math:`n \epsilon \lambda_\max` (``eigh`` only).
    notes : tuple of str
        Rank deficiency, clipped rounding negatives, a Cholesky fallback.
    effective_rank : float or None
        :math:`\operatorname{tr}\, C (C + \delta I)^{-1}`, the number of
        directions the data resolve above the damping (both methods).
        Computed when first read (a triangular inversion for a Cholesky
        factor), never while the info is built.
    """

    __slots__ = ()

    @property  # type: ignore[misc]  # the field, resolved on access
    def effective_rank(self) -> float | None:
        value = self[5]
        return value.value() if isinstance(value, DeferredRank) else value

    def _asdict(self) -> dict[str, Any]:
        """The fields as a dict, the effective rank resolved to a float."""
        out = dict(zip(self._fields, self, strict=True))
        out["effective_rank"] = self.effective_rank
        return out


class LowRankResult(NamedTuple):
    r"""Result of :func:`projected_lowrank`.

    Attributes
    ----------
    left : (m, a) array
        :math:`A = S_g^{-\top} U`.
    core : (a, b) array
        :math:`C = U^\top M V` (diagonal when the subspaces come from an SVD).
    right : (n, b) array
        :math:`B = S_x^{-\top} V`, so ``left @ core @ right.T`` approximates
        ``weight``.
    error : float
        Curvature-norm error :math:`\lVert M - U C V^\top \rVert_F`, from
        :math:`\sqrt{\lVert M\rVert^2 - \lVert C\rVert^2}`.
    eckart_young : float or None
        :math:`\sqrt{\sum_{i > \min(a,b)} \sigma_i(M)^2}`, the smallest error
        any approximation of that rank can reach (``None`` if ``bounds=False``).
    total_energy : float
        :math:`\lVert M \rVert_F^2`.
    preserved_energy : float
        :math:`\lVert C \rVert_F^2`.
    n_params : int
        :math:`am + bn + ab`, numbers stored by the factors.
    singular_values : (min(m, n),) numpy array or None
        :math:`\sigma(M)`, when computed.
    input_whitening, grad_whitening : WhiteningInfo or None
        Damping and notes per side (``None`` when that covariance was not given).
    """

    left: Array
    core: Array
    right: Array
    error: float
    eckart_young: float | None
    total_energy: float
    preserved_energy: float
    n_params: int
    singular_values: np.ndarray | None
    input_whitening: WhiteningInfo | None
    grad_whitening: WhiteningInfo | None


def info_of(op: WhiteningOperator | None) -> WhiteningInfo | None:
    if op is None:
        return None
    return WhiteningInfo(
        op.method, op.damping, op.relative_damping, op.numerical_rank, op.notes,
        DeferredRank(op),
    )


def eckart_young_tail(singular_values: np.ndarray, rank: int) -> float:
    r""":math:`\sqrt{\sum_{i > r} \sigma_i^2}` for descending ``singular_values``."""
    s = np.asarray(singular_values, dtype=np.float64)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def covariance_dim(cov: Any) -> int:
    """Size ``n`` of an ``(n, n)`` covariance or a :class:`CovarianceRoot`."""
    if isinstance(cov, CovarianceRoot):
        return int(cov.root.shape[1])
    return int(cov.shape[-1])


def whitening_operators(
    weight_shape: tuple[int, int],
    input_cov: Any,
    grad_cov: Any,
    damping: float | tuple[float, float],
    method: str,
    dtype: Any,
) -> tuple[WhiteningOperator | None, WhiteningOperator | None]:
    """Factor both covariances after checking their sizes against the weight."""
    m, n = weight_shape
    damp_x, damp_g = split_damping(damping)
    ops: list[WhiteningOperator | None] = []
    for cov, dim, name, damp in (
        (input_cov, n, "input_cov", damp_x),
        (grad_cov, m, "grad_cov", damp_g),
    ):
        if cov is None:
            ops.append(None)
            continue
        if isinstance(cov, WhiteningOperator):  # factored once, shared by layers
            if cov.dim != dim:
                msg = f"`{name}` must whiten {dim} features; got a factor of size {cov.dim}"
                raise ValueError(msg)
            ops.append(cov)
            continue
        if not isinstance(cov, CovarianceRoot) and len(getattr(cov, "shape", ())) != 2:
            msg = f"`{name}` must be a 2-D array or CovarianceRoot; got {type(cov).__name__}"
            raise ValueError(msg)
        if covariance_dim(cov) != dim:
            side = "columns (inputs)" if name == "input_cov" else "rows (outputs)"
            msg = (
                f"`{name}` must be {dim}x{dim} to match the weight's {dim} {side}; "
                f"got size {covariance_dim(cov)}"
            )
            raise ValueError(msg)
        ops.append(whitening_operator(cov, damping=damp, method=method, name=name, dtype=dtype))
    return ops[0], ops[1]


def split_damping(damping: float | tuple[float, float]) -> tuple[float, float]:
    """``damping`` as ``(input side, gradient side)``; a scalar applies to both."""
    if isinstance(damping, tuple | list):
        if len(damping) != 2:
            msg = f"`damping` must be a number or a pair (input, grad); got {damping!r}"
            raise ValueError(msg)
        return damping[0], damping[1]
    return damping, damping


def working_dtype(xp: ModuleType, *arrays: Any) -> Any:
    """Decomposition dtype (at least float32) of arrays, roots or whitening operators."""
    dtypes = []
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, WhiteningOperator):
            a = a.spectrum
        elif isinstance(a, CovarianceRoot):
            a = a.root
        dtypes.append(a.dtype)
    return decomposition_dtype(xp, *dtypes)


def _whiten_basis(
    xp: ModuleType, basis: Array, op: WhiteningOperator | None, name: str, dim: int
) -> Array:
    r"""Orthonormal basis of :math:`\operatorname{span}(S^\top \text{basis})`."""
    check_matrix(xp, basis, name, rows=dim)
    whitened = factor_transpose_times(op, basis)
    rtol = default_rtol(xp, whitened.dtype, *whitened.shape)
    onb = orthonormal_basis(whitened, rtol)
    if int(onb.shape[1]) == 0:
        msg = f"`{name}` spans nothing (all columns are zero to rounding)"
        raise ValueError(msg)
    return onb


class ProjectedCore(NamedTuple):
    r"""Orthonormal bases and the core between them (see :func:`project_to_core`).

    ``left @ core @ right.T`` is the approximation of the whitened weight;
    ``singular_values`` holds :math:`\sigma(M)` (float64 numpy) when the
    kernel decomposed :math:`M` itself (no bases given), else ``None``.
    """

    left: Array
    core: Array
    right: Array
    singular_values: np.ndarray | None = None


def project_to_core(
    whitened: Array,
    left: Array | None,
    right: Array | None,
    rank: int | None = None,
    *,
    svd_dtype: Any = None,
) -> ProjectedCore:
    r"""The best core of ``whitened`` between two orthonormal bases, truncated inside them.

    This is the one kernel that forms a core from bases: :func:`projected_lowrank`
    and the JACTUS layer plan (:func:`jactus_linalg.plan_layer`) both call it.

    Parameters
    ----------
    whitened : (m, n) array
        :math:`M = S_g^\top W S_x`.
    left : (m, a) array or None
        Orthonormal :math:`U` (whitened coordinates). ``None``: the optimal
        left side for ``right``.
    right : (n, b) array or None
        Orthonormal :math:`V`. ``None``: the optimal right side for ``left``.
    rank : int, optional
        Keep at most this rank. Without it, the full projected core (with no
        basis at all: the numerical rank of :math:`M`, at least 1, at
        ``rcond = eps · max(m, n)``, with the epsilon of the dtype the SVD
        ran in).
    svd_dtype : dtype, optional
        Decompose at this (lower) precision (e.g. float32 for a float64
        ``whitened`` made from a float32 weight, see
        :func:`jactus_linalg.whitening.svd_dtype`). With no basis and a
        ``svd_dtype`` whose epsilon is above :math:`\sqrt{\epsilon}` of
        ``whitened``'s dtype (float32 against float64), the top subspaces come
        from the eigendecomposition of the Gram matrix of :math:`M` on its
        smaller side, in ``whitened``'s dtype (:func:`gram_truncation`: about
        faster than a float32 SVD at the ViT shapes, and more accurate).
        Otherwise every SVD of the kernel runs in this dtype and the factors
        come back in ``whitened``'s dtype, re-orthonormalized there (a QR),
        with the core formed there too. Either way the bases are orthonormal
        and Pythagoras holds to ``whitened``'s rounding. ``None``:
        ``whitened``'s own dtype.

    Returns
    -------
    ProjectedCore
        With both bases: :math:`C = U^\top M V`, and, when ``rank`` is below
        :math:`\min(a, b)`, its best rank-``rank`` truncation inside
        :math:`\operatorname{span}(U) \times \operatorname{span}(V)`
        (:math:`C = Y \Sigma Z^\top`, kept as :math:`U Y_r`,
        :math:`\Sigma_r`, :math:`V Z_r`). With one basis, the SVD of
        :math:`U^\top M` (or :math:`M V`) gives the best other side. With
        none, the top singular subspaces of :math:`M`.

    Notes
    -----
    For orthonormal :math:`U, V`, :math:`\lVert M - U C V^\top \rVert_F^2 =
    \lVert M \rVert_F^2 - \lVert C \rVert_F^2` (Pythagoras), and the truncated
    SVD of :math:`C` minimises it over cores of rank ``rank`` in the
    subspaces (Eckart-Young inside the union).
    """
    if left is None and right is None and svd_dtype is not None:
        xp = namespace(whitened)
        if gram_resolves(xp, whitened.dtype, svd_dtype):
            return gram_truncation(whitened, rank, svd_dtype)
    projected = _project_to_core(whitened, left, right, rank, svd_dtype)
    if svd_dtype is None or (left is not None and right is not None and rank is None):
        return projected
    # bases from a lower-precision SVD are orthonormal to its epsilon only:
    # re-orthonormalize them in the working dtype and form the core there, so
    # that Pythagoras (err² = ‖M‖² - ‖C‖²) holds to the working dtype's rounding
    u, v = orthonormal_columns(projected.left), orthonormal_columns(projected.right)
    return ProjectedCore(u, u.T @ whitened @ v, v, projected.singular_values)


def gram_resolves(xp: ModuleType, work_dtype: Any, target_dtype: Any) -> bool:
    r"""True when a Gram matrix in ``work_dtype`` resolves what an SVD in ``target_dtype`` would.

    Squaring :math:`M` squares its condition: the Gram's eigenvalues carry
    an absolute error of order :math:`\epsilon_w \lVert M\rVert_F^2`, so
    singular values are resolved down to about
    :math:`\sqrt{\epsilon_w}\,\lVert M\rVert_F`, against
    :math:`\epsilon_t \lVert M \rVert_2` for an SVD in ``target_dtype``.
    Float64 Gram for a float32 decomposition: :math:`\sqrt{\epsilon_{64}} =
    1.5 \cdot 10^{-8} < \epsilon_{32} = 1.2 \cdot 10^{-7}`.
    """
    return math.sqrt(eps(xp, work_dtype)) < eps(xp, target_dtype)


def gram_truncation(whitened: Array, rank: int | None, svd_dtype: Any) -> ProjectedCore:
    r"""Top-``rank`` subspaces of :math:`M` from the eigendecomposition of its Gram matrix.

    For :math:`M` (``m x n``, ``m >= n``): :math:`M^\top M = V \Lambda V^\top`
    in ``whitened``'s dtype, :math:`\sigma_i = \sqrt{\max(\lambda_i, 0)}`,
    :math:`V_r` the top ``rank`` eigenvectors; then a Householder QR
    :math:`M V_r = Q R` gives the orthonormal left basis :math:`U = Q` and the
    core :math:`C = U^\top M V_r = R` (upper triangular), so

    .. math::

        U C V_r^\top = M V_r V_r^\top , \qquad
        \lVert M - U C V_r^\top \rVert_F^2 = \lVert M \rVert_F^2 - \lVert C \rVert_F^2 ,

    the best approximation with right space :math:`\operatorname{span}(V_r)`,
    with both bases orthonormal and Pythagoras to ``whitened``'s rounding (no
    re-orthonormalization needed). A wide :math:`M` uses :math:`M M^\top`
    and the transposed construction (:math:`C = R^\top`, lower triangular).

    Used by :func:`project_to_core` for a no-basis call whose ``svd_dtype``
    :func:`gram_resolves`: the precision asked for (float32's) is reached,
    and exceeded, by the float64 Gram. Accuracy: the eigenvalues carry an
    absolute error :math:`c\,(m + n)\,\epsilon\,\lVert M\rVert_F^2`
    (formation and ``syevd``), so :math:`\sigma_i` is resolved to
    :math:`\sqrt{(m+n)\epsilon}\,\lVert M\rVert_F`; the subspace angle is
    :math:`\epsilon \sigma_1^2 / (\sigma_r^2 - \sigma_{r+1}^2)` against
    :math:`\epsilon_{32} \sigma_1 / (\sigma_r - \sigma_{r+1})` for a float32
    SVD, smaller whenever :math:`\sigma_r > 10^{-8}\sigma_1`. Cost: a Gram
    product (:math:`2 m n k` flops), a ``k x k`` symmetric eigendecomposition
    (``k = min(m, n)``) and a QR of ``max(m, n) x rank``, against a
    float32 SVD of ``m x n`` (timed against SVD-LLM's per-layer code on the
    Benchmarks page, ``peers``).

    Parameters
    ----------
    whitened : (m, n) array
        :math:`M`, in the working dtype.
    rank : int or None
        Subspace dimension; ``None``: the numerical rank at ``rcond =
        eps(svd_dtype) · max(m, n)``, at least 1 (the cut-off of an SVD in
        ``svd_dtype``).
    svd_dtype : dtype
        The precision asked for; sets the default rank's cut-off.

    Returns
    -------
    ProjectedCore
        ``left`` (m x rank), ``core`` (rank x rank), ``right`` (n x rank) in
        ``whitened``'s dtype; ``singular_values`` :math:`\sigma(M)`
        (float64 numpy, descending, ``min(m, n)`` of them).
    """
    xp = namespace(whitened)
    m, n = (int(d) for d in whitened.shape)
    tall = m >= n
    gram = whitened.T @ whitened if tall else whitened @ whitened.T
    lam, vecs = eigh(xp, gram)
    lam_np = as_numpy(lam).astype(np.float64)[::-1]
    sigma = np.sqrt(np.maximum(lam_np, 0.0))
    if rank is None:  # at least 1, so that a zero weight still has factors
        rank = max(numerical_rank(sigma, eps(xp, svd_dtype) * max(m, n)), 1)
    keep = min(rank, int(sigma.shape[0]))
    k = int(vecs.shape[1])
    top = xp.flip(vecs[:, k - keep :], axis=1)  # descending
    other, tri = qr_reduced(xp, whitened @ top if tall else whitened.T @ top)
    if tall:
        return ProjectedCore(other, tri, top, sigma)
    return ProjectedCore(top, tri.T, other, sigma)


def orthonormal_columns(q: Array) -> Array:
    """``q`` re-orthonormalized by a Householder QR, column signs kept (``diag R > 0``)."""
    xp = namespace(q)
    basis, r = qr_reduced(xp, q)
    diag = xp.linalg.diagonal(r)
    ones = xp.ones_like(diag)
    return basis * xp.where(diag < 0, -ones, ones)[None, :]


def _project_to_core(
    whitened: Array, left: Array | None, right: Array | None, rank: int | None, dt: Any
) -> ProjectedCore:
    xp = namespace(whitened)
    if left is not None and right is not None:
        core = left.T @ whitened @ right
        a, b = int(core.shape[0]), int(core.shape[1])
        if rank is None or rank >= min(a, b):
            return ProjectedCore(left, core, right)
        y, s, zh = svd_reduced(xp, core, dtype=dt)
        return ProjectedCore(left @ y[:, :rank], diag_matrix(xp, s[:rank]), right @ zh[:rank, :].T)
    if left is not None:
        y, s, zh = svd_reduced(xp, left.T @ whitened, dtype=dt)  # best right side given U
        keep = int(s.shape[0]) if rank is None else min(rank, int(s.shape[0]))
        return ProjectedCore(left @ y[:, :keep], diag_matrix(xp, s[:keep]), zh[:keep, :].T)
    if right is not None:
        y, s, zh = svd_reduced(xp, whitened @ right, dtype=dt)  # best left side given V
        keep = int(s.shape[0]) if rank is None else min(rank, int(s.shape[0]))
        return ProjectedCore(y[:, :keep], diag_matrix(xp, s[:keep]), right @ zh[:keep, :].T)
    y, s, zh = svd_reduced(xp, whitened, dtype=dt)
    sigma = as_numpy(s).astype(np.float64)
    if rank is None:  # at least 1, so that a zero weight still has factors
        m, n = (int(d) for d in whitened.shape)
        rcond = eps(xp, whitened.dtype if dt is None else dt) * max(m, n)
        rank = max(numerical_rank(sigma, rcond), 1)
    keep = min(rank, int(s.shape[0]))
    return ProjectedCore(y[:, :keep], diag_matrix(xp, s[:keep]), zh[:keep, :].T, sigma)


def deployable_factors(
    projected: ProjectedCore,
    grad_op: WhiteningOperator | None,
    input_op: WhiteningOperator | None,
    dtype: Any,
) -> Factors:
    r"""Un-whiten: :math:`A = S_g^{-\top} U`, :math:`B = S_x^{-\top} V`, all in ``dtype``.

    Triangular or eigen solves, never an explicit inverse.
    """
    xp = namespace(projected.core)
    return Factors(
        astype(xp, inverse_transpose_times(grad_op, projected.left), dtype),
        astype(xp, projected.core, dtype),
        astype(xp, inverse_transpose_times(input_op, projected.right), dtype),
    )


def pythagoras_error(total_energy: float, preserved_energy: float) -> float:
    r""":math:`\sqrt{\max(\lVert M\rVert^2 - \lVert C\rVert^2, 0)}`, the curvature-norm error."""
    return float(np.sqrt(max(total_energy - preserved_energy, 0.0)))


def numerical_rank(sigma: np.ndarray, rcond: float) -> int:
    r"""Number of singular values above :math:`\text{rcond} \cdot \sigma_1` (0 if all vanish).

    The one rank rule of the package (DESIGN: ``rcond = eps(dtype) · max(m, n)``).
    """
    s = np.asarray(sigma, dtype=np.float64)
    if s.size == 0 or s[0] == 0.0:
        return 0
    return int(np.sum(s > rcond * s[0]))


@finite_result
def projected_lowrank(
    weight: Array,
    rank: int | None = None,
    *,
    input_cov: Any = None,
    grad_cov: Any = None,
    left: Array | None = None,
    right: Array | None = None,
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    whitening: str = "cholesky",
    bounds: bool = True,
    svd_precision: str = "weight",
    xp: ModuleType | None = None,
) -> LowRankResult:
    r"""Best approximation of ``weight`` with factors in given subspaces, in the curvature norm.

    Minimises :math:`\lVert S_g^\top (W - A C B^\top) S_x \rVert_F` over the
    core :math:`C`, with :math:`\operatorname{span}(A) = \operatorname{span}(\text{left})`
    and :math:`\operatorname{span}(B) = \operatorname{span}(\text{right})`
    (or the optimal subspaces where a side is not given).

    Parameters
    ----------
    weight : (m, n) array_like
        Layer weight :math:`W` (out x in).
    rank : int, optional
        Target rank. Without bases: keep the top-``rank`` singular subspaces
        of :math:`M` (default: its numerical rank). With bases: truncate the
        projected core optimally inside the subspaces when ``rank`` is below
        their dimension; otherwise keep the full projected core.
    input_cov : (n, n) array_like or CovarianceRoot, optional
        :math:`C_x = E[x x^\top]`. ``None`` means :math:`S_x = I`.
    grad_cov : (m, m) array_like or CovarianceRoot, optional
        :math:`C_g = E[g g^\top]`. ``None`` means :math:`S_g = I`.
    left : (m, p) array_like, optional
        Basis of the output subspace, in the layer's own coordinates.
    right : (n, q) array_like, optional
        Basis of the input subspace, in the layer's own coordinates.
    damping : float or (float, float), optional
        Relative damping of ``(input_cov, grad_cov)``; see
        :func:`jactus_linalg.whiten`. Default ``1e-3``.
    whitening : {"cholesky", "eigh"}, optional
        Factor used for both covariances. Both give the same approximation.
    bounds : bool, optional
        Compute :math:`\sigma(M)` for the Eckart-Young bound (one extra SVD
        when bases are given). Default ``True``.
    svd_precision : {"weight", "working"}, optional
        Precision of the decomposition of the whitened weight. ``"weight"``
        (default): the weight's precision when it is below the working
        dtype (a float32 weight with float64 statistics: whitening in
        float64; the default rank's cut-off is float32's). Without bases it
        is reached by the eigendecomposition of the float64 Gram matrix of
        :math:`M` on its smaller side (:func:`gram_truncation`: faster than
        a float32 SVD, subspaces and error more accurate than one); with
        bases the SVDs run in float32, their bases re-orthonormalized in
        float64. ``"working"``: a float64 SVD. See
        :func:`jactus_linalg.whitening.svd_dtype`.
    xp : namespace, optional
        Array namespace; inferred from ``weight`` by default.

    Returns
    -------
    LowRankResult
        ``left``, ``core``, ``right`` in ``weight``'s dtype and namespace, on
        its device, plus ``error``, ``eckart_young`` and diagnostics.

    Raises
    ------
    TypeError
        If an input is not a real floating array, or ``rank`` is not an integer.
    ValueError
        On NaN/Inf, mismatched shapes, a non-symmetric or indefinite
        covariance, ``rank < 1`` or ``rank > min(m, n)``, or a basis that
        spans nothing.

    Notes
    -----
    With :math:`U, V` orthonormal bases of :math:`S_g^\top\,\text{left}` and
    :math:`S_x^\top\,\text{right}` and :math:`r = \min(a, b)`,

    .. math::

        \text{err}^2 = \lVert M\rVert_F^2 - \lVert C\rVert_F^2
        \ge \sum_{i > r} \sigma_i(M)^2 ,

    with equality when the subspaces are the top-:math:`r` singular
    subspaces of :math:`M` (Eckart-Young-Mirsky). ``error`` is computed by
    that identity, so its absolute accuracy is about
    :math:`\epsilon \lVert M \rVert_F^2 / \text{err}`. No covariance is ever
    inverted: :math:`S^{-\top} U` is a triangular or eigen solve.

    References
    ----------
    .. [1] C. Eckart, G. Young, "The approximation of one matrix by another
       of lower rank", Psychometrika, 1936.
    .. [2] JACTUS, arXiv 2605.02829.
    """
    check_array(weight, "weight")
    xp = namespace(weight, xp=xp)
    check_matrix(xp, weight, "weight")
    m, n = (int(d) for d in weight.shape)
    if rank is not None:
        rank = check_rank(rank, min(m, n), what=f"min(m, n) of a {m}x{n} weight")
    if left is not None:
        check_matrix(xp, left, "left", rows=m)
    if right is not None:
        check_matrix(xp, right, "right", rows=n)
    check_same_library(xp, input_cov=input_cov, grad_cov=grad_cov)
    work = working_dtype(xp, weight, input_cov, grad_cov, left, right)
    svd_dt = svd_dtype(xp, weight.dtype, work, svd_precision)
    input_op, grad_op = whitening_operators((m, n), input_cov, grad_cov, damping, whitening, work)
    whitened = whitened_weight(astype(xp, weight, work), grad_op, input_op)
    check_no_overflow(xp, whitened, "whitened weight S_g^T W S_x")
    total = float(xp.sum(whitened * whitened))
    sigma = None
    left_basis = right_basis = None
    if left is not None or right is not None:
        if left is not None:
            left_basis = _whiten_basis(xp, astype(xp, left, work), grad_op, "left", m)
        if right is not None:
            right_basis = _whiten_basis(xp, astype(xp, right, work), input_op, "right", n)
        if bounds:
            sigma = as_numpy(svd_reduced(xp, whitened, dtype=svd_dt)[1]).astype(np.float64)
    projected = project_to_core(whitened, left_basis, right_basis, rank, svd_dtype=svd_dt)
    if projected.singular_values is not None:
        sigma = projected.singular_values
    core = projected.core
    preserved = float(xp.sum(core * core))
    a, b = int(core.shape[0]), int(core.shape[1])
    factors = deployable_factors(projected, grad_op, input_op, weight.dtype)
    return LowRankResult(
        left=factors.left,
        core=factors.core,
        right=factors.right,
        error=pythagoras_error(total, preserved),
        eckart_young=None if sigma is None else eckart_young_tail(sigma, min(a, b)),
        total_energy=total,
        preserved_energy=preserved,
        n_params=a * m + b * n + a * b,
        singular_values=sigma,
        input_whitening=info_of(input_op),
        grad_whitening=info_of(grad_op),
    )


@finite_result
def curvature_error(
    weight: Array,
    left: Array,
    core: Array,
    right: Array,
    *,
    input_cov: Any = None,
    grad_cov: Any = None,
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    whitening: str = "cholesky",
) -> float:
    r"""Curvature-norm error :math:`\lVert S_g^\top (W - A C B^\top) S_x \rVert_F` of any factors.

    Measures an approximation made by any method in the same norm, so
    methods can be compared. Covariances may be arrays, roots or
    already-factored :class:`~jactus_linalg.whitening.WhiteningOperator`.

    Computed as :math:`\lVert M - (S_g^\top A)\, C\, (S_x^\top B)^\top \rVert_F`;
    cost :math:`O(mn(m + n))` for the whitening products.

    Raises
    ------
    TypeError, ValueError
        On invalid arrays or mismatched shapes.
    """
    xp = namespace(weight, left, core, right)
    check_matrix(xp, weight, "weight")
    m, n = (int(d) for d in weight.shape)
    check_matrix(xp, left, "left", rows=m)
    check_matrix(xp, right, "right", rows=n)
    check_matrix(xp, core, "core", rows=int(left.shape[1]), cols=int(right.shape[1]))
    check_same_library(xp, input_cov=input_cov, grad_cov=grad_cov)
    work = working_dtype(xp, weight, left, core, right, input_cov, grad_cov)
    input_op, grad_op = whitening_operators((m, n), input_cov, grad_cov, damping, whitening, work)
    whitened = whitened_weight(astype(xp, weight, work), grad_op, input_op)
    a = factor_transpose_times(grad_op, astype(xp, left, work))
    b = factor_transpose_times(input_op, astype(xp, right, work))
    residual = whitened - a @ astype(xp, core, work) @ b.T
    return float(xp.sqrt(xp.sum(residual * residual)))


class Factors(NamedTuple):
    """``left @ core @ right.T`` in a chosen basis (see :func:`orthonormal_factors`)."""

    left: Array
    core: Array
    right: Array


@finite_result
def orthonormal_factors(left: Array, core: Array, right: Array) -> Factors:
    r"""Re-express :math:`A C B^\top` with orthonormal outer factors, same spans and product.

    With thin QRs :math:`A = Q_A R_A` and :math:`B = Q_B R_B`,

    .. math::

        A C B^\top = Q_A\,(R_A C R_B^\top)\,Q_B^\top ,

    so :math:`\operatorname{span}(Q_A) = \operatorname{span}(A)`,
    :math:`\operatorname{span}(Q_B) = \operatorname{span}(B)` and the new core
    :math:`C' = R_A C R_B^\top` satisfies :math:`\lVert C' \rVert_F =
    \lVert A C B^\top \rVert_F`. A step :math:`\Delta C'` then moves the
    weight by exactly :math:`\lVert \Delta C' \rVert_F`, whatever the scale
    of the covariances behind :math:`A = S_g^{-\top} U` and
    :math:`B = S_x^{-\top} V`: the basis to train the core in.

    Parameters
    ----------
    left : (m, a) array
    core : (a, b) array
    right : (n, b) array

    Returns
    -------
    Factors
        ``(Q_A, R_A C R_B^T, Q_B)`` in the input dtype (computed in at least
        float32).

    Raises
    ------
    TypeError, ValueError
        On non-floating, non-finite or non-conforming arrays.

    Notes
    -----
    Householder QR is backward stable, so the product changes by
    :math:`O(\epsilon\,\kappa)` relative, with :math:`\kappa` the condition
    number of the factors.
    """
    xp = namespace(left, core, right)
    check_matrix(xp, left, "left")
    check_matrix(xp, right, "right")
    check_matrix(xp, core, "core", rows=int(left.shape[1]), cols=int(right.shape[1]))
    out = left.dtype
    work = working_dtype(xp, left, core, right)
    q_a, r_a = qr_reduced(xp, astype(xp, left, work))
    q_b, r_b = qr_reduced(xp, astype(xp, right, work))
    new_core = r_a @ astype(xp, core, work) @ r_b.T
    return Factors(astype(xp, q_a, out), astype(xp, new_core, out), astype(xp, q_b, out))
