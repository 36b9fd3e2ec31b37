"""Backend shim: the only module that imports array-api-compat, scipy or torch.

Every backend quirk lives here:

* namespace dispatch (numpy, array-api-strict, torch on CPU or CUDA);
* triangular solves, which the array-API standard does not define;
* upcasting of float16 / bfloat16 for decompositions (LAPACK, cuSOLVER and
  torch refuse SVD, QR, Cholesky and eigh in half precision);
* conversion to host numpy for the few small, host-side decisions (rank
  counts, allocation) the algorithms need.

torch is never imported here at module load: it is only touched through the
namespace of an array that already *is* a torch tensor, so that
``import jactus_linalg`` stays torch-free.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np
import scipy.linalg

Array = Any

__all__ = [
    "Array",
    "all_finite",
    "as_numpy",
    "astype",
    "cholesky_lower",
    "count_nonfinite",
    "decomposition_dtype",
    "device_of",
    "eigh",
    "eigh_top",
    "eigvalsh",
    "eps",
    "eye",
    "is_floating",
    "is_numpy",
    "is_torch",
    "library_name",
    "namespace",
    "qr_r",
    "qr_reduced",
    "random_normal",
    "same_library",
    "solve_triangular",
    "sum_of_squares",
    "svd_reduced",
    "to_float",
    "triangular_times",
]


def namespace(*arrays: Array, xp: ModuleType | None = None) -> ModuleType:
    """Return the array-API namespace shared by ``arrays`` (or ``xp`` itself).

    Raises
    ------
    TypeError
        If ``arrays`` come from different libraries (numpy and torch, say).
    """
    if xp is not None:
        return xp
    present = [a for a in arrays if a is not None]
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as err:
        kinds = sorted({f"{type(a).__module__}.{type(a).__name__}" for a in present})
        msg = (
            f"arrays from different libraries in one call ({', '.join(kinds)}): pass every "
            "array as a numpy array, or every array as a torch tensor"
        )
        raise TypeError(msg) from err


def library_name(xp: ModuleType) -> str:
    """``"numpy"``, ``"torch"``, or the module name of another array-API namespace."""
    if is_numpy(xp):
        return "numpy"
    if is_torch(xp):
        return "torch"
    return str(getattr(xp, "__name__", xp))


def same_library(xp: ModuleType, x: Array) -> bool:
    """True if ``x`` is an array of the library behind ``xp``."""
    try:
        own = array_api_compat.array_namespace(x)
    except TypeError:
        return False
    return library_name(own) == library_name(xp)


def is_torch(xp: ModuleType) -> bool:
    return bool(array_api_compat.is_torch_namespace(xp))


def is_numpy(xp: ModuleType) -> bool:
    return bool(array_api_compat.is_numpy_namespace(xp))


def device_of(x: Array) -> Any:
    return array_api_compat.device(x)


def is_floating(xp: ModuleType, dtype: Any) -> bool:
    """True for real floating dtypes, half precision included."""
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        return False


def is_half(xp: ModuleType, dtype: Any) -> bool:
    """True for float16 and (torch) bfloat16."""
    if is_torch(xp):
        import torch  # noqa: PLC0415  (only reached for torch tensors)

        return dtype in (torch.float16, torch.bfloat16)
    return dtype == xp.float16 if hasattr(xp, "float16") else False


def eps(xp: ModuleType, dtype: Any) -> float:
    """Machine epsilon of ``dtype``."""
    return float(xp.finfo(dtype).eps)


def decomposition_dtype(xp: ModuleType, *dtypes: Any) -> Any:
    """Working dtype for decompositions: the promoted dtype, at least float32.

    Half-precision inputs (float16, bfloat16) are upcast to float32, because
    the LAPACK / cuSOLVER routines behind SVD, QR, Cholesky and eigh do not
    exist in half precision.
    """
    promoted = dtypes[0]
    try:
        for dt in dtypes[1:]:
            promoted = xp.result_type(promoted, dt)
    except (TypeError, AttributeError) as err:  # a dtype of another library
        msg = (
            f"arrays from different libraries in one call (dtypes {', '.join(map(str, dtypes))}, "
            f"working in {library_name(xp)}): pass every array as a numpy array, or every "
            "array as a torch tensor"
        )
        raise TypeError(msg) from err
    if is_half(xp, promoted):
        return xp.float32
    return promoted


def astype(xp: ModuleType, x: Array, dtype: Any) -> Array:
    if x.dtype == dtype:
        return x
    return xp.astype(x, dtype)


def eye(xp: ModuleType, n: int, dtype: Any, like: Array) -> Array:
    return xp.eye(n, dtype=dtype, device=device_of(like))


def plus_diagonal(xp: ModuleType, a: Array, value: float) -> Array:
    """A new array ``a + value * I``, without building the identity where the backend allows."""
    if is_numpy(xp):
        out = a.copy()
        out.flat[:: a.shape[0] + 1] += value
        return out
    if is_torch(xp):
        out = a.clone()
        out.diagonal().add_(value)
        return out
    return a + value * eye(xp, int(a.shape[0]), a.dtype, a)


def inverse_frobenius_squared(xp: ModuleType, lower: Array) -> float:
    r""":math:`\lVert L^{-1} \rVert_F^2 = \operatorname{tr} (L L^\top)^{-1}` for lower-triangular ``L``.

    ``L`` must hold zeros above its diagonal.

    numpy: LAPACK ``trtri`` through scipy (:math:`n^3/3` flops, a third of a
    solve against the identity); torch on any device: ``cholesky_inverse``
    (``potri``) through torch's own LAPACK (MKL on CPU), never scipy's: a
    scipy (OpenBLAS) call between torch's MKL calls leaves OpenBLAS threads
    spinning and slows the next MKL SVD 2-3x on a small machine (issue 17);
    other namespaces: a solve against the identity.
    """
    if is_numpy(xp):
        (trtri,) = scipy.linalg.get_lapack_funcs(("trtri",), (lower,))
        # trtri copies the strict upper triangle through: zero in the factors
        # this package builds (cholesky_lower, the transpose of qr_r)
        inv, info = trtri(lower, lower=1)
        if info != 0:
            return math.inf
        return float(np.einsum("ij,ij->", inv, inv))
    if is_torch(xp):
        return _inverse_frobenius_squared_on_device(lower)
    n = int(lower.shape[0])
    inv = xp.linalg.solve(lower, eye(xp, n, lower.dtype, lower))
    return float(xp.sum(inv * inv))


def _inverse_frobenius_squared_on_device(lower: Array) -> float:
    """torch on any device: the trace of ``cholesky_inverse`` (``potri``), computed where ``lower`` lives."""
    import torch  # noqa: PLC0415

    return float(torch.diagonal(torch.cholesky_inverse(lower)).sum())


def all_finite(xp: ModuleType, x: Array) -> bool:
    return bool(xp.all(xp.isfinite(x)))


def count_nonfinite(xp: ModuleType, x: Array) -> tuple[int, int]:
    """Return ``(number of NaN, number of ±Inf)`` in ``x``."""
    n_nan = int(xp.sum(xp.astype(xp.isnan(x), xp.int64)))
    n_inf = int(xp.sum(xp.astype(xp.isinf(x), xp.int64)))
    return n_nan, n_inf


def sum_of_squares(xp: ModuleType, x: Array) -> Array:
    """``‖x‖_F²`` as a 0-d array (no host transfer)."""
    return xp.sum(x * x)


def to_float(x: Array) -> float:
    """Host Python float of a 0-d array."""
    return float(x)


def as_numpy(x: Array) -> np.ndarray:
    """Copy an array of any supported backend to host numpy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError):
        return np.asarray(x)


