r"""Streaming second-moment statistics of a linear layer.

For a layer :math:`y = W x + b` (``W`` of shape ``(m, n)``) and calibration
tokens :math:`t = 1, \dots, N`, JACTUS needs

.. math::

    C_x = \frac1N \sum_t x_t x_t^\top, \qquad
    C_g = \frac1N \sum_t g_t g_t^\top, \qquad
    G = \frac1N \sum_t g_t x_t^\top,

with :math:`g_t = \partial \mathcal L / \partial y_t` the pre-activation
gradient. ``C_x`` is uncentered, like the K-FAC input factor. The
accumulators here stream these sums over batches of any leading shape, in
float64 by default (float32 on CUDA), keep the sample count, and merge.

``mode="qr"`` keeps a triangular factor :math:`R` with
:math:`R^\top R = \sum_t x_t x_t^\top` instead of the Gram matrix (a streamed
QR: :math:`R \leftarrow \operatorname{qr}([R; X_\text{batch}])`). Whitening
from :math:`R` never forms the Gram matrix, so it never squares the
condition number (:func:`jactus_linalg.whiten` accepts the resulting
:class:`CovarianceRoot`).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._backend import (
    Array,
    astype,
    count_nonfinite,
    decomposition_dtype,
    device_of,
    is_torch,
    library_name,
    namespace,
    qr_r,
    same_library,
)

__all__ = [
    "PRODUCTS",
    "CovarianceRoot",
    "CrossMomentAccumulator",
    "GramProducts",
    "LayerStatistics",
    "MomentAccumulator",
]

_MODES = ("gram", "qr")

#: Where a batch's Gram product :math:`X^\top X` is computed: in the accumulation
#: dtype (default), or in the batch's own (compute) dtype, at least float32.
PRODUCTS = ("accumulation", "compute")

#: Unit roundoff :math:`u = \epsilon / 2` of the dtypes a Gram product runs in.
_UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}


class GramProducts(NamedTuple):
    r"""How a Gram moment :math:`C = \frac1N \sum_b X_b^\top X_b` was formed.

    Each batch's product :math:`X_b^\top X_b` ran in ``dtype`` over at most
    ``rows`` rows (its inner dimension :math:`k`), and the products were
    summed in the accumulation dtype. The whitening's indefiniteness check
    uses :meth:`tolerance` as the rounding level of :math:`C`.

    Attributes
    ----------
    dtype : {"float32", "float64"}
        The coarsest dtype any product ran in.
    rows : int
        The most rows in one product.
    """

    dtype: str
    rows: int

    @property
    def unit(self) -> float:
        """Unit roundoff :math:`u` of ``dtype`` (:math:`2^{-24}` for float32)."""
        return _UNIT_ROUNDOFF[self.dtype]

    def tolerance(self, trace: float) -> float:
        r"""Rounding level :math:`\sqrt{k}\, u \operatorname{tr} C` of the formed moment.

        A product :math:`\widehat{X^\top X} = X^\top X + E` summed over
        :math:`k` rows has :math:`|E| \le \gamma |X|^\top |X|` entrywise,
        with :math:`\gamma = k u` in the worst case and :math:`\gamma =
        \lambda \sqrt{k}\, u` with high probability for a moderate
        :math:`\lambda` (Higham and Mary's probabilistic analysis, rounding
        errors independent and of mean zero). So :math:`\lVert E \rVert_2
        \le \lVert E \rVert_F \le \gamma \lVert X \rVert_F^2 = \gamma
        \operatorname{tr}(X^\top X)`, and summing batches (each with at most
        ``rows`` rows) and dividing by :math:`N` gives :math:`\lVert E
        \rVert_2 \le \gamma \operatorname{tr} C`. The tolerance takes
        :math:`\lambda = 1`: the eigenvalues that float32 products actually
        push below zero stay within a few percent of it in every case
        measured (Numerics page, ``validation/bench_products.py --only
        margin``, and the tests), while an
        eigenvalue of :math:`-10^{-2} \lambda_\max` is still refused
        whenever :math:`\sqrt{k}\, u \operatorname{tr} C < 10^{-2}
        \lambda_\max` (float32, :math:`k = 1576` rows: whenever
        :math:`\operatorname{tr} C / \lambda_\max < 4200`).

        Parameters
        ----------
        trace : float
            :math:`\operatorname{tr} C` of the (mean) moment.

        References
        ----------
        .. [1] N. J. Higham, T. Mary, "A New Approach to Probabilistic
           Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019.
        """
        return math.sqrt(self.rows) * self.unit * max(trace, 0.0)

    def combine(self, other: GramProducts | None) -> GramProducts:
        """The coarser dtype and the larger row count of the two."""
        if other is None:
            return self
        dtype = "float32" if "float32" in (self.dtype, other.dtype) else "float64"
        return GramProducts(dtype, max(self.rows, other.rows))


class CovarianceRoot(NamedTuple):
    r"""A second moment held in square-root form.

    Attributes
    ----------
    root : (p, n) array
        Upper-triangular (or trapezoidal, while ``p < n``) factor with
        :math:`\text{root}^\top \text{root} = C`, the *mean* second moment.
    n_samples : int
        Number of samples behind ``C``.
    """

    root: Array
    n_samples: int


class LayerStatistics(NamedTuple):
    """Calibration statistics of one linear layer.

    Attributes
    ----------
    input_cov : (n, n) array or CovarianceRoot
        :math:`C_x = E[x x^T]`.
    grad_cov : (m, m) array or CovarianceRoot or None
        :math:`C_g = E[g g^T]`.
    grad_mean : (m, n) array or None
        :math:`G = E[g x^T]`, the mean weight gradient.
    n_samples : int
        Number of calibration tokens.
    input_products, grad_products : GramProducts or None
        How ``input_cov`` and ``grad_cov`` were formed (Gram mode), for the
        whitening's rounding tolerance; ``None``: all in their own dtype.
    """

    input_cov: Any
    grad_cov: Any
    grad_mean: Any
    n_samples: int
    input_products: GramProducts | None = None
    grad_products: GramProducts | None = None


def _check_dtype_name(dtype: object) -> None:
    if dtype not in (None, "float32", "float64"):
        msg = f"`dtype` must be 'float32', 'float64' or None; got {dtype!r}"
        raise ValueError(msg)


def _resolve_dtype(xp: ModuleType, like: Array, dtype: str | None) -> Any:
    """float64 on CPU and float32 on CUDA unless ``dtype`` says otherwise."""
    if dtype is None:
        on_cuda = is_torch(xp) and getattr(device_of(like), "type", "cpu") == "cuda"
        dtype = "float32" if on_cuda else "float64"
    if dtype not in ("float32", "float64"):
        msg = f"`dtype` must be 'float32', 'float64' or None; got {dtype!r}"
        raise ValueError(msg)
    return getattr(xp, dtype)


def _as_rows(x: Array, dim: int, name: str, arg: str) -> Array:
    """Reshape a batch of any leading shape ``(..., dim)`` into ``(N, dim)``."""
    shape = tuple(x.shape)
    if len(shape) == 0 or shape[-1] != dim:
        msg = f"`{arg}` for statistic `{name}` must have last dimension {dim}; got shape {shape}"
        raise ValueError(msg)
    xp = namespace(x)
    return xp.reshape(x, (-1, dim))


def _product_dtype(xp: ModuleType, batch: Any, accumulation: Any, products: str) -> Any:
    """dtype of a batch's Gram product: its own (at least float32, at most ``accumulation``)."""
    if products == "accumulation":
        return accumulation
    own = decomposition_dtype(xp, batch)  # half precision: float32
    return own if xp.result_type(own, accumulation) == accumulation else accumulation


