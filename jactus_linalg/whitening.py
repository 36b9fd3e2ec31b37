r"""Whitening factors of a (damped) covariance.

A whitening factor of a positive semidefinite covariance :math:`C` is any
:math:`S` with

.. math::

    S S^\top = C + \delta I, \qquad \delta = \text{damping} \cdot
    \operatorname{mean}(\operatorname{diag} C) .

Two factors are offered; they differ by an orthogonal factor
(:math:`L = S_\text{sym} O`), so they give the same whitened norm
:math:`\lVert S^\top X \rVert_F` and the same low-rank approximations:

* ``method="eigh"``: the symmetric square root
  :math:`S = V \operatorname{diag}(\sqrt{\lambda + \delta}) V^\top`. Robust,
  with the full spectrum as a diagnostic.
* ``method="cholesky"``: the lower Cholesky factor :math:`S = L`, applied
  with triangular solves. About 10x cheaper than eigh; the default fast path
  in :func:`jactus_linalg.projected_lowrank`.

Damping is relative to the mean eigenvalue, so the result is invariant to
rescaling :math:`C`; the absolute :math:`\delta` is reported, never applied
silently. A covariance given as a :class:`~jactus_linalg.covariance.CovarianceRoot`
(:math:`R^\top R = C`) is whitened from the root by a QR (``cholesky``) or an
SVD (``eigh``) of :math:`[R; \sqrt\delta I]`, so the condition number is never
squared.

``damping="svd-llm"`` is SVD-LLM's own policy instead (no damping while the
Cholesky of :math:`C` succeeds, its eigenvalue shift where it fails,
reported); ``compress(method="svd-llm")`` uses it. With damping, a damped
Cholesky exists for some indefinite :math:`C`; a block Krylov estimate on
that factor, not a second Cholesky, refuses them. :func:`svd_dtype` says in
which dtype to run the SVD of a whitened weight.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from ._backend import (
    Array,
    astype,
    cholesky_lower,
    decomposition_dtype,
    device_of,
    eigh,
    eigvalsh,
    eps,
    eye,
    inverse_frobenius_squared,
    is_half,
    namespace,
    plus_diagonal,
    qr_r,
    qr_reduced,
    random_normal,
    solve_triangular,
    svd_reduced,
    triangular_times,
)
from ._checks import check_array, check_matrix, check_nonnegative, check_symmetric, finite_result
from .covariance import CovarianceRoot, GramProducts

__all__ = [
    "DEFAULT_DAMPING",
    "SVD_LLM",
    "SVD_PRECISIONS",
    "Whitening",
    "svd_dtype",
    "whiten",
]

#: Default relative damping :math:`\delta / \operatorname{mean}(\operatorname{diag} C)`.
DEFAULT_DAMPING = 1e-3

#: ``damping=SVD_LLM``: SVD-LLM's own numerics (no damping while the
#: Cholesky of :math:`C` succeeds; otherwise its eigenvalue shift).
SVD_LLM = "svd-llm"

#: SVD-LLM's floor above the smallest eigenvalue when its Cholesky fails:
#: :math:`C + (-\lambda_\min + 10^{-6}) I` (AIoT-MLSys-Lab/SVD-LLM,
#: ``SVDLLM.py``, ``profle_svdllm``), absolute, in the units of :math:`C`.
SVD_LLM_FLOOR = 1e-6

#: Block size and number of blocks of the Krylov certificate (:func:`_krylov_lambda_min`).
CERTIFICATE_BLOCK = 4
CERTIFICATE_STEPS = 8

_METHODS = ("eigh", "cholesky")

#: Eigenvalues below ``-INDEFINITE_SLACK · n · eps · λ_max`` are not rounding.
INDEFINITE_SLACK = 10.0


class Whitening(NamedTuple):
    r"""Result of :func:`whiten`.

    Attributes
    ----------
    factor : (n, n) array
        :math:`S` with :math:`S S^\top = C + \delta I` (symmetric for
        ``eigh``, lower triangular for ``cholesky``).
    inverse : (n, n) array
        :math:`S^{-1}`, from the eigenvectors or a triangular solve, never
        from an explicit inverse of :math:`C`.
    damping : float
        The absolute :math:`\delta` added to the diagonal.
    relative_damping : float
        :math:`\delta / \operatorname{mean}(\operatorname{diag} C)`.
    method : str
        The method actually used (``"eigh"`` or ``"cholesky"``).
    effective_rank : float
        :math:`\operatorname{tr}\, C (C + \delta I)^{-1} = \sum_i \lambda_i /
        (\lambda_i + \delta)`: the number of directions the data resolves
        above the damping (``n`` when :math:`\delta = 0`).
    numerical_rank : int or None
        Eigenvalues above :math:`n \epsilon \lambda_\max` (``eigh`` only).
    spectrum : (n,) array
        Eigenvalues of :math:`C`, ascending (``eigh``), or the Cholesky pivots
        :math:`L_{ii}^2` of :math:`C + \delta I` (``cholesky``).
    notes : tuple of str
        What was done beyond the plain factorization (clipped rounding
        negatives, rank deficiency, a Cholesky that fell back to eigh).
    """

    factor: Array
    inverse: Array
    damping: float
    relative_damping: float
    method: str
    effective_rank: float
    numerical_rank: int | None
    spectrum: Array
    notes: tuple[str, ...]


class WhiteningOperator(NamedTuple):
    r"""A whitening factor kept in factored form, for cheap products and solves.

    ``method="cholesky"``: :math:`S = L` (``lower``). ``method="eigh"``:
    :math:`S = \alpha I + Z \operatorname{diag}(d) Z^\top` with orthonormal
    :math:`Z` (``vectors``), ``roots`` :math:`= \alpha + d` and ``floor``
    :math:`= \alpha = \sqrt\delta` (used only when :math:`Z` is not square).
    ``effective_rank`` is :math:`\operatorname{tr}\, C (C + \delta I)^{-1}`
    (``dim`` when :math:`\delta = 0`). For a Cholesky factor it costs a
    triangular inversion, as much as the factorization, so it is computed on
    first access and kept (``rank_cache``), never on the way to a low-rank
    factorization that does not ask for it. ``eigen_cache`` keeps the top
    eigenpairs :func:`~jactus_linalg.spectral.top_eigenvectors` computed, so
    the layers that share one input (q, k, v; gate, up) and so one operator
    decompose their :math:`C_x` once. ``covariance_ref`` is a one-slot
    holder: a Cholesky operator built from an array holds that array there
    (referenced, not copied), and every other operator holds ``None``. While
    it is held, the exact top eigenpairs decompose :math:`C` itself (the
    eigenvectors of :math:`C + \delta I`, whose eigenvalues are shifted by
    :math:`\delta`) rather than re-forming :math:`L L^\top` (a triangular
    product as costly as the factorization). :meth:`forget_covariance` empties
    the slot; :func:`~jactus_linalg.plan_layer` calls it before returning, so
    that no plan keeps the covariance alive.
    """

    method: str
    dim: int
    lower: Array | None
    vectors: Array | None
    roots: Array | None
    floor: float
    damping: float
    relative_damping: float
    numerical_rank: int | None
    spectrum: Array
    notes: tuple[str, ...]
    rank_cache: list  # [effective rank], [None] until first asked for
    eigen_cache: dict  # top eigenpairs of C, kept by jactus_linalg.spectral.top_eigenvectors
    covariance_ref: list  # [C] while a Cholesky operator may decompose C itself, else [None]

    @property
    def covariance(self) -> Array | None:
        """The covariance this operator factors, while it is held (see ``covariance_ref``)."""
        return self.covariance_ref[0]

    def forget_covariance(self) -> None:
        """Drop the reference to the covariance (the eigenpairs then come from :math:`L L^\\top`)."""
        self.covariance_ref[0] = None

    @property
    def effective_rank(self) -> float:
        r""":math:`\operatorname{tr}\, C (C + \delta I)^{-1}`, computed once, on first access."""
        if self.rank_cache[0] is None:
            assert self.lower is not None  # only Cholesky factors defer it
            self.rank_cache[0] = _cholesky_effective_rank(
                namespace(self.lower), self.lower, self.damping
            )
        return float(self.rank_cache[0])


def _check_method(method: object) -> str:
    if method not in _METHODS:
        msg = f"`method` must be one of {_METHODS}; got {method!r}"
        raise ValueError(msg)
    return str(method)


def _absolute_damping(relative: float, mean_diag: float, name: str) -> float:
    """:math:`\\delta = \\text{damping} \\cdot \\operatorname{mean}(\\operatorname{diag} C)`."""
    if mean_diag <= 0.0:
        msg = (
            f"`{name}` is identically zero (mean diagonal {mean_diag:.3g}): it "
            "carries no information to whiten with; pass None for this "
            "statistic or collect calibration data that reaches this layer"
        )
        raise ValueError(msg)
    return relative * mean_diag


def _singular_error(name: str, rank: int, n: int) -> ValueError:
    msg = (
        f"`{name}` is singular (numerical rank {rank} of {n}) and damping=0: "
        "the whitening factor has no inverse. Raise `damping` (e.g. 1e-3) or "
        "add calibration samples"
    )
    return ValueError(msg)


def check_not_indefinite(
    name: str, lam_min: float, lam_max: float, n: int, unit: float, formed: float = 0.0
) -> None:
    r"""Refuse a covariance whose smallest eigenvalue is below rounding.

    The tolerance is :math:`\max(10\, n\, \epsilon\, \max(\lambda_{\max}, 0),
    \tau)`, with :math:`\tau` = ``formed`` the rounding level of how the
    covariance was formed (:func:`formation_tolerance`; 0 when it was formed
    in its own dtype).
    """
    tol = max(INDEFINITE_SLACK * n * unit * max(lam_max, 0.0), formed)
    if lam_min < -tol:
        why = (
            "sqrt(k) u tr C of its Gram products" if formed and tol == formed
            else "10 n eps lambda_max"
        )
        msg = (
            f"`{name}` is indefinite: smallest eigenvalue {lam_min:.3g} is below "
            f"the rounding tolerance -{tol:.3g} ({why}); a "
            "covariance must be positive semidefinite"
        )
        raise ValueError(msg)


def formation_tolerance(products: GramProducts | None, trace: float) -> float:
    r"""Rounding level :math:`\sqrt{k}\, u \operatorname{tr} C` of a formed Gram moment (0 if unknown).

    See :meth:`jactus_linalg.covariance.GramProducts.tolerance`.
    """
    return 0.0 if products is None else products.tolerance(trace)


def _eigh_operator(
    xp: ModuleType, cov: Array, relative: float, name: str, notes: list[str],
    products: GramProducts | None = None,
) -> WhiteningOperator:
    n = int(cov.shape[0])
    cov = (cov + cov.T) / 2
    mean_diag = float(xp.mean(xp.linalg.diagonal(cov)))
    lam, vecs = eigh(xp, cov)
    lam_max = float(lam[-1])
    lam_min = float(lam[0])
    check_not_indefinite(
        name, lam_min, lam_max, n, eps(xp, cov.dtype), formation_tolerance(products, n * mean_diag)
    )
    n_negative = int(xp.sum(xp.astype(lam < 0, xp.int64)))
    if n_negative:
        notes.append(
            f"{name}: clipped {n_negative} eigenvalue(s) in [{lam_min:.3g}, 0) "
            "to 0 (rounding)"
        )
        lam = xp.where(lam < 0, xp.zeros_like(lam), lam)
    delta = _absolute_damping(relative, mean_diag, name)
    rcond = n * eps(xp, cov.dtype)
    rank = int(xp.sum(xp.astype(lam > rcond * lam_max, xp.int64)))
    if delta == 0.0 and rank < n:
        raise _singular_error(name, rank, n)
    if rank < n:
        notes.append(
            f"{name}: numerical rank {rank} of {n} (fewer independent samples "
            f"than features, or dead units); damping delta={delta:.3g} makes "
            "the factor invertible"
        )
    roots = xp.sqrt(lam + delta)
    effective = float(n) if delta == 0.0 else float(xp.sum(lam / (lam + delta)))
    return WhiteningOperator(
        "eigh", n, None, vecs, roots, math.sqrt(delta), delta, relative, rank, lam,
        tuple(notes), [effective], {}, [None],
    )


def _cholesky_operator(
    xp: ModuleType, cov: Array, relative: float, name: str, notes: list[str],
    products: GramProducts | None = None,
) -> WhiteningOperator:
    # no symmetrizing pass: the Cholesky reads the lower triangle only, and
    # check_symmetric has bounded |C - C^T| by rounding
    n = int(cov.shape[0])
    diag = xp.linalg.diagonal(cov)
    mean_diag = float(xp.mean(diag))
    if mean_diag <= 0.0:
        # zero, or indefinite (negative definite, or a zero diagonal with nonzero
        # off-diagonal entries): the eigenvalues say which, as on the eigh path
        _eigh_operator(xp, (cov + cov.T) / 2, relative, name, [], products)
    delta = _absolute_damping(relative, mean_diag, name)
    if delta == 0.0:
        # A Cholesky of a singular C can succeed on rounding, and its pivots
        # do not reveal rank: let the eigenvalues decide (raises if C is
        # singular or indefinite), as the eigh path does.
        _eigh_operator(xp, (cov + cov.T) / 2, relative, name, [], products)
    damped = plus_diagonal(xp, cov, delta)
    lower = cholesky_lower(xp, damped)
    if lower is None:
        notes.append(
            f"{name}: Cholesky of C + delta I failed (not numerically positive "
            f"definite in {cov.dtype}); used the symmetric square root (eigh) "
            "instead"
        )
        return _eigh_operator(xp, (cov + cov.T) / 2, relative, name, notes, products)
    if delta > 0.0:
        slack = max(
            INDEFINITE_SLACK * n * eps(xp, cov.dtype) * float(xp.max(diag)),
            formation_tolerance(products, n * mean_diag),
        )
        bound = _indefinite_bound(xp, lower, delta, slack)
        if bound is not None:
            notes.append(
                f"{name}: C + {slack:.3g} I is not numerically positive definite (a "
                "Rayleigh quotient on the damped factor puts an eigenvalue of C at most "
                f"{bound:.3g}, which the damping would hide); used the symmetric square "
                "root (eigh) to check its spectrum"
            )
            return _eigh_operator(xp, (cov + cov.T) / 2, relative, name, notes, products)
    pivots = xp.linalg.diagonal(lower) ** 2
    return WhiteningOperator(
        "cholesky", n, lower, None, None, math.sqrt(delta), delta, relative, None,
        pivots, tuple(notes), [None], {}, [cov],
    )


def _indefinite_bound(xp: ModuleType, lower: Array, delta: float, slack: float) -> float | None:
    r"""An eigenvalue of :math:`C` proven below rounding, or ``None``.

    :math:`L L^\top = C + \delta I` exists whenever :math:`\lambda_\min(C) >
    -\delta`, so a successful Cholesky does not show that :math:`C` is
    positive semidefinite. A block Krylov estimate :math:`\theta \ge
    \lambda_\min(C + \delta I)` (:func:`_krylov_lambda_min`, on the factor
    already computed) replaces a second Cholesky (of :math:`C + s I`): if
    :math:`\theta - \delta < -s` with :math:`s = 10\,n\,\epsilon \max_i C_{ii}`,
    the same slack that second Cholesky used, then :math:`\lambda_\min(C) \le
    \theta - \delta < -s`, proven by a Rayleigh quotient, and the caller
    lets the eigenvalues decide (eigh: clip rounding, refuse the rest).
    """
    bound = _krylov_lambda_min(xp, lower) - delta
    return bound if bound < -slack else None


def _krylov_lambda_min(
    xp: ModuleType, lower: Array, block: int = CERTIFICATE_BLOCK, steps: int = CERTIFICATE_STEPS
) -> float:
    r"""Upper bound :math:`\theta \ge \lambda_\min(A)` for :math:`A = L L^\top`, from ``L``.

    Block Krylov (block Lanczos with full reorthogonalisation) on
    :math:`A^{-1} = L^{-\top} L^{-1}`, applied by two triangular solves per
    block: ``steps`` blocks of ``block`` vectors from a fixed-seed Gaussian
    start, then Rayleigh-Ritz, :math:`\theta = 1 / \sigma_\max(L^{-1} Q)^2`
    with :math:`Q` the orthonormal Krylov basis.

    Cost: :math:`2 \cdot \text{steps} \cdot \text{block} \cdot n^2` flops in
    triangular solves (``trsm``, 64 n^2 by default), against
    :math:`n^3/3` for a Cholesky: 7% of it at :math:`n = 3072`. Where
    ``block * steps >= n`` the Krylov space would be the whole space, and
    :math:`\theta = \sigma_\min(L)^2` exactly (an SVD of ``L``).

    :math:`\theta` is a Rayleigh quotient of :math:`A`, so
    :math:`\theta \ge \lambda_\min(A)` always (up to rounding, of order
    :math:`n \epsilon \lVert A \rVert`): a small :math:`\theta` proves a small
    eigenvalue. How close it comes follows the Kuczyński-Woźniakowski bound
    for Lanczos from a random start, :math:`P(\theta_{A^{-1}} <
    (1-\varepsilon)\lambda_\max(A^{-1})) \le 1.648\sqrt n
    e^{-\sqrt\varepsilon (2k-1)}` with :math:`k` = ``steps``, for each of
    the ``block`` independent start vectors: with the defaults an eigenvalue
    of :math:`A` at half of the rest's floor (:math:`\lambda_\min(C) = -\delta/2`
    under damping :math:`\delta`, :math:`\varepsilon = 0.45`) is missed with
    probability below :math:`(1.648\sqrt n\, e^{-10})^4`, about
    :math:`4 \cdot 10^{-10}` at :math:`n = 4096`.
    """
    n = int(lower.shape[0])
    if n <= block * steps:  # the Krylov space would be all of R^n: be exact
        sigma_min = float(svd_reduced(xp, lower)[1][-1])
        return sigma_min * sigma_min
    q = qr_reduced(xp, random_normal(xp, (n, block), lower.dtype, lower, seed=n))[0]
    bases, solved = [], []
    for _ in range(steps):
        x = solve_triangular(xp, lower, q, lower=True)  # L^{-1} Q_j
        bases.append(q)
        solved.append(x)
        y = solve_triangular(xp, lower, x, lower=True, transpose=True)  # A^{-1} Q_j
        basis = xp.concat(bases, axis=1)
        # block Gram-Schmidt twice, QR, then once more after the QR: where Y
        # is (nearly) in the span already, the QR's columns are noise that
        # must still be orthogonal to the basis for Rayleigh-Ritz to hold
        for _ in range(2):
            y = y - basis @ (basis.T @ y)
        q = qr_reduced(xp, y)[0]
        q = qr_reduced(xp, q - basis @ (basis.T @ q))[0]
    x = xp.concat(solved, axis=1)
    sigma_max = float(svd_reduced(xp, x)[1][0])
    return 1.0 / (sigma_max * sigma_max)


def _svd_llm_operator(
    xp: ModuleType, cov: Array, name: str, notes: list[str], products: GramProducts | None = None
) -> WhiteningOperator:
    r"""SVD-LLM's whitening: Cholesky of :math:`C`; where it fails, an eigenvalue shift.

    Transcribes the per-layer whitening of SVD-LLM (AIoT-MLSys-Lab/SVD-LLM,
    ``SVDLLM.py``, ``profle_svdllm``): ``torch.linalg.cholesky`` of the
    Gram matrix; on failure, ``eigvalsh``, then the Cholesky of
    :math:`C + (-\lambda_\min + 10^{-6}) I`. Here the fallback is reported
    in ``notes`` (SVD-LLM prints a warning), and an eigenvalue below the
    rounding tolerance :math:`-10 n \epsilon \lambda_\max` is refused as
    indefinite, as everywhere in this package (SVD-LLM would shift it too;
    a Gram matrix :math:`X^	op X` never has one).
    """
    n = int(cov.shape[0])
    mean_diag = float(xp.mean(xp.linalg.diagonal(cov)))
    _absolute_damping(0.0, mean_diag, name)  # refuses an all-zero C
    lower = cholesky_lower(xp, cov)
    if lower is not None:
        return WhiteningOperator(
            "cholesky", n, lower, None, None, 0.0, 0.0, 0.0, None,
            xp.linalg.diagonal(lower) ** 2, tuple(notes), [float(n)], {}, [None],
        )
    lam = eigvalsh(xp, cov)
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    check_not_indefinite(
        name, lam_min, lam_max, n, eps(xp, cov.dtype), formation_tolerance(products, n * mean_diag)
    )
    shift = -lam_min + SVD_LLM_FLOOR
    lower = cholesky_lower(xp, plus_diagonal(xp, cov, shift))
    if lower is None:
        msg = (
            f"`{name}`: SVD-LLM's shift -lambda_min + {SVD_LLM_FLOOR:g} = {shift:.3g} is "
            f"below rounding at this scale (lambda_max {lam_max:.3g}, {cov.dtype}): its "
            "Cholesky fails too; pass a relative damping (a number, e.g. 1e-3) instead"
        )
        raise ValueError(msg)
    rank = int(xp.sum(xp.astype(lam > n * eps(xp, cov.dtype) * lam_max, xp.int64)))
    notes.append(
        f"{name}: Cholesky of C failed (eigenvalues in [{lam_min:.3g}, {lam_max:.3g}], "
        f"numerical rank {rank} of {n}); SVD-LLM's fallback: added -lambda_min + "
        f"{SVD_LLM_FLOOR:g} = {shift:.3g} to the diagonal"
    )
    clipped = xp.where(lam < 0, xp.zeros_like(lam), lam)
    return WhiteningOperator(
        "cholesky", n, lower, None, None, math.sqrt(shift), shift, shift / mean_diag, rank,
        xp.linalg.diagonal(lower) ** 2, tuple(notes),
        [float(xp.sum(clipped / (clipped + shift)))], {}, [None],
    )


def _check_damping(damping: object) -> float | str:
    """A relative damping >= 0, or :data:`SVD_LLM`."""
    if isinstance(damping, str):
        if damping != SVD_LLM:
            msg = f"`damping` must be a number >= 0 or {SVD_LLM!r}; got {damping!r}"
            raise TypeError(msg)
        return damping
    return check_nonnegative(damping, "damping")


#: ``svd_precision`` policies of :func:`svd_dtype` (and of ``projected_lowrank`` /
#: ``plan_layer``): the weight's precision (default) or the working dtype.
SVD_PRECISIONS = ("weight", "working")


def svd_dtype(
    xp: ModuleType, weight_dtype: Any, work_dtype: Any, policy: str | None = "weight"
) -> Any:
    r"""dtype to run the SVD of the whitened weight in.

    The whitening factors are computed in ``work_dtype`` (float64 on CPU),
    and so is :math:`M = S_g^\top W S_x`. With ``policy="weight"`` (the
    default) the SVD of :math:`M` runs in the weight's own precision when
    that is lower (at least float32): a float32 weight holds about 7
    digits, float32 ``gesdd`` is about twice as fast as float64, and the
    measured cost is at most :math:`3 \cdot 10^{-9}` relative in the
    curvature error (Numerics page). With ``"working"`` (or ``None``) it
    runs in ``work_dtype``.

    Returns
    -------
    dtype or None
        ``None`` when the SVD runs in ``work_dtype`` (no cast); pass the
        result as ``svd_reduced(xp, M, dtype=...)``. Rank cut-offs after
        that SVD use this dtype's epsilon.

    Raises
    ------
    ValueError
        If ``policy`` is not ``"weight"``, ``"working"`` or ``None``.
    """
    if policy is None or policy == "working":
        return None
    if policy != "weight":
        msg = f"`svd_precision` must be one of {SVD_PRECISIONS}; got {policy!r}"
        raise ValueError(msg)
    target = xp.float32 if is_half(xp, weight_dtype) else weight_dtype
    if xp.result_type(target, work_dtype) == work_dtype and target != work_dtype:
        return target
    return None


def _cholesky_effective_rank(xp: ModuleType, lower: Array, delta: float) -> float:
    r"""Effective rank :math:`\operatorname{tr} C (C+\delta I)^{-1}` from the Cholesky factor.

    With :math:`L L^\top = C + \delta I` it is
    :math:`n - \delta \lVert L^{-1} \rVert_F^2`: one triangular inversion
    (:math:`n^3/3` flops, as many as the factorization), of
    :math:`L / \sqrt\delta`, whose inverse has entries of order one at any
    scale of :math:`C`.
    """
    n = int(lower.shape[0])
    if delta == 0.0:
        return float(n)
    scaled = lower / math.sqrt(delta)
    return max(0.0, float(n) - inverse_frobenius_squared(xp, scaled))


def _root_operator(
    xp: ModuleType, root: Array, method: str, relative: float, name: str, notes: list[str]
) -> WhiteningOperator:
    """Whiten :math:`C = R^T R` from ``R`` without forming :math:`R^T R`."""
    n = int(root.shape[1])
    delta = _absolute_damping(relative, float(xp.sum(root * root)) / n, name)
    rcond = n * eps(xp, root.dtype)
    if method == "cholesky":
        stacked = xp.concat([root, math.sqrt(delta) * eye(xp, n, root.dtype, root)], axis=0)
        upper = qr_r(xp, stacked)[:n, :]
        diag = xp.abs(xp.linalg.diagonal(upper))
        if float(xp.min(diag)) <= rcond * float(xp.max(diag)):
            rank = int(xp.sum(xp.astype(diag > rcond * float(xp.max(diag)), xp.int64)))
            if delta == 0.0:
                raise _singular_error(name, rank, n)
            msg = (
                f"`{name}` + delta I is numerically singular (rank {rank} of {n}): "
                f"delta={delta:.3g} (damping={relative:g}) is below rounding; raise `damping`"
            )
            raise ValueError(msg)
        return WhiteningOperator(
            "cholesky", n, upper.T, None, None, math.sqrt(delta), delta, relative,
            None, diag**2, tuple(notes), [None], {}, [None],
        )
    _, sing, vh = svd_reduced(xp, root)
    lam_top = sing**2
    k = int(lam_top.shape[0])
    # decide rank on the root's singular values: sigma > n eps sigma_max, not
    # lambda > n eps lambda_max, which would square the condition number
    rank = int(xp.sum(xp.astype(sing > rcond * float(sing[0]), xp.int64)))
    if delta == 0.0 and rank < n:
        raise _singular_error(name, rank, n)
    if rank < n:
        notes.append(
            f"{name}: numerical rank {rank} of {n}; damping delta={delta:.3g} "
            "makes the factor invertible"
        )
    spectrum = xp.flip(lam_top)
    if k < n:
        zeros = xp.zeros(n - k, dtype=root.dtype, device=device_of(root))
        spectrum = xp.concat([zeros, spectrum])
    effective = float(n) if delta == 0.0 else float(xp.sum(lam_top / (lam_top + delta)))
    return WhiteningOperator(
        "eigh", n, None, vh.T, xp.sqrt(lam_top + delta), math.sqrt(delta), delta,
        relative, rank, spectrum, tuple(notes), [effective], {}, [None],
    )


def whitening_operator(
    cov: Any,
    *,
    damping: float | str = DEFAULT_DAMPING,
    method: str = "eigh",
    name: str = "cov",
    dtype: Any = None,
    products: GramProducts | None = None,
) -> WhiteningOperator:
    """Factor ``cov`` (array or :class:`CovarianceRoot`) without forming ``S`` or ``S⁻¹``.

    Internal building block of :func:`whiten` and the low-rank routines; see
    :func:`whiten` for the parameters and errors.
    """
    if products is not None and not isinstance(products, GramProducts):
        msg = f"`products` must be a GramProducts or None; got {type(products).__name__}"
        raise TypeError(msg)
    method = _check_method(method)
    relative = _check_damping(damping)
    notes: list[str] = []
    if relative == SVD_LLM:
        if method != "cholesky":
            msg = (
                f"`damping`={SVD_LLM!r} is SVD-LLM's Cholesky of the Gram matrix: it needs "
                f"method='cholesky'; got method={method!r}"
            )
            raise ValueError(msg)
        if isinstance(cov, CovarianceRoot):  # SVD-LLM factors the Gram matrix itself
            check_array(cov.root, f"{name}.root")
            cov = cov.root.T @ cov.root
    if isinstance(cov, CovarianceRoot):
        assert not isinstance(relative, str)  # refused above
        root = cov.root
        check_array(root, f"{name}.root")
        xp = namespace(root)
        check_matrix(xp, root, f"{name}.root")
        work = decomposition_dtype(xp, root.dtype, *(() if dtype is None else (dtype,)))
        return _root_operator(xp, astype(xp, root, work), method, relative, name, notes)
    check_array(cov, name)
    xp = namespace(cov)
    check_matrix(xp, cov, name, square=True, finite=False)
    check_symmetric(xp, cov, name)  # and finite: the same pass
    work = decomposition_dtype(xp, cov.dtype, *(() if dtype is None else (dtype,)))
    cov = astype(xp, cov, work)
    if isinstance(relative, str):  # SVD_LLM
        return _svd_llm_operator(xp, cov, name, notes, products)
    if method == "cholesky":
        return _cholesky_operator(xp, cov, relative, name, notes, products)
    return _eigh_operator(xp, cov, relative, name, notes, products)


# --- products with S, S^T, S^{-1}, S^{-T}; ``None`` stands for the identity ---


def factor_transpose_times(op: WhiteningOperator | None, x: Array) -> Array:
    r""":math:`S^\top X`."""
    if op is None:
        return x
    if op.method == "cholesky":
        assert op.lower is not None  # a Cholesky operator always holds its factor
        return triangular_times(namespace(x), op.lower, x, lower=True, transpose=True)
    return _symmetric_apply(op, x, inverse=False)


def inverse_times(op: WhiteningOperator | None, x: Array) -> Array:
    r""":math:`S^{-1} X` (triangular or eigen solve)."""
    if op is None:
        return x
    if op.method == "cholesky":
        return solve_triangular(namespace(x), op.lower, x, lower=True)
    return _symmetric_apply(op, x, inverse=True)


def inverse_transpose_times(op: WhiteningOperator | None, x: Array) -> Array:
    r""":math:`S^{-\top} X` (triangular or eigen solve)."""
    if op is None:
        return x
    if op.method == "cholesky":
        return solve_triangular(namespace(x), op.lower, x, lower=True, transpose=True)
    return _symmetric_apply(op, x, inverse=True)


def _symmetric_apply(op: WhiteningOperator, x: Array, *, inverse: bool) -> Array:
    """Apply :math:`S = \\alpha I + Z\\,\\mathrm{diag}(d)\\,Z^T` or its inverse to ``x``."""
    z, roots = op.vectors, op.roots
    assert z is not None and roots is not None  # an eigh operator always holds both
    complete = int(z.shape[1]) == op.dim
    scale = 1.0 / roots if inverse else roots
    if complete:
        return z @ (scale[:, None] * (z.T @ x))
    floor = 1.0 / op.floor if inverse else op.floor
    correction = scale - floor
    return floor * x + z @ (correction[:, None] * (z.T @ x))


def _dense_factor(op: WhiteningOperator, like: Array) -> tuple[Array, Array]:
    """Materialize ``(S, S^{-1})``."""
    xp = namespace(like)
    dtype = op.spectrum.dtype
    identity = eye(xp, op.dim, dtype, op.spectrum)
    if op.method == "cholesky":
        return op.lower, solve_triangular(xp, op.lower, identity, lower=True)
    return _symmetric_apply(op, identity, inverse=False), _symmetric_apply(
        op, identity, inverse=True
    )


@finite_result
def whiten(
    cov: Any,
    *,
    damping: float | str = DEFAULT_DAMPING,
    method: str = "eigh",
    products: GramProducts | None = None,
) -> Whitening:
    r"""Whitening factor :math:`S` with :math:`S S^\top = C + \delta I`.

    Parameters
    ----------
    cov : (n, n) array_like or CovarianceRoot
        Symmetric positive semidefinite covariance :math:`C` (numpy,
        array-api-strict or torch; float16/bfloat16 are upcast to float32),
        or its root :math:`R` with :math:`R^\top R = C`.
    damping : float, optional
        Relative damping: :math:`\delta = \text{damping} \cdot
        \operatorname{mean}(\operatorname{diag} C)`. ``0`` asks for no
        damping, which fails on a singular ``cov``. Default ``1e-3``.
        ``"svd-llm"``: SVD-LLM's own numerics (``method="cholesky"`` only):
        no damping when the Cholesky of ``cov`` succeeds; when it fails,
        SVD-LLM's shift :math:`\delta = -\lambda_\min + 10^{-6}` (absolute,
        in the units of ``cov``), reported in ``notes``.
    method : {"eigh", "cholesky"}, optional
        Symmetric square root (robust, full spectrum) or lower Cholesky
        factor (fast). A Cholesky that fails falls back once to ``eigh``
        and says so in ``notes``. With damping :math:`\delta > 0`, a
        block Krylov estimate on the damped factor (not a second Cholesky)
        refuses an indefinite ``cov`` that the damping made factorable; see
        the Notes.
    products : GramProducts, optional
        How a Gram ``cov`` was formed (``MomentAccumulator.gram_products``):
        products in float32 over :math:`k` rows leave rounding of order
        :math:`\sqrt{k}\, u_{32} \operatorname{tr} C` in a float64 array,
        and the indefiniteness tolerance below becomes the larger of the
        two. ``None``: formed in its own dtype.

    Returns
    -------
    Whitening
        ``factor``, ``inverse``, ``damping`` (absolute :math:`\delta`),
        ``relative_damping``, ``method``, ``effective_rank``,
        ``numerical_rank``, ``spectrum`` and ``notes``, as arrays of the
        input's kind on its device.

    Raises
    ------
    TypeError
        If ``cov`` is not a real floating array, or ``damping`` is a string
        other than ``"svd-llm"``.
    ValueError
        If ``cov`` is not 2-D and square, holds NaN/Inf, is not symmetric to
        within :math:`10 n \epsilon`, is indefinite beyond rounding
        (:math:`\lambda_\min < -10 n \epsilon \lambda_\max`, or below
        ``products``' tolerance when that is larger), is identically
        zero, or is singular while ``damping=0``; if ``damping`` is negative
        or ``method`` unknown; if ``damping="svd-llm"`` with ``method="eigh"``,
        or its shift is below rounding at the scale of ``cov``.

    Notes
    -----
    Eigenvalues in :math:`[-10 n \epsilon \lambda_\max, 0)` are rounding and
    are clipped to zero (reported in ``notes``). ``method="eigh"`` refuses
    every eigenvalue below that. ``method="cholesky"`` with
    :math:`\delta > 0` refuses :math:`\lambda_\min \le -\delta` (the damped
    Cholesky fails and eigh decides) and any eigenvalue its Krylov estimate
    proves below :math:`-10 n \epsilon \max_i C_{ii}`; it finds
    :math:`\lambda_\min \le -\delta/2` except with probability below
    :math:`10^{-8}` for :math:`n \le 10^4` (Kuczyński-Woźniakowski bound),
    and in practice much shallower negatives (measured on the Numerics page). With :math:`\delta > 0`,
    :math:`\kappa(S)^2 = (\lambda_\max + \delta)/\delta \le 1 + n/\text{damping}`,
    so the factor is always well defined, whatever the rank of :math:`C`.
    Both methods give the same whitened norm: :math:`L = S_\text{sym} O`
    with :math:`O` orthogonal.

    References
    ----------
    .. [1] J. Martens, R. Grosse, "Optimizing Neural Networks with
       Kronecker-factored Approximate Curvature", ICML 2015.
    .. [2] X. Wang et al., "SVD-LLM: Truncation-aware Singular Value
       Decomposition for Large Language Model Compression", ICLR 2025.
    """
    op = whitening_operator(cov, damping=damping, method=method, products=products)
    like = cov.root if isinstance(cov, CovarianceRoot) else cov
    factor, inverse = _dense_factor(op, like)
    return Whitening(
        factor=factor,
        inverse=inverse,
        damping=op.damping,
        relative_damping=op.relative_damping,
        method=op.method,
        effective_rank=op.effective_rank,
        numerical_rank=op.numerical_rank,
        spectrum=op.spectrum,
        notes=op.notes,
    )


# --- whitened coordinates -----------------------------------------------------


def whitened_weight(
    weight: Array, grad_op: WhiteningOperator | None, input_op: WhiteningOperator | None
) -> Array:
    r"""Whitened weight :math:`M = S_g^\top W S_x`, shape ``(m, n)``."""
    right = factor_transpose_times(input_op, weight.T).T  # W S_x
    return factor_transpose_times(grad_op, right)


def whitened_gradient(
    grad_mean: Array, grad_op: WhiteningOperator | None, input_op: WhiteningOperator | None
) -> Array:
    r"""Whitened gradient :math:`\Gamma = S_g^{-1} G S_x^{-\top}`, the gradient with respect to :math:`M`."""
    right = inverse_times(input_op, grad_mean.T).T  # G S_x^{-T}
    return inverse_times(grad_op, right)


def unwhitened_weight(
    whitened: Array, grad_op: WhiteningOperator | None, input_op: WhiteningOperator | None
) -> Array:
    r""":math:`W = S_g^{-\top} M S_x^{-1}` (inverse of :func:`whitened_weight`)."""
    right = inverse_transpose_times(input_op, whitened.T).T  # M S_x^{-1}
    return inverse_transpose_times(grad_op, right)
