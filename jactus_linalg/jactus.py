r"""The JACTUS layer factorization (arXiv 2605.02829).

*Joint Adaptation and Compression with a Task-aware Union of Subspaces.*
In whitened coordinates, with :math:`M = S_g^\top W S_x = P \Sigma Q^\top`,
a layer of rank :math:`r` keeps

.. math::

    U_r = \operatorname{orth}[P_k, S_g^\top E_g], \quad
    V_r = \operatorname{orth}[Q_k, S_x^\top E_x], \quad
    C_r = U_r^\top M V_r, \qquad j = \lfloor \tau r + \tfrac12 \rfloor,\;
    k = r - j,

with :math:`\tau` the task fraction and :math:`E_g`, :math:`E_x` the top-:math:`j`
eigenvectors of :math:`C_g` and :math:`C_x` (``task_directions="covariance"``,
the default). So :math:`\operatorname{span}(A) = \operatorname{span}(S_g^{-\top} P_k)
+ \operatorname{span}(E_g)` and :math:`\operatorname{span}(B) =
\operatorname{span}(S_x^{-\top} Q_k) + \operatorname{span}(E_x)`: the deployed
factors contain the covariances' principal directions. The ablation
``task_directions="gradient"`` takes instead the top singular vectors
:math:`P'_j, Q'_j` of the whitened mean gradient
:math:`\Gamma = S_g^{-1} G S_x^{-\top}`.

Because :math:`j` and :math:`k` grow by at most one per unit of rank, the
unions are nested; one ordered pass
(:func:`~jactus_linalg.union_of_subspaces` with ``nested=True``) yields bases
:math:`U, V` whose leading columns span every :math:`U_r, V_r`, and the
preserved energy of every rank follows from one core :math:`K = U^\top M V`
(:func:`~jactus_linalg.lowrank.project_to_core`, the kernel
:func:`~jactus_linalg.projected_lowrank` uses too):

.. math::

    E(r) = \lVert K_{:a_r, :b_r} \rVert_F^2, \qquad
    \text{gain}_r = E(r) - E(r - 1) \ge 0 .

Bounds checked by the tests: :math:`\sum_{i>r}\sigma_i^2 \le \text{err}_r^2 =
\lVert M\rVert^2 - E(r) \le \sum_{i>k}\sigma_i^2`.
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
    device_of,
    diag_matrix,
    eps,
    namespace,
    svd_reduced,
)
from ._checks import (
    check_array,
    check_fraction,
    check_matrix,
    check_no_overflow,
    check_rank,
    check_same_library,
    finite_result,
)
from .allocation import break_even_rank, rank_unit_costs
from .lowrank import (
    ProjectedCore,
    WhiteningInfo,
    deployable_factors,
    gram_resolves,
    gram_truncation,
    info_of,
    numerical_rank,
    orthonormal_columns,
    project_to_core,
    pythagoras_error,
    whitening_operators,
    working_dtype,
)
from .randomized import OVERSAMPLE, range_finder_svd, use_range_finder
from .spectral import top_eigenvectors
from .subspaces import union_of_subspaces
from .whitening import (
    DEFAULT_DAMPING,
    WhiteningOperator,
    factor_transpose_times,
    svd_dtype,
    whitened_gradient,
    whitened_weight,
)

__all__ = [
    "DEFAULT_TASK_DIRECTIONS",
    "DEFAULT_TASK_FRACTION",
    "TASK_DIRECTIONS",
    "JactusLayer",
    "LayerPlan",
    "jactus_layer",
    "plan_layer",
    "task_split",
]

#: Default task fraction :math:`\tau` (share of each layer's rank given to
#: task directions).
DEFAULT_TASK_FRACTION = 0.25

#: Where the task directions come from: the covariances' top eigenvectors
#: (DESIGN, the default) or the whitened mean gradient's singular vectors
#: (the earlier choice, kept for ablation).
TASK_DIRECTIONS = ("covariance", "gradient")
DEFAULT_TASK_DIRECTIONS = "covariance"


def task_split(rank: int, task_fraction: float, task_rank: int | None = None) -> tuple[int, int]:
    r"""``(k, j)``: weight and task directions at rank ``r``.

    :math:`j = \min(\lfloor \tau r + 1/2 \rfloor, \text{task\_rank})`,
    :math:`k = r - j`. Capping at the number of task directions the data
    resolve (the numerical rank of the covariances, or of :math:`\Gamma`)
    hands the units they cannot fill back to weight directions.
    """
    j = math.floor(task_fraction * rank + 0.5)
    if task_rank is not None:
        j = min(j, task_rank)
    return rank - j, j


class JactusLayer(NamedTuple):
    r"""A JACTUS factorization at one rank (see :meth:`LayerPlan.factorize`).

    Attributes
    ----------
    left, core, right : arrays
        :math:`A` (m x a), :math:`C` (a x b), :math:`B` (n x b) with
        :math:`W \approx A C B^\top`.
    rank : int
        Requested rank :math:`r`.
    weight_directions, task_directions : int
        :math:`k` and :math:`j` at this rank.
    error : float
        Curvature-norm error :math:`\sqrt{\lVert M\rVert^2 - \lVert C\rVert^2}`.
    eckart_young : float
        Lower bound :math:`\sqrt{\sum_{i>r}\sigma_i(M)^2}`.
    weight_bound : float
        Upper bound :math:`\sqrt{\sum_{i>k}\sigma_i(M)^2}`.
    n_params : int
        :math:`am + bn + ab`.
    gains : (R,) numpy array
        Per-unit gains :math:`E(s) - E(s-1)`, :math:`s = 1..R` (R = plan's
        ``max_rank``), in curvature (predicted-loss) units.
    costs : (R,) numpy array
        Per-unit parameter costs :math:`m + n + 2(s-1) + 1`.
    total_energy : float
        :math:`\lVert M \rVert_F^2`.
    input_whitening, grad_whitening : WhiteningInfo or None
    """

    left: Array
    core: Array
    right: Array
    rank: int
    weight_directions: int
    task_directions: int
    error: float
    eckart_young: float
    weight_bound: float
    n_params: int
    gains: np.ndarray
    costs: np.ndarray
    total_energy: float
    input_whitening: WhiteningInfo | None
    grad_whitening: WhiteningInfo | None


class LayerPlan(NamedTuple):
    r"""Everything needed to factorize one layer at any rank up to ``max_rank``.

    Built once by :func:`plan_layer`; :attr:`gains` feed
    :func:`~jactus_linalg.allocate_ranks`, and :meth:`factorize` cuts the
    layer at the allocated rank without another decomposition.

    Attributes
    ----------
    left_basis : (m, a_R) array
        Nested orthonormal :math:`U` (whitened coordinates).
    right_basis : (n, b_R) array
        Nested orthonormal :math:`V`.
    core : (a_R, b_R) array
        :math:`K = U^\top M V`.
    left_counts, right_counts : (R + 1,) numpy int arrays
        :math:`a_r, b_r`: how many columns of ``U``, ``V`` rank ``r`` uses.
    energy : (R + 1,) numpy array
        :math:`E(r)`, preserved whitened energy, ``energy[0] = 0``.
    total_energy : float
        :math:`\lVert M \rVert_F^2`.
    singular_values : numpy array
        :math:`\sigma(M)`, descending: all of them (exact SVD) or the top
        ones (randomized SVD).
    tail_energy : (R + 1,) numpy array
        :math:`\sum_{i>r}\sigma_i(M)^2` for ``r = 0..R``: from the full
        spectrum, or as :math:`\lVert M\rVert_F^2 - \sum_{i\le r}\sigma_i^2`
        (absolute accuracy :math:`\epsilon \lVert M \rVert_F^2`) after a
        randomized SVD.
    task_rank : int
        Task directions the data resolve among the :math:`j_R` the plan needs
        (:math:`j_R` = the task directions at ``max_rank``): the smaller
        numerical rank of :math:`C_g` and :math:`C_x` (``"covariance"``) or
        that of :math:`\Gamma` (``"gradient"``), capped at :math:`j_R`; 0 when
        :math:`\tau = 0`.
    task_fraction : float
    shape : (int, int)
    input_op, grad_op : WhiteningOperator or None
    weight_dtype : dtype
    task_source : str
        ``"covariance"`` or ``"gradient"``.
    task_notes : tuple of str
        How the task directions were found (exact or randomized, with the
        accuracy bound of the randomized eigensolver).
    svd_dtype : dtype or None
        The dtype the SVDs of :math:`M` (and :math:`\Gamma`) ran in when it
        is below the working dtype (``svd_precision="weight"`` with a
        float32 weight and float64 statistics); ``None``: the working dtype.
        The plan's accuracy is this dtype's.
    """

    left_basis: Array
    right_basis: Array
    core: Array
    left_counts: np.ndarray
    right_counts: np.ndarray
    energy: np.ndarray
    total_energy: float
    singular_values: np.ndarray
    tail_energy: np.ndarray
    task_rank: int
    task_fraction: float
    shape: tuple[int, int]
    input_op: WhiteningOperator | None
    grad_op: WhiteningOperator | None
    weight_dtype: Any
    task_source: str = DEFAULT_TASK_DIRECTIONS
    task_notes: tuple[str, ...] = ()
    svd_dtype: Any = None

    @property
    def max_rank(self) -> int:
        return len(self.energy) - 1

    @property
    def gains(self) -> np.ndarray:
        """Per-unit gains :math:`E(r) - E(r-1)`, clipped at 0 against rounding."""
        return np.maximum(np.diff(self.energy), 0.0)

    @property
    def costs(self) -> np.ndarray:
        """Per-unit parameter costs :math:`m + n + 2(r-1) + 1`."""
        return rank_unit_costs(*self.shape, self.max_rank)

    def factorize(self, rank: int, *, dtype: Any = None) -> JactusLayer:
        """Cut the plan at ``rank`` (``1 <= rank <= max_rank``).

        The factors come in ``dtype`` (default: the weight's dtype); pass the
        plan's working dtype (``plan.core.dtype``, at least float32) to post-process
        them before rounding to the weight's dtype once.
        """
        rank = check_rank(rank, self.max_rank, what="the plan's max_rank")
        a, b = int(self.left_counts[rank]), int(self.right_counts[rank])
        k, j = task_split(rank, self.task_fraction, self.task_rank)
        # the leading a x b block of K = U^T M V is the core of the rank-r
        # union (project_to_core at max_rank, cut here)
        cut = ProjectedCore(self.left_basis[:, :a], self.core[:a, :b], self.right_basis[:, :b])
        out = self.weight_dtype if dtype is None else dtype
        factors = deployable_factors(cut, self.grad_op, self.input_op, out)
        m, n = self.shape
        return JactusLayer(
            left=factors.left,
            core=factors.core,
            right=factors.right,
            rank=rank,
            weight_directions=k,
            task_directions=j,
            error=pythagoras_error(self.total_energy, float(self.energy[rank])),
            eckart_young=math.sqrt(self.tail_energy[rank]),
            weight_bound=math.sqrt(self.tail_energy[k]),
            n_params=a * m + b * n + a * b,
            gains=self.gains,
            costs=self.costs,
            total_energy=self.total_energy,
            input_whitening=info_of(self.input_op),
            grad_whitening=info_of(self.grad_op),
        )


def _step_sources(max_rank: int, task_fraction: float, task_rank: int) -> np.ndarray:
    """For ``r = 1..R``: ``True`` if unit ``r`` adds a task direction, else a weight one."""
    js = np.array([task_split(r, task_fraction, task_rank)[1] for r in range(max_rank + 1)])
    return np.diff(js) > 0


def _interleave(weight_dirs: Array, task_dirs: Array, is_task: np.ndarray) -> Array:
    """Columns in the order units add them (weight or task, per ``is_task``)."""
    xp = namespace(weight_dirs)
    n_task = int(is_task.sum())
    n_weight = len(is_task) - n_task
    order = np.empty(len(is_task), dtype=np.int64)
    order[~is_task] = np.arange(n_weight)
    order[is_task] = n_weight + np.arange(n_task)
    stacked = xp.concat([weight_dirs[:, :n_weight], task_dirs[:, :n_task]], axis=1)
    index = xp.asarray(order, device=device_of(stacked))
    return xp.take(stacked, index, axis=1)


def _prefix_energy(core: Array, left_counts: np.ndarray, right_counts: np.ndarray) -> np.ndarray:
    r""":math:`E(r) = \lVert K_{:a_r,:b_r}\rVert^2` for every ``r`` from one 2-D prefix sum."""
    squares = as_numpy(core).astype(np.float64) ** 2
    prefix = np.zeros((squares.shape[0] + 1, squares.shape[1] + 1))
    prefix[1:, 1:] = squares.cumsum(axis=0).cumsum(axis=1)
    return prefix[left_counts, right_counts]


#: Subspace iterations of the randomized range finder on M.
POWER_ITERS = 2


def _randomized(svd: str, k: int, shape: tuple) -> bool:
    """:func:`~jactus_linalg.randomized.use_range_finder` for the ``svd`` argument."""
    return use_range_finder(svd, k, shape, "svd")


def top_singular(
    a: Array, k: int, svd: str, *, dtype: Any = None
) -> tuple[Array, Array, Array]:
    """Top-``k`` (at least) singular triplets ``(U, s, Vh)`` of ``a``, exact or randomized.

    ``dtype``: decompose in that dtype (see :func:`~jactus_linalg.whitening.svd_dtype`);
    the triplets come back in ``a``'s dtype.
    """
    xp = namespace(a)
    if not _randomized(svd, k, a.shape):
        return svd_reduced(xp, a, dtype=dtype)
    low = a if dtype is None else astype(xp, a, dtype)
    res = range_finder_svd(low, k, oversample=OVERSAMPLE, power_iters=POWER_ITERS)
    return (
        astype(xp, res.left, a.dtype), astype(xp, res.values, a.dtype),
        astype(xp, res.right.T, a.dtype),
    )


def _gram_route(whitened: Array, r_max: int, svd: str, svd_dt: Any) -> ProjectedCore | None:
    r"""The top ``r_max`` subspaces of :math:`M` from its float64 Gram matrix, where that applies.

    Applies when the decomposition asked for is exact (``svd`` resolves to the
    exact route) and in a lower precision that the working dtype's Gram
    resolves (a float32 weight with float64 statistics; see
    :func:`~jactus_linalg.lowrank.gram_truncation`): one Gram product, one
    symmetric eigendecomposition of the smaller side and one QR, in the
    working dtype, instead of a float32 SVD followed by two QRs to
    re-orthonormalize its vectors and a core product. The left basis is
    :math:`Q` of :math:`M V_r = Q R`, whose leading ``k`` columns span
    :math:`M V_k` (the top-``k`` left singular subspace) for every ``k``, and
    the core :math:`R` is triangular, so every prefix ``k`` is the best
    rank-``k`` approximation. ``None`` where it does not apply.
    """
    if svd_dt is None:
        return None
    xp = namespace(whitened)
    if not gram_resolves(xp, whitened.dtype, svd_dt):
        return None
    if _randomized(svd, r_max, whitened.shape):
        return None
    return gram_truncation(whitened, r_max, svd_dt)


def _tail_energy(sigma: np.ndarray, total: float, r_max: int, full: int) -> np.ndarray:
    r""":math:`\sum_{i>r}\sigma_i^2` for ``r = 0..r_max``."""
    squares = sigma**2
    if sigma.size >= full:  # full spectrum: sum the tail itself (no cancellation)
        tail = np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]])
        return tail[: r_max + 1]
    head = np.concatenate([[0.0], np.cumsum(squares[:r_max])])
    return np.maximum(total - head, 0.0)


@finite_result
def plan_layer(
    weight: Array,
    *,
    input_cov: Any = None,
    grad_cov: Any = None,
    grad_mean: Array | None = None,
    task_fraction: float = DEFAULT_TASK_FRACTION,
    task_directions: str = DEFAULT_TASK_DIRECTIONS,
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    max_rank: int | None = None,
    whitening: str = "cholesky",
    svd: str = "auto",
    xp: ModuleType | None = None,
    task_grad_cov: WhiteningOperator | None = None,
    svd_precision: str = "weight",
) -> LayerPlan:
    r"""Decompose one layer once, for every rank up to ``max_rank``.

    Parameters
    ----------
    weight : (m, n) array_like
        Layer weight :math:`W`.
    input_cov : (n, n) array_like, CovarianceRoot or WhiteningOperator, optional
        :math:`C_x`; ``None`` means no input whitening. A
        :class:`~jactus_linalg.whitening.WhiteningOperator` is used as
        factored (shared by the layers that read the same input).
    grad_cov : (m, m) array_like, CovarianceRoot or WhiteningOperator, optional
        :math:`C_g`; ``None`` means no gradient whitening.
    grad_mean : (m, n) array_like, optional
        :math:`G = E[g x^\top]`. Required when ``task_directions="gradient"``
        and ``task_fraction > 0``; not used otherwise.
    task_fraction : float in [0, 1], optional
        :math:`\tau`. ``0`` gives the optimal rank-r approximation in the
        curvature norm (two-sided whitened SVD). Default 0.25.
    task_directions : {"covariance", "gradient"}, optional
        ``"covariance"`` (default, DESIGN): :math:`E_g, E_x`, the top-:math:`j`
        eigenvectors of :math:`C_g` and :math:`C_x` (both covariances are
        then required when :math:`\tau > 0`). ``"gradient"``: the top
        singular vectors of :math:`\Gamma` (ablation).
    damping : float or (float, float), optional
        Relative damping of ``(input_cov, grad_cov)``.
    max_rank : int, optional
        Largest rank planned. Default: the break-even rank, the largest
        :math:`r` with :math:`r(m+n) + r^2 < mn`.
    whitening : {"cholesky", "eigh"}, optional
        Factorization of the covariances (same result, different cost).
    svd : {"auto", "exact", "randomized"}, optional
        How the top singular subspaces of :math:`M` (``max_rank`` of them),
        of :math:`\Gamma`, and the top eigenvectors of a Cholesky-whitened
        covariance (:math:`j` of them) are found. ``"auto"`` uses a
        randomized range finder (:func:`~jactus_linalg.randomized.randomized_svd`)
        when the directions needed plus oversampling are at most 10% of the
        dimension, and the exact decomposition otherwise. An ``eigh``
        whitening reuses its own eigenvectors.
    xp : namespace, optional
    task_grad_cov : WhiteningOperator, optional
        Ablation without gradient whitening (``grad_cov=None``): the factored
        :math:`C_g` whose eigenvectors still give :math:`E_g` (then
        :math:`S_g = I` in the union).
    svd_precision : {"weight", "working"}, optional
        dtype of the SVDs of :math:`M` and :math:`\Gamma`: the weight's
        precision when it is below the working dtype (default; a float32
        weight with float64 statistics decomposes in float32, whitening
        stays float64), or the working dtype. The rank cut-offs use the
        epsilon of the dtype the SVD ran in. See
        :func:`~jactus_linalg.whitening.svd_dtype`.

    Returns
    -------
    LayerPlan

    Raises
    ------
    TypeError, ValueError
        On invalid arrays or arguments (see :func:`projected_lowrank`); an
        unknown ``task_directions``; ``task_fraction > 0`` without
        ``grad_mean`` (``"gradient"``) or without both covariances
        (``"covariance"``).

    Notes
    -----
    Cost: the SVD of :math:`M` (top ``max_rank``), the task directions (top
    :math:`j` eigenvectors of each covariance, or the top :math:`j` singular
    vectors of :math:`\Gamma`), two Householder QRs of ``m x R`` and
    ``n x R`` column sets, and :math:`K = U^\top M V`. Task directions that
    the data do not resolve (eigenvalues or singular values at most
    :math:`\epsilon \max(m,n)` times the largest) are never used
    (``task_rank``).
    """
    check_array(weight, "weight")
    xp = namespace(weight, xp=xp)
    check_matrix(xp, weight, "weight")
    m, n = (int(d) for d in weight.shape)
    tau = check_fraction(task_fraction, "task_fraction", include_zero=True)
    if grad_mean is not None:
        check_matrix(xp, grad_mean, "grad_mean", rows=m, cols=n)
    limit = max(break_even_rank(m, n), 1)
    r_max = limit if max_rank is None else check_rank(max_rank, min(m, n), "max_rank")
    uses_gradient = task_directions == "gradient" and tau > 0
    check_same_library(xp, input_cov=input_cov, grad_cov=grad_cov, grad_mean=grad_mean)
    work = working_dtype(xp, weight, input_cov, grad_cov, grad_mean if uses_gradient else None)
    svd_dt = svd_dtype(xp, weight.dtype, work, svd_precision)
    input_op, grad_op = whitening_operators((m, n), input_cov, grad_cov, damping, whitening, work)
    source = _check_task_inputs(
        tau, task_directions, input_cov, grad_cov if task_grad_cov is None else task_grad_cov,
        grad_mean,
    )
    whitened = whitened_weight(astype(xp, weight, work), grad_op, input_op)
    check_no_overflow(xp, whitened, "whitened weight S_g^T W S_x")
    total = float(xp.sum(whitened * whitened))
    gram = _gram_route(whitened, r_max, svd, svd_dt)
    if gram is not None:  # orthonormal bases in the working dtype, core R of a QR
        assert gram.singular_values is not None  # gram_truncation always reports them
        p, qh, sigma = gram.left, gram.right.T, gram.singular_values
    else:
        p, s, qh = top_singular(whitened, r_max, svd, dtype=svd_dt)
        sigma = as_numpy(s).astype(np.float64)
    notes: tuple[str, ...] = ()
    task_rank, left_task, right_task = 0, p[:, :0], qh[:0, :].T
    if tau > 0:
        j_max = max(task_split(r_max, tau)[1], 1)
        if source == "gradient":
            gamma = whitened_gradient(astype(xp, grad_mean, work), grad_op, input_op)
            check_no_overflow(xp, gamma, "whitened gradient S_g^-1 G S_x^-T")
            pt, st, qth = top_singular(gamma, j_max, svd, dtype=svd_dt)
            rcond = eps(xp, work if svd_dt is None else svd_dt) * max(m, n)
            task_rank = min(numerical_rank(as_numpy(st).astype(np.float64), rcond), j_max)
            left_task, right_task = pt, qth.T
        else:
            assert input_op is not None  # checked above
            task_rank, left_task, right_task, notes = _covariance_directions(
                grad_op, input_op, j_max, svd, task_grad_cov
            )
    for op in (input_op, grad_op, task_grad_cov):  # no plan keeps a covariance alive
        if op is not None:
            op.forget_covariance()
    is_task = _step_sources(r_max, tau, task_rank)
    if bool(is_task.any()):
        left = union_of_subspaces(_interleave(p, left_task, is_task), nested=True)
        right = union_of_subspaces(_interleave(qh.T, right_task, is_task), nested=True)
        u, v, left_ok, right_ok = left.basis, right.basis, left.accepted, right.accepted
    else:  # singular vectors are already nested and orthonormal (to the SVD's dtype)
        u, v = p[:, :r_max], qh[:r_max, :].T
        if svd_dt is not None and gram is None:  # to the working dtype: Pythagoras at its rounding
            u, v = orthonormal_columns(u), orthonormal_columns(v)
        left_ok = right_ok = np.ones(r_max, dtype=bool)
    if gram is not None and not bool(is_task.any()):
        core = gram.core[:r_max, :r_max]  # U^T M V, triangular: its prefixes are nested
    elif svd_dt is None and not bool(is_task.any()):  # singular vectors: U^T M V = diag(sigma)
        core = diag_matrix(xp, s[:r_max])
    else:
        core = project_to_core(whitened, u, v).core
    left_counts = np.concatenate([[0], np.cumsum(left_ok)])
    right_counts = np.concatenate([[0], np.cumsum(right_ok)])
    return LayerPlan(
        left_basis=u,
        right_basis=v,
        core=core,
        left_counts=left_counts,
        right_counts=right_counts,
        energy=_prefix_energy(core, left_counts, right_counts),
        total_energy=total,
        singular_values=sigma,
        tail_energy=_tail_energy(sigma, total, r_max, min(m, n)),
        task_rank=task_rank,
        task_fraction=tau,
        shape=(m, n),
        input_op=input_op,
        grad_op=grad_op,
        weight_dtype=weight.dtype,
        task_source=source,
        task_notes=notes,
        svd_dtype=svd_dt,
    )


def _check_task_inputs(
    tau: float, source: object, input_cov: Any, grad_cov: Any, grad_mean: Any
) -> str:
    """Validate ``task_directions`` against the statistics it needs; return it."""
    if source not in TASK_DIRECTIONS:
        msg = f"`task_directions` must be one of {TASK_DIRECTIONS}; got {source!r}"
        raise ValueError(msg)
    if tau == 0:
        return str(source)
    if source == "gradient" and grad_mean is None:
        msg = (
            "`grad_mean` is required when `task_fraction` > 0 and "
            "task_directions='gradient' (or pass task_fraction=0)"
        )
        raise ValueError(msg)
    if source == "covariance" and (input_cov is None or grad_cov is None):
        missing = [n for n, c in (("input_cov", input_cov), ("grad_cov", grad_cov)) if c is None]
        msg = (
            f"task_directions='covariance' with `task_fraction` > 0 needs both covariances "
            f"(their top eigenvectors are the task directions); got no {' and no '.join(missing)}"
            " (or pass task_fraction=0)"
        )
        raise ValueError(msg)
    return str(source)


def _covariance_directions(
    grad_op: WhiteningOperator | None,
    input_op: WhiteningOperator,
    j: int,
    svd: str,
    task_grad_op: WhiteningOperator | None = None,
) -> tuple[int, Array, Array, tuple[str, ...]]:
    r"""``(task_rank, S_g^T E_g, S_x^T E_x, notes)`` for the top-``j`` eigenvectors.

    ``task_grad_op`` supplies :math:`C_g` when the layer is not whitened by it.
    """
    out = []
    rank = j
    notes = []
    source_g = grad_op if task_grad_op is None else task_grad_op
    assert source_g is not None  # checked by _check_task_inputs
    for source, op, side in ((source_g, grad_op, "grad_cov"), (input_op, input_op, "input_cov")):
        top = top_eigenvectors(source, min(j, source.dim), method=svd)
        rank = min(rank, top.rank)
        out.append(factor_transpose_times(op, top.vectors))
        note = f"{side}: top-{int(top.vectors.shape[1])} eigenvectors ({top.method})"
        if top.method == "randomized":
            lam_j = float(top.values[-1]) + source.damping
            note += (
                f", missed eigenvalue <= {top.missed_eigenvalue_bound:.3g} against "
                f"lambda_j + delta = {lam_j:.3g}"
            )
        notes.append(note)
    return rank, out[0], out[1], tuple(notes)


@finite_result
def jactus_layer(
    weight: Array,
    rank: int,
    *,
    input_cov: Any = None,
    grad_cov: Any = None,
    grad_mean: Array | None = None,
    task_fraction: float = DEFAULT_TASK_FRACTION,
    task_directions: str = DEFAULT_TASK_DIRECTIONS,
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    max_rank: int | None = None,
    whitening: str = "cholesky",
    svd: str = "auto",
    svd_precision: str = "weight",
    xp: ModuleType | None = None,
) -> JactusLayer:
    r"""JACTUS factorization of one layer at ``rank``, with its allocation gains.

    :math:`W \approx A C B^\top` with :math:`A = S_g^{-\top} U_r`,
    :math:`B = S_x^{-\top} V_r`, :math:`C = U_r^\top M V_r`, where
    :math:`U_r = \operatorname{orth}[P_k, S_g^\top E_g]` and
    :math:`V_r = \operatorname{orth}[Q_k, S_x^\top E_x]` unite the top
    singular subspaces of the whitened weight with the top eigenvectors of
    the covariances (``task_directions="covariance"``), or with the top
    singular subspaces of the whitened gradient (``"gradient"``).

    Parameters
    ----------
    weight : (m, n) array_like
    rank : int
        :math:`r`, with ``1 <= rank <= max_rank``.
    input_cov, grad_cov, grad_mean, task_fraction, task_directions, damping, max_rank, whitening, svd, svd_precision, xp
        As in :func:`plan_layer`; ``max_rank`` defaults to
        ``max(rank, break-even rank)``.

    Returns
    -------
    JactusLayer
        Factors, bounds, and the per-unit ``gains`` / ``costs`` for
        :func:`~jactus_linalg.allocate_ranks`.

    Raises
    ------
    TypeError, ValueError
        As :func:`plan_layer`; ``rank`` outside ``[1, min(m, n)]``.

    Notes
    -----
    .. math::

        \sum_{i>r}\sigma_i(M)^2 \;\le\; \text{err}^2 = \lVert M\rVert_F^2 -
        \lVert C\rVert_F^2 \;\le\; \sum_{i>k}\sigma_i(M)^2 ,

    the left inequality by Eckart-Young (the core has rank at most
    :math:`r`), the right because :math:`U_r \supseteq P_k` and
    :math:`V_r \supseteq Q_k`. With :math:`\tau = 0` both are equalities.

    References
    ----------
    .. [1] JACTUS, "Joint Adaptation and Compression with a Task-aware Union
       of Subspaces", arXiv 2605.02829.
    """
    check_array(weight, "weight")
    xp = namespace(weight, xp=xp)
    check_matrix(xp, weight, "weight")
    m, n = (int(d) for d in weight.shape)
    rank = check_rank(rank, min(m, n), what=f"min(m, n) of a {m}x{n} weight")
    if max_rank is None:
        max_rank = max(rank, break_even_rank(m, n))
    elif max_rank < rank:
        msg = f"`max_rank` must be >= rank={rank}; got {max_rank}"
        raise ValueError(msg)
    plan = plan_layer(
        weight, input_cov=input_cov, grad_cov=grad_cov, grad_mean=grad_mean,
        task_fraction=task_fraction, task_directions=task_directions, damping=damping,
        max_rank=max_rank,
        whitening=whitening, svd=svd, svd_precision=svd_precision, xp=xp,
    )
    return plan.factorize(rank)
