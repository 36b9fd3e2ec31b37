"""Argument validation shared by the public functions.

Every message names the argument, says what was expected and what was seen,
and where it helps, what to do instead.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from types import ModuleType

import numpy as np

from ._backend import (
    Array,
    count_nonfinite,
    eps,
    is_floating,
    library_name,
    namespace,
    same_library,
)

__all__ = [
    "check_array",
    "check_finite",
    "check_fraction",
    "check_matrix",
    "check_nonnegative",
    "check_rank",
    "check_same_library",
    "check_symmetric",
    "symmetry_tolerance",
]


def check_array(x: object, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``x`` looks like an array.

    Called before the array namespace is looked up, so that a list or a
    scalar gets a message naming the argument.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        msg = f"`{name}` must be an array; got {type(x).__name__}"
        raise TypeError(msg)


def check_matrix(
    xp: ModuleType,
    x: Array,
    name: str,
    *,
    square: bool = False,
    rows: int | None = None,
    cols: int | None = None,
    finite: bool = True,
) -> None:
    """Check that ``x`` is a finite, real floating 2-D array of the given shape.

    ``finite=False`` leaves the finiteness to the caller (a covariance's
    :func:`check_symmetric` reads every entry anyway and checks it there).
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        msg = f"`{name}` must be an array; got {type(x).__name__}"
        raise TypeError(msg)
    check_same_library(xp, **{name: x})
    if len(x.shape) != 2:
        msg = f"`{name}` must be 2-D; got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if not is_floating(xp, x.dtype):
        msg = f"`{name}` must have a real floating dtype; got {x.dtype}"
        raise TypeError(msg)
    m, n = x.shape
    if m == 0 or n == 0:
        msg = f"`{name}` must be non-empty; got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if square and m != n:
        msg = f"`{name}` must be square; got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if rows is not None and m != rows:
        msg = f"`{name}` must have {rows} rows; got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if cols is not None and n != cols:
        msg = f"`{name}` must have {cols} columns; got shape {tuple(x.shape)}"
        raise ValueError(msg)
    if finite:
        check_finite(xp, x, name)


def check_same_library(xp: ModuleType, **arrays: object) -> None:
    """Raise ``TypeError`` naming each array (``None`` skipped) not of ``xp``'s library.

    numpy arrays and torch tensors cannot meet in one computation; the
    message names the arguments and the libraries seen.
    """
    foreign = {
        name: f"{type(x).__module__}.{type(x).__name__}"
        for name, x in arrays.items()
        if x is not None and hasattr(x, "shape") and not same_library(xp, x)
    }
    if foreign:
        seen = ", ".join(f"`{name}` is a {kind}" for name, kind in foreign.items())
        msg = (
            f"{seen}, but this call works on {library_name(xp)} arrays (from its first "
            "array argument): pass every array as a numpy array, or every array as a "
            "torch tensor"
        )
        raise TypeError(msg)