def svd_reduced(xp: ModuleType, a: Array, *, dtype: Any = None) -> tuple[Array, Array, Array]:
    """Thin SVD ``a = U diag(s) Vh`` (LAPACK gesdd on CPU).

    ``dtype`` (e.g. float32 for a float64 ``a``): decompose a copy of ``a``
    in that dtype and return the factors cast back to ``a``'s dtype. See
    :func:`jactus_linalg.whitening.svd_dtype` for when that is accurate.
    """
    if dtype is not None and dtype != a.dtype:
        u, s, vh = svd_reduced(xp, astype(xp, a, dtype))
        return astype(xp, u, a.dtype), astype(xp, s, a.dtype), astype(xp, vh, a.dtype)
    if is_numpy(xp):
        u, s, vh = scipy.linalg.svd(
            a, full_matrices=False, check_finite=False, lapack_driver="gesdd"
        )
        return u, s, vh
    u, s, vh = xp.linalg.svd(a, full_matrices=False)
    return u, s, vh


def qr_r(xp: ModuleType, a: Array) -> Array:
    """Triangular factor ``R`` of a Householder QR of ``a`` (``Q`` is not formed)."""
    if is_numpy(xp):
        _, r = scipy.linalg.qr(a, mode="raw", check_finite=False)
        return r
    if is_torch(xp):
        import torch  # noqa: PLC0415

        return torch.linalg.qr(a, mode="r")[1]
    return xp.linalg.qr(a, mode="reduced")[1]


def qr_reduced(xp: ModuleType, a: Array) -> tuple[Array, Array]:
    """Reduced Householder QR ``a = Q R``."""
    if is_numpy(xp):
        q, r = scipy.linalg.qr(a, mode="economic", check_finite=False)
        return q, r
    q, r = xp.linalg.qr(a, mode="reduced")
    return q, r


def eigvalsh(xp: ModuleType, a: Array) -> Array:
    """Eigenvalues of a symmetric matrix, ascending (no eigenvectors)."""
    if is_numpy(xp):
        return scipy.linalg.eigh(a, eigvals_only=True, check_finite=False, driver="evd")
    return xp.linalg.eigvalsh(a)


def random_normal(xp: ModuleType, shape: tuple[int, int], dtype: Any, like: Array, seed: int) -> Array:
    """Standard normal ``shape`` array of ``like``'s kind and device, from a fixed seed.

    Drawn by numpy on the host (same numbers on every backend), then moved.
    """
    host = np.random.default_rng(seed).standard_normal(shape)
    if is_torch(xp):
        import torch  # noqa: PLC0415

        return torch.from_numpy(host).to(device=like.device, dtype=dtype)
    return xp.asarray(host, dtype=dtype, device=device_of(like))