def _check_library(total: Array | None, batch: Array, name: str, arg: str) -> None:
    """Refuse a batch from another array library than the batches already absorbed."""
    if total is None or same_library(namespace(total), batch):
        return
    seen = f"{type(batch).__module__}.{type(batch).__name__}"
    held = library_name(namespace(total))
    msg = (
        f"`{arg}` for statistic `{name}` is a {seen}, but the earlier batches were "
        f"{held} arrays: feed every batch of one statistic from one library (convert "
        f"with .numpy() or torch.from_numpy); the statistic was not updated"
    )
    raise TypeError(msg)


def _check_batch_finite(xp: ModuleType, rows: Array, name: str, arg: str) -> None:
    if bool(xp.all(xp.isfinite(rows))):
        return
    n_nan, n_inf = count_nonfinite(xp, rows)
    msg = (
        f"non-finite values in `{arg}` for statistic `{name}`: {n_nan} NaN, "
        f"{n_inf} Inf; the statistic was not updated"
    )
    raise ValueError(msg)


def _check_product_finite(xp: ModuleType, product: Array, rows: Array, name: str) -> None:
    r"""Refuse a batch whose Gram product :math:`X^\top X` is not finite, naming why.

    A NaN or Inf anywhere in :math:`X` reaches the diagonal, whose entry
    :math:`j` sums :math:`x_{ij}^2` over every row: checking those ``d``
    numbers replaces a pass over the ``N x d`` rows (which runs only to name
    the bad values). A finite :math:`X` whose product overflows (in float32,
    ``products="compute"``) is refused too: the sum would be infinite.
    """
    if bool(xp.all(xp.isfinite(xp.linalg.diagonal(product)))):
        return
    _check_batch_finite(xp, rows, name, "x")
    msg = (
        f"the Gram product of `x` overflows {product.dtype} for statistic `{name}` (largest "
        f"|x| {float(xp.max(xp.abs(rows))):.6g}); the statistic was not updated: accumulate "
        "with products='accumulation' (float64 products), or scale the inputs down"
    )
    raise ValueError(msg)