def check_finite(xp: ModuleType, x: Array, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or Inf."""
    if bool(xp.all(xp.isfinite(x))):
        return
    n_nan, n_inf = count_nonfinite(xp, x)
    msg = f"`{name}` contains non-finite values ({n_nan} NaN, {n_inf} Inf)"
    raise ValueError(msg)


def symmetry_tolerance(xp: ModuleType, x: Array) -> float:
    """Relative asymmetry allowed in a covariance: ``10 · n · eps(dtype)``."""
    n = int(x.shape[0])
    return 10.0 * n * eps(xp, x.dtype)


#: Tile size of :func:`check_symmetric` (a 128 x 128 float64 tile pair fits in L2).
SYMMETRY_TILE = 128


def _asymmetry_and_scale(xp: ModuleType, x: Array, tile: int = SYMMETRY_TILE) -> tuple[float, float]:
    """``(max |x - x^T|, max |x|)`` from tile pairs on and above the diagonal; NaN if any entry is.

    Tile ``(i, j)`` is compared with the transpose of tile ``(j, i)`` while
    both are in cache, so no transposed copy of ``x`` is formed (a strided
    pass over all of ``x``, 1.2 s at n = 3072 on 2 cores) and each pair is
    read once. A NaN or Inf entry makes its tile's ``max |x|`` non-finite,
    which is returned as the scale (so the same pass checks finiteness).
    """
    n = int(x.shape[0])
    asym = scale = 0.0
    for i in range(0, n, tile):
        i_end = min(i + tile, n)  # array-api-strict refuses slices past the end
        for j in range(i, n, tile):
            j_end = min(j + tile, n)
            upper, lower = x[i:i_end, j:j_end], x[j:j_end, i:i_end]
            top, bottom = float(xp.max(xp.abs(upper))), float(xp.max(xp.abs(lower)))
            if not (math.isfinite(top) and math.isfinite(bottom)):
                return math.nan, math.nan
            scale = max(scale, top, bottom)
            asym = max(asym, float(xp.max(xp.abs(upper - lower.T))))
    return asym, scale


def check_symmetric(xp: ModuleType, x: Array, name: str) -> None:
    r"""Raise ``ValueError`` naming ``name`` if ``x`` is not symmetric up to rounding.

    Refuses :math:`\max_{ij} |x_{ij} - x_{ji}| > 10\, n\, \epsilon \max_{ij} |x_{ij}|`,
    computed exactly (no sampling), tile by tile; in the same pass, raises the
    message of :func:`check_finite` if ``x`` holds NaN or Inf.
    """
    asym, scale = _asymmetry_and_scale(xp, x)
    if not math.isfinite(scale):
        check_finite(xp, x, name)  # raises, naming the NaN and Inf counts
    if scale == 0.0:
        return
    tol = symmetry_tolerance(xp, x)
    if asym > tol * scale:
        msg = (
            f"`{name}` must be symmetric; max |C - C^T| = {asym:.3g} exceeds "
            f"{tol:.3g} x max |C| = {tol * scale:.3g}"
        )
        raise ValueError(msg)


def check_rank(rank: object, limit: int, name: str = "rank", *, what: str = "") -> int:
    """Check that ``rank`` is an integer in ``[1, limit]``; return it as ``int``."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        msg = f"`{name}` must be an integer; got {rank!r}"
        raise TypeError(msg)
    r = int(rank)
    if r < 1:
        msg = f"`{name}` must be at least 1; got {r}"
        raise ValueError(msg)
    if r > limit:
        where = f" ({what})" if what else ""
        msg = f"`{name}` must be at most {limit}{where}; got {r}"
        raise ValueError(msg)
    return r


def check_nonnegative(value: object, name: str) -> float:
    """Check a finite, non-negative real scalar; return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"`{name}` must be a real number; got {value!r}"
        raise TypeError(msg)
    v = float(value)
    if not math.isfinite(v) or v < 0:
        msg = f"`{name}` must be finite and >= 0; got {v!r}"
        raise ValueError(msg)
    return v


def check_fraction(
    value: object, name: str, *, include_zero: bool = False
) -> float:
    """Check ``value`` lies in ``(0, 1]`` (or ``[0, 1]``); return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"`{name}` must be a real number; got {value!r}"
        raise TypeError(msg)
    v = float(value)
    low_ok = v >= 0 if include_zero else v > 0
    if not (math.isfinite(v) and low_ok and v <= 1):
        interval = "[0, 1]" if include_zero else "(0, 1]"
        msg = f"`{name}` must lie in {interval}; got {v!r}"
        raise ValueError(msg)
    return v


def _nonfinite_field(out: object) -> str | None:
    """Name of the first non-finite float or array in a (NamedTuple) result, if any."""
    fields = out._asdict().items() if hasattr(out, "_asdict") else [("result", out)]
    for name, value in fields:
        if isinstance(value, float) and not math.isfinite(value):
            return name
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            try:
                xp = namespace(value)
            except TypeError:
                continue
            if is_floating(xp, value.dtype) and not bool(xp.all(xp.isfinite(value))):
                return name
        if isinstance(value, list | tuple) and not hasattr(value, "_asdict"):
            for item in value:
                if hasattr(item, "shape") and _nonfinite_field(item) is not None:
                    return name
    return None


def finite_result(fn: Callable) -> Callable:
    """Run ``fn`` with numpy floating-point warnings silenced, then insist on a finite result.

    Finite inputs whose magnitudes overflow the working dtype mid-computation
    (squares of ~1e154 in float64, say) give a ``ValueError`` that says so,
    never a NaN or a stray ``RuntimeWarning``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            out = fn(*args, **kwargs)
        bad = _nonfinite_field(out)
        if bad is not None:
            msg = (
                f"{fn.__name__}: the computation overflowed (`{bad}` is not finite): "
                "the inputs' magnitudes are too large for the working dtype; rescale them"
            )
            raise ValueError(msg)
        return out

    return wrapper


def check_no_overflow(xp: ModuleType, x: Array, what: str) -> None:
    """Raise ``ValueError`` if an intermediate result overflowed."""
    if not bool(xp.all(xp.isfinite(x))):
        msg = (
            f"overflow while computing the {what} in {x.dtype}: the inputs' "
            "magnitudes are too large; rescale them"
        )
        raise ValueError(msg)