def diag_matrix(xp: ModuleType, s: Array) -> Array:
    """Square diagonal matrix from a vector (array-API has no ``diag``)."""
    r = int(s.shape[0])
    eye = xp.eye(r, dtype=s.dtype, device=device_of(s))
    return eye * s[None, :]


def eigh(xp: ModuleType, a: Array) -> tuple[Array, Array]:
    """Symmetric eigendecomposition, eigenvalues ascending."""
    if is_numpy(xp):
        w, v = scipy.linalg.eigh(a, check_finite=False, driver="evd")
        return w, v
    w, v = xp.linalg.eigh(a)
    return w, v


#: :func:`eigh_top` computes only the top ``j`` eigenpairs when ``j <=`` this x n.
EIGH_SUBSET_FRACTION = 0.5


def eigh_top(xp: ModuleType, a: Array, j: int) -> tuple[Array, Array]:
    """The top ``j`` (at least) eigenpairs of a symmetric matrix, eigenvalues ascending.

    numpy: LAPACK ``syevr`` (MRRR) on the index range ``[n - j, n - 1]``
    through scipy when ``j <= n/2``: the tridiagonal reduction, then only
    ``j`` eigenvectors and their back-transformation (6x faster than the full
    ``syevd`` at n = 768, j = 70). Otherwise, and on other namespaces (torch
    has no subset eigensolver), the full decomposition: callers may use
    every pair returned.
    """
    n = int(a.shape[0])
    if is_numpy(xp) and j <= EIGH_SUBSET_FRACTION * n:
        w, v = scipy.linalg.eigh(
            a, subset_by_index=[n - j, n - 1], driver="evr", check_finite=False
        )
        return w, v
    return eigh(xp, a)


def cholesky_lower(xp: ModuleType, a: Array) -> Array | None:
    """Lower Cholesky factor of ``a``, or ``None`` if ``a`` is not numerically PD.

    Failure is reported to the caller (never retried here): the caller decides
    what to do and says so in its result.
    """
    if is_numpy(xp):
        try:
            return scipy.linalg.cholesky(a, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return None
    if is_torch(xp):
        import torch  # noqa: PLC0415

        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return None
        return factor
    try:
        factor = xp.linalg.cholesky(a)
    except (np.linalg.LinAlgError, ValueError):
        return None
    if not all_finite(xp, factor):
        return None
    return factor


def triangular_times(xp: ModuleType, tri: Array, x: Array, *, lower: bool, transpose: bool = False) -> Array:
    """``op(tri) @ x`` for triangular ``tri`` (``op`` the transpose if asked).

    numpy (float32/float64): BLAS ``trmm``, half the flops of a general
    product, on the arrays' own memory layout (a C-ordered matrix is the
    Fortran-ordered transpose: the triangle and the transpose flag flip, no
    copy of ``tri``). Other namespaces (torch has no ``trmm``): ``@``, which
    reads the zeros too. Only the ``lower`` (or upper) triangle of ``tri``
    is read by ``trmm``; the factors this package builds hold zeros in the
    other one.
    """
    if not (is_numpy(xp) and tri.dtype == x.dtype and tri.dtype in (np.float32, np.float64)):
        op = tri.T if transpose else tri
        return op @ x
    (trmm,) = scipy.linalg.get_blas_funcs(("trmm",), (tri, x))
    if tri.flags.f_contiguous:
        a, a_lower, a_trans = tri, lower, transpose
    else:  # C-ordered tri is the Fortran-ordered tri.T: flip the triangle and the transpose
        a, a_lower, a_trans = np.ascontiguousarray(tri).T, not lower, not transpose
    if x.flags.f_contiguous:
        return trmm(1.0, a, x, side=0, lower=int(a_lower), trans_a=int(a_trans))
    # (op(T) X)^T = X^T op(T)^T, and X^T is Fortran-ordered
    xt = np.ascontiguousarray(x).T
    return trmm(1.0, a, xt, side=1, lower=int(a_lower), trans_a=int(not a_trans)).T


def solve_triangular(
    xp: ModuleType,
    a: Array,
    b: Array,
    *,
    lower: bool,
    transpose: bool = False,
) -> Array:
    """Solve ``op(a) X = b`` for triangular ``a``; ``op`` is the transpose if asked.

    numpy uses LAPACK ``trtrs`` through scipy, torch its native kernel (CPU
    and CUDA). Namespaces without a triangular solver (array-api-strict) fall
    back to the standard's general ``solve``, which gives the same answer at
    LU cost.
    """
    if is_numpy(xp):
        return scipy.linalg.solve_triangular(
            a, b, lower=lower, trans=1 if transpose else 0, check_finite=False
        )
    if is_torch(xp):
        import torch  # noqa: PLC0415

        if transpose:
            return torch.linalg.solve_triangular(a.mT, b, upper=lower)
        return torch.linalg.solve_triangular(a, b, upper=not lower)
    op = a.T if transpose else a
    return xp.linalg.solve(op, b)