class MomentAccumulator:
    r"""Streaming second moment :math:`C = E[x x^\top]` of ``dim``-vectors.

    Parameters
    ----------
    dim : int
        Feature dimension ``n``.
    name : str, optional
        Name of the statistic, used in error messages (e.g. ``"input_cov"``
        or ``"layers.0.q_proj:input_cov"``).
    mode : {"gram", "qr"}, optional
        ``"gram"`` sums :math:`X^\top X`; ``"qr"`` keeps the triangular
        factor of a streamed QR, :math:`R^\top R = X^\top X`.
    dtype : {"float64", "float32"} or None, optional
        Accumulation dtype. ``None`` means float64 on CPU and float32 on CUDA.
    products : {"accumulation", "compute"}, optional
        dtype of each batch's product :math:`X^\top X` (``"gram"`` mode).
        ``"accumulation"`` (default): the accumulation dtype (all float64 on
        CPU). ``"compute"``: the batch's own dtype, at least float32 and at
        most the accumulation dtype (a float32 model on CPU: float32
        products, about twice as fast, summed in float64 across batches).
        The result then holds float32 rounding in a float64 array: a
        rank-deficient :math:`C` shows negative eigenvalues of order
        :math:`\epsilon_{32} \lambda_\max`. :attr:`gram_products` records
        how :math:`C` was formed; pass it to the whitening
        (``whitening_operator(C, products=...)``, or through
        :class:`LayerStatistics`) so that its indefiniteness check uses the
        matching tolerance (:meth:`GramProducts.tolerance`). The accuracy
        cost is measured on the Numerics page.

    Raises
    ------
    ValueError
        On a batch with the wrong last dimension, or with NaN / Inf (the
        message names the statistic, and the batch is not absorbed).

    Notes
    -----
    ``"gram"`` costs :math:`O(N n^2)` per batch of ``N`` rows; ``"qr"`` about
    twice that. Merging two accumulators adds sums (or QR-stacks roots) and
    sample counts, so statistics from several processes or resumed runs
    combine exactly.
    """

    def __init__(
        self,
        dim: int,
        *,
        name: str = "cov",
        mode: str = "gram",
        dtype: str | None = None,
        products: str = "accumulation",
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            msg = f"`dim` must be a positive integer; got {dim!r}"
            raise ValueError(msg)
        if mode not in _MODES:
            msg = f"`mode` must be one of {_MODES}; got {mode!r}"
            raise ValueError(msg)
        _check_dtype_name(dtype)
        if products not in PRODUCTS:
            msg = f"`products` must be one of {PRODUCTS}; got {products!r}"
            raise ValueError(msg)
        self.dim = dim
        self.name = name
        self.mode = mode
        self.dtype_name = dtype
        self.products = products
        self.total: Array | None = None  # sum X^T X (gram) or R (qr)
        self.count = 0
        self.formed: GramProducts | None = None  # products so far (gram mode)

    @property
    def gram_products(self) -> GramProducts | None:
        """How the Gram sum was formed (dtype, most rows per product); ``None`` in QR mode."""
        return self.formed if self.mode == "gram" else None

    def update(self, x: Array, *, scale: float = 1.0) -> None:
        r"""Absorb a batch ``x`` of shape ``(..., dim)`` (of the earlier batches' library).

        ``scale`` multiplies every row: the batch adds :math:`s^2 X^\top X`,
        the factor applied after the product, in the accumulation dtype (so a
        float32 product is not rescaled in float32).
        """
        _check_library(self.total, x, self.name, "x")
        xp = namespace(x)
        rows = _as_rows(x, self.dim, self.name, "x")
        dtype = _resolve_dtype(xp, x, self.dtype_name)
        if self.mode == "gram":
            low = _product_dtype(xp, rows.dtype, dtype, self.products)
            product = astype(xp, rows, low)
            with np.errstate(over="ignore"):  # an overflow is refused just below, by name
                product = product.T @ product
            _check_product_finite(xp, product, rows, self.name)
            contrib = astype(xp, product, dtype)
            if scale != 1.0:
                contrib = contrib * (float(scale) ** 2)
            self.total = contrib if self.total is None else self.total + contrib
            # a product summed on in its own dtype is one long product of every row so far
            k = int(rows.shape[0]) + (self.count if low == dtype else 0)
            here = GramProducts("float32" if low == xp.float32 else "float64", k)
            self.formed = here.combine(self.formed)
        else:
            _check_batch_finite(xp, rows, self.name, "x")
            rows = astype(xp, rows, dtype)
            if scale != 1.0:
                rows = rows * float(scale)
            stacked = rows if self.total is None else xp.concat([self.total, rows], axis=0)
            self.total = qr_r(xp, stacked)
        self.count += int(rows.shape[0])

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Return a new accumulator holding the samples of both."""
        if not isinstance(other, MomentAccumulator):
            msg = f"`other` must be a MomentAccumulator; got {type(other).__name__}"
            raise TypeError(msg)
        if (other.dim, other.mode) != (self.dim, self.mode):
            msg = (
                f"`other` must have dim={self.dim}, mode={self.mode!r}; got "
                f"dim={other.dim}, mode={other.mode!r}"
            )
            raise ValueError(msg)
        merged = MomentAccumulator(
            self.dim, name=self.name, mode=self.mode, dtype=self.dtype_name,
            products=self.products,
        )
        merged.count = self.count + other.count
        if self.formed is not None:
            merged.formed = self.formed.combine(other.formed)
        else:
            merged.formed = other.formed
        parts = [t for t in (self.total, other.total) if t is not None]
        if len(parts) == 2:
            xp = namespace(*parts)
            if self.mode == "gram":
                merged.total = parts[0] + parts[1]
            else:
                merged.total = qr_r(xp, xp.concat(parts, axis=0))
        elif parts:
            merged.total = parts[0]
        return merged

    def result(self) -> Array | CovarianceRoot:
        """The mean second moment: an ``(n, n)`` array, or a :class:`CovarianceRoot`."""
        if self.count == 0 or self.total is None:
            msg = f"statistic `{self.name}` has no samples: call update() first"
            raise ValueError(msg)
        if self.mode == "gram":
            return self.total / self.count
        return CovarianceRoot(self.total / math.sqrt(self.count), self.count)


class CrossMomentAccumulator:
    r"""Streaming cross moment :math:`G = E[g x^\top]` (the mean weight gradient).

    Parameters
    ----------
    rows, cols : int
        Dimensions of ``g`` (``m``) and ``x`` (``n``).
    name : str, optional
        Name used in error messages.
    dtype : {"float64", "float32"} or None, optional
        Accumulation dtype; ``None`` means float64 on CPU, float32 on CUDA.

    Raises
    ------
    ValueError
        On mismatched batch shapes or non-finite values.
    """

    def __init__(
        self, rows: int, cols: int, *, name: str = "grad_mean", dtype: str | None = None
    ) -> None:
        for arg, val in (("rows", rows), ("cols", cols)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                msg = f"`{arg}` must be a positive integer; got {val!r}"
                raise ValueError(msg)
        _check_dtype_name(dtype)
        self.rows = rows
        self.cols = cols
        self.name = name
        self.dtype_name = dtype
        self.total: Array | None = None
        self.count = 0

    def update(self, g: Array, x: Array) -> None:
        """Absorb paired batches ``g`` of shape ``(..., rows)`` and ``x`` of ``(..., cols)``."""
        _check_library(self.total, g, self.name, "g")
        _check_library(self.total, x, self.name, "x")
        xp = namespace(g, x)
        if tuple(g.shape[:-1]) != tuple(x.shape[:-1]):
            msg = (
                f"`g` and `x` for statistic `{self.name}` must share leading "
                f"dimensions; got {tuple(g.shape)} and {tuple(x.shape)}"
            )
            raise ValueError(msg)
        g_rows = _as_rows(g, self.rows, self.name, "g")
        x_rows = _as_rows(x, self.cols, self.name, "x")
        _check_batch_finite(xp, g_rows, self.name, "g")
        _check_batch_finite(xp, x_rows, self.name, "x")
        dtype = _resolve_dtype(xp, g, self.dtype_name)
        contrib = astype(xp, g_rows, dtype).T @ astype(xp, x_rows, dtype)
        self.total = contrib if self.total is None else self.total + contrib
        self.count += int(g_rows.shape[0])

    def merge(self, other: CrossMomentAccumulator) -> CrossMomentAccumulator:
        """Return a new accumulator holding the samples of both."""
        if not isinstance(other, CrossMomentAccumulator):
            msg = f"`other` must be a CrossMomentAccumulator; got {type(other).__name__}"
            raise TypeError(msg)
        if (other.rows, other.cols) != (self.rows, self.cols):
            msg = (
                f"`other` must have shape ({self.rows}, {self.cols}); got "
                f"({other.rows}, {other.cols})"
            )
            raise ValueError(msg)
        merged = CrossMomentAccumulator(
            self.rows, self.cols, name=self.name, dtype=self.dtype_name
        )
        merged.count = self.count + other.count
        parts = [t for t in (self.total, other.total) if t is not None]
        merged.total = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
        return merged

    def result(self) -> Array:
        """The mean cross moment, shape ``(rows, cols)``."""
        if self.count == 0 or self.total is None:
            msg = f"statistic `{self.name}` has no samples: call update() first"
            raise ValueError(msg)
        return self.total / self.count
