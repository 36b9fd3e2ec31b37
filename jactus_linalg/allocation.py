r"""Global rank allocation by marginal gain per parameter.

Each layer :math:`\ell` offers a sequence of units (rank :math:`r \to r+1`)
with gains :math:`g_{\ell,1}, g_{\ell,2}, \dots` (preserved curvature energy,
comparable across layers) and costs :math:`c_{\ell,i} = m + n + 2(i-1) + 1`
parameters. Units must be taken in order (prefixes). The allocator solves

.. math::

    \max \sum_\ell \sum_{i \le r_\ell} g_{\ell,i}
    \quad\text{s.t.}\quad \sum_\ell \sum_{i \le r_\ell} c_{\ell,i} \le B

greedily: each layer's prefix curve :math:`(\sum c, \sum g)` is replaced by
its upper concave hull, whose segments (groups of consecutive units) have
non-increasing gain/cost; groups are taken in order of decreasing ratio
across all layers (the order a heap merge of the per-layer sequences gives)
until one does not fit; then a heap continues over the remaining layers'
next groups. A group that does not fit closes its layer; the units of it
that still fit are grouped again by their own hull and compete in the heap
at their own ratios.

On concave instances (every group a single unit) the greedy total is within
one unit's gain of the optimum, and optimal at the budgets where the
ratio-ordered prefix ends exactly (no unit skipped before the budget is
spent): there it is the fractional-knapsack optimum. Spending the budget
exactly after skipping a unit that did not fit is not enough for
optimality, only for the one-unit bound.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from ._backend import as_numpy
from ._checks import check_fraction, finite_result

__all__ = [
    "ALLOCATIONS",
    "allocate_budget",
    "allocate_ranks",
    "allocate_uniform",
    "bisect_budget",
    "break_even_rank",
    "factor_params",
    "layer_units",
    "rank_unit_costs",
]

#: Hull passes before switching the stragglers to a per-layer monotone chain.
_MAX_VECTOR_PASSES = 32

#: Rules of :func:`allocate_budget`.
ALLOCATIONS = ("global", "uniform")


def factor_params(m: int, n: int, rank: int) -> int:
    """Numbers stored by rank-``rank`` factors of an ``m x n`` layer: ``r(m+n) + r²``."""
    return rank * (m + n) + rank * rank


def break_even_rank(m: int, n: int) -> int:
    r"""Largest :math:`r` with :math:`r(m+n) + r^2 < mn` (0 if none).

    At or beyond this rank the factors hold as many numbers as the dense
    matrix, so the layer is better kept dense.
    """
    r = int((-(m + n) + math.isqrt((m + n) ** 2 + 4 * m * n)) // 2) + 1
    while r > 0 and factor_params(m, n, r) >= m * n:
        r -= 1
    return r


def rank_unit_costs(m: int, n: int, max_rank: int) -> np.ndarray:
    """Cost of each unit ``r -> r+1`` for ``r = 0..max_rank-1``: ``m + n + 2r + 1``."""
    return (m + n + 1 + 2 * np.arange(max_rank)).astype(np.float64)


def layer_units(
    gains: np.ndarray, m: int, n: int, total_energy: float
) -> tuple[np.ndarray, np.ndarray]:
    """Units of one layer up to break-even, plus a final "keep dense" unit.

    Parameters
    ----------
    gains : (R,) array
        Per-rank-unit gains (``R >= break_even_rank(m, n)`` of them are used).
    m, n : int
        Layer shape.
    total_energy : float
        :math:`\\lVert M \\rVert_F^2`: the energy a dense layer keeps.

    Returns
    -------
    gains, costs : numpy arrays of length ``break_even_rank(m, n) + 1``
        Rank units, then one unit that turns the layer dense: gain
        ``total_energy - sum(rank gains)``, cost ``mn - factor_params(r_be)``.
        Taking every unit means "stay dense".
    """
    r_be = break_even_rank(m, n)
    g = np.asarray(as_numpy(gains), dtype=np.float64)[:r_be]
    if g.size < r_be:
        msg = f"`gains` must hold at least break_even_rank={r_be} units; got {g.size}"
        raise ValueError(msg)
    dense_gain = max(total_energy - float(g.sum()), 0.0)
    dense_cost = float(m * n - factor_params(m, n, r_be))
    return (
        np.append(g, dense_gain),
        np.append(rank_unit_costs(m, n, r_be), dense_cost),
    )


def _real_vector(x: object, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array, refusing complex, object and string data."""
    try:
        arr = np.asarray(as_numpy(x) if hasattr(x, "shape") else x)
    except (TypeError, ValueError) as err:
        msg = f"`{name}` must be an array of real numbers; got {type(x).__name__}"
        raise TypeError(msg) from err
    if arr.dtype.kind not in "fiub":
        msg = f"`{name}` must hold real numbers; got dtype {arr.dtype}"
        raise TypeError(msg)
    return arr.astype(np.float64)


def _as_unit_arrays(
    gains: Sequence[object], costs: Sequence[object]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if isinstance(gains, np.ndarray | str) or not isinstance(gains, Sequence):
        msg = f"`gains` must be a sequence with one 1-D array per layer; got {type(gains).__name__}"
        raise TypeError(msg)
    if isinstance(costs, np.ndarray | str) or not isinstance(costs, Sequence):
        msg = f"`costs` must be a sequence with one 1-D array per layer; got {type(costs).__name__}"
        raise TypeError(msg)
    if len(gains) != len(costs):
        msg = f"`gains` and `costs` must have one entry per layer; got {len(gains)} and {len(costs)}"
        raise ValueError(msg)
    if len(gains) == 0:
        msg = "`gains` must hold at least one layer; got none"
        raise ValueError(msg)
    g_out, c_out = [], []
    for i, (g, c) in enumerate(zip(gains, costs, strict=True)):
        g_arr = _real_vector(g, f"gains[{i}]")
        c_arr = _real_vector(c, f"costs[{i}]")
        if g_arr.ndim != 1 or c_arr.ndim != 1:
            msg = f"`gains[{i}]` and `costs[{i}]` must be 1-D; got shapes {g_arr.shape} and {c_arr.shape}"
            raise ValueError(msg)
        if g_arr.shape != c_arr.shape:
            msg = (
                f"`gains[{i}]` and `costs[{i}]` must have the same length; "
                f"got {g_arr.size} and {c_arr.size}"
            )
            raise ValueError(msg)
        if not np.all(np.isfinite(g_arr)) or np.any(g_arr < 0):
            finite = g_arr[np.isfinite(g_arr)]
            msg = (
                f"`gains[{i}]` must be finite and >= 0; got {g_arr.size - finite.size} "
                f"non-finite, min finite {finite.min() if finite.size else None!r}"
            )
            raise ValueError(msg)
        if not np.all(np.isfinite(c_arr)) or np.any(c_arr <= 0):
            finite = c_arr[np.isfinite(c_arr)]
            msg = (
                f"`costs[{i}]` must be finite and > 0; got {c_arr.size - finite.size} "
                f"non-finite, min finite {finite.min() if finite.size else None!r}"
            )
            raise ValueError(msg)
        g_out.append(g_arr)
        c_out.append(c_arr)
    return g_out, c_out


def _hull_vertices(x: np.ndarray, y: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mask of points on each layer's upper concave hull (all layers at once).

    Points ``starts[l]..ends[l]`` (inclusive) are layer ``l``'s prefix curve.
    A vertex strictly below the chord of its alive neighbours is never on
    the hull, so all such vertices are dropped together, pass after pass.
    """
    alive = np.ones(x.size, dtype=bool)
    fixed = np.zeros(x.size, dtype=bool)
    fixed[starts] = True
    fixed[ends] = True
    for _ in range(_MAX_VECTOR_PASSES):
        idx = np.flatnonzero(alive)
        inner = np.flatnonzero(~fixed[idx])
        if inner.size == 0:
            return alive
        p, t, q = idx[inner - 1], idx[inner], idx[inner + 1]
        reflex = (y[t] - y[p]) * (x[q] - x[t]) < (y[q] - y[t]) * (x[t] - x[p])
        if not reflex.any():
            return alive
        alive[t[reflex]] = False
    return _finish_hulls_sequentially(x, y, starts, ends, alive)


def _finish_hulls_sequentially(
    x: np.ndarray, y: np.ndarray, starts: np.ndarray, ends: np.ndarray, alive: np.ndarray
) -> np.ndarray:
    """Monotone-chain upper hull for each layer (stragglers of the vector passes)."""
    for s, e in zip(starts, ends, strict=True):
        stack: list[int] = []
        for i in np.flatnonzero(alive[s : e + 1]) + s:
            while len(stack) >= 2:
                p, t = stack[-2], stack[-1]
                if (y[t] - y[p]) * (x[i] - x[t]) < (y[i] - y[t]) * (x[t] - x[p]):
                    stack.pop()
                else:
                    break
            stack.append(int(i))
        alive[s : e + 1] = False
        alive[stack] = True
    return alive


@finite_result
def allocate_ranks(
    gains: Sequence[object], costs: Sequence[object], budget: float
) -> list[int]:
    r"""Greedy global allocation of rank units under a parameter budget.

    Parameters
    ----------
    gains : sequence of (L_l,) array_like
        Per layer, the gain of each successive unit (finite, ``>= 0``).
    costs : sequence of (L_l,) array_like
        Per layer, the cost of each successive unit (finite, ``> 0``).
    budget : float in (0, 1]
        Fraction of the total cost of all units that may be spent:
        :math:`B = \text{budget} \cdot \sum_{\ell,i} c_{\ell,i}`.

    Returns
    -------
    list of int
        Number of units taken per layer (always a prefix).

    Raises
    ------
    TypeError
        If ``gains`` or ``costs`` is not a sequence of arrays, or ``budget`` is
        not a real number.
    ValueError
        If they differ in length (overall or per layer), are not 1-D, hold
        negative or non-finite values (or non-positive costs), or ``budget``
        lies outside ``(0, 1]``.

    Notes
    -----
    Units of zero gain are never bought. Non-concave layers (gain/cost ratios
    that rise somewhere) are grouped by their upper concave hull, so a unit
    with little gain that unlocks a large one is bought together with it.

    Guarantee, for concave layers: with :math:`G` the greedy total and
    :math:`g^\star` the gain of the first unit that did not fit,
    :math:`G \le \mathrm{OPT} \le G + g^\star`, and :math:`G = \mathrm{OPT}`
    when :math:`B` is the cost of a prefix of the units in decreasing
    gain/cost order (the greedy then spends exactly :math:`B` without
    skipping a unit). For any layers, the bound holds with :math:`g^\star`
    the gain of the first hull group that did not fit.

    Cost: :math:`O(N \log N)` for :math:`N` units in total (a sort, a few
    vectorized hull passes and a heap over the layers).

    Gains and costs are each scaled by a power of two (exact, and the result
    does not change) so that the largest is below 1 and sums of up to
    :math:`2^{1000}` units cannot overflow, even for gains near the float64
    maximum.

    References
    ----------
    .. [1] G. B. Dantzig, "Discrete-variable extremum problems", Oper. Res.,
       1957 (greedy bound for the knapsack problem).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        msg = f"`budget` must be a real number in (0, 1]; got {budget!r}"
        raise TypeError(msg)
    fraction = check_fraction(budget, "budget")
    g_list, c_list = _as_unit_arrays(gains, costs)
    # the allocation is invariant to scaling all gains (or all costs) by one
    # positive number: scale by a power of two (exact) so that running sums
    # of gains near the float64 maximum cannot overflow
    g_list = _power_of_two_scaled(g_list)
    c_list = _power_of_two_scaled(c_list)
    total_cost = float(sum(c.sum() for c in c_list))
    limit = fraction * total_cost

    layer, first, units, gain, cost = _concave_groups(g_list, c_list)
    ratio = gain / cost
    order = np.flatnonzero(ratio > 0)
    # decreasing ratio; ties by layer then position: groups are numbered in
    # layer order, so a stable sort of the ascending indices breaks ties so
    order = order[np.argsort(-ratio[order], kind="stable")]
    spent = np.cumsum(cost[order])
    n_fit = int(np.searchsorted(spent, limit * (1 + 1e-12), side="right"))
    taken = np.zeros(len(g_list), dtype=np.int64)
    np.add.at(taken, layer[order[:n_fit]], units[order[:n_fit]])
    if n_fit == order.size:
        return [int(t) for t in taken]
    left = limit - (float(spent[n_fit - 1]) if n_fit else 0.0)
    groups = _Groups(layer, first, units, ratio, cost, c_list, g_list)
    _continue_with_heap(order[n_fit:], groups, taken, left)
    return [int(t) for t in taken]


def _power_of_two_scaled(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` times the power of two that brings their largest entry into [0.5, 1)."""
    top = max((float(a.max()) for a in arrays if a.size), default=0.0)
    if top == 0.0:
        return arrays
    exponent = math.frexp(top)[1]
    return [np.ldexp(a, -exponent) for a in arrays]


class _Groups(NamedTuple):
    layer: np.ndarray
    first: np.ndarray  # index of the group's first unit within its layer
    units: np.ndarray
    ratio: np.ndarray
    cost: np.ndarray
    unit_costs: list[np.ndarray]
    unit_gains: list[np.ndarray]


def _concave_groups(
    g_list: list[np.ndarray], c_list: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hull groups of all layers: ``(layer, first unit, n_units, gain, cost)``, in layer order."""
    sizes = np.array([g.size for g in g_list])
    starts = np.concatenate([[0], np.cumsum(sizes + 1)[:-1]])
    ends = starts + sizes
    x = np.concatenate([np.concatenate([[0.0], np.cumsum(c)]) for c in c_list])
    y = np.concatenate([np.concatenate([[0.0], np.cumsum(g)]) for g in g_list])
    vertices = np.flatnonzero(_hull_vertices(x, y, starts, ends))
    point_layer = np.repeat(np.arange(len(g_list)), sizes + 1)
    same_layer = point_layer[vertices[1:]] == point_layer[vertices[:-1]]
    lo, hi = vertices[:-1][same_layer], vertices[1:][same_layer]
    lay = point_layer[lo]
    return lay, lo - starts[lay], hi - lo, y[hi] - y[lo], x[hi] - x[lo]


def _continue_with_heap(rest: np.ndarray, groups: _Groups, taken: np.ndarray, left: float) -> None:
    """After the first misfit: a heap over each open layer's next group.

    A group that does not fit closes its layer (the layer's later units
    would break the prefix rule), but the prefix of its units that still fits
    is split again by its own upper concave hull and those sub-groups go back
    into the heap at their own gain/cost ratios. So leftover budget can still
    buy part of the group, but never ahead of better units elsewhere, and
    never a run of units that gains nothing.
    """
    n_layers = len(groups.unit_gains)
    # groups are numbered in layer order, contiguously per layer: each open
    # layer's next group is its smallest remaining index, and later ones follow
    none_left = np.iinfo(np.int64).max
    next_group = np.full(n_layers, none_left, dtype=np.int64)
    np.minimum.at(next_group, groups.layer[rest], rest)
    layer_end = np.searchsorted(groups.layer, np.arange(n_layers), side="right").tolist()
    pointer: dict[int, int] = {}
    # a layer whose group did not fit is re-split; its sub-groups, next last
    split: dict[int, list[tuple[float, int, float, int]]] = {}

    def entry(g: int) -> tuple[float, int, float, int]:
        return (float(groups.ratio[g]), int(groups.units[g]), float(groups.cost[g]),
                int(groups.first[g]))

    def following(lay: int) -> tuple[float, int, float, int] | None:
        if lay in split:
            return split[lay].pop() if split[lay] else None
        g = pointer[lay] + 1
        # hull ratios do not increase along a layer: once a group gains
        # nothing, neither do the later ones, and none is worth buying
        if g >= layer_end[lay] or groups.ratio[g] <= 0:
            return None
        pointer[lay] = g
        return entry(g)

    heap = []
    for lay in np.flatnonzero(next_group != none_left).tolist():
        g = int(next_group[lay])
        pointer[lay] = g
        item = entry(g)
        heap.append((-item[0], lay, item))
    heapq.heapify(heap)  # one entry per open layer: (ratio, layer) never ties
    slack = 1 + 1e-12
    while heap:
        _, lay, (_, n_units, group_cost, first) = heapq.heappop(heap)
        if group_cost <= left * slack:
            left -= group_cost
            taken[lay] += n_units
            nxt = following(lay)
            if nxt is not None:
                heapq.heappush(heap, (-nxt[0], lay, nxt))
            continue
        unit_costs = groups.unit_costs[lay][first : first + n_units]
        fits = int(np.searchsorted(np.cumsum(unit_costs), left * slack, side="right"))
        split[lay] = []  # the layer closes here: its later groups are dropped
        if fits == 0:
            continue
        unit_gains = groups.unit_gains[lay][first : first + fits]
        _, sub_first, sub_units, sub_gain, sub_cost = _concave_groups(
            [unit_gains], [unit_costs[:fits]]
        )
        sub = [
            (float(gn / cs), int(un), float(cs), first + int(fs))
            for fs, un, gn, cs in zip(sub_first, sub_units, sub_gain, sub_cost, strict=True)
            if gn > 0
        ]
        if sub:
            sub.reverse()
            split[lay] = sub
            nxt = split[lay].pop()
            heapq.heappush(heap, (-nxt[0], lay, nxt))


def allocate_uniform(shapes: Sequence[tuple[int, int]], budget: float) -> list[int]:
    r"""Ranks that keep the same fraction of every layer's parameters (the ablation baseline).

    Finds the largest :math:`\rho` such that ranks
    :math:`r_\ell = \max\{r \ge 1 : r(m_\ell+n_\ell) + r^2 \le \rho\, m_\ell n_\ell\}`
    (capped at each break-even rank) fit in ``budget`` (a fraction of
    :math:`\sum_\ell m_\ell n_\ell`), by bisection on :math:`\rho`.

    Parameters
    ----------
    shapes : sequence of (m, n)
        Layer shapes.
    budget : float in (0, 1]
        Fraction of the dense parameters of these layers that may be spent.

    Returns
    -------
    list of int
        One rank per layer (at least 1).

    Raises
    ------
    ValueError
        If ``budget`` lies outside ``(0, 1]`` or ``shapes`` is empty.
    """
    fraction = check_fraction(budget, "budget")
    if len(shapes) == 0:
        msg = "`shapes` must hold at least one layer; got none"
        raise ValueError(msg)
    for i, shape in enumerate(shapes):
        ok = (
            isinstance(shape, tuple | list)
            and len(shape) == 2
            and all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
                for d in shape
            )
        )
        if not ok:
            msg = f"`shapes[{i}]` must be a pair of positive integers (m, n); got {shape!r}"
            raise ValueError(msg)
    dense = np.array([m * n for m, n in shapes], dtype=np.float64)
    limit = fraction * dense.sum()

    def ranks_at(rho: float) -> list[int]:
        out = []
        for m, n in shapes:
            r = max(1, break_even_rank(m, n))
            target = rho * m * n
            # largest r with r(m+n) + r^2 <= target: root of r^2 + (m+n) r - target
            root = int((-(m + n) + math.sqrt((m + n) ** 2 + 4 * target)) // 2)
            out.append(int(min(max(root, 1), r)))
        return out

    def spent(ranks: list[int]) -> float:
        return float(sum(factor_params(m, n, r) for (m, n), r in zip(shapes, ranks, strict=True)))

    def fits(rho: float) -> bool:
        return spent(ranks_at(rho)) <= limit

    if not fits(0.0):  # rank 1 everywhere is the floor, even over the budget
        return ranks_at(0.0)
    return ranks_at(bisect_budget(fits, 0.0, 1.0))


def bisect_budget(
    fits: Callable[[float], bool], lo: float, hi: float, *, steps: int = 60
) -> float:
    r"""Largest :math:`x \in [\text{lo}, \text{hi}]` with ``fits(x)``, for a monotone ``fits``.

    The one budget bisection of the package (the uniform allocation and
    compress-then-LoRA's split of the budget between factors and adapters
    use it). ``fits`` must be true at ``lo`` and turn false at most once
    as :math:`x` grows; after ``steps`` halvings the answer is within
    :math:`(\text{hi} - \text{lo}) 2^{-\text{steps}}` of the boundary, on
    its feasible side.

    Raises
    ------
    ValueError
        If ``lo > hi`` or ``fits(lo)`` is false.
    """
    if not lo <= hi:
        msg = f"`lo` must be <= `hi`; got {lo!r} and {hi!r}"
        raise ValueError(msg)
    if not fits(lo):
        msg = f"`fits` must hold at `lo`={lo!r}: nothing in [lo, hi] fits"
        raise ValueError(msg)
    if fits(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _check_retain(retain: object) -> float:
    """``retain`` as a float in (0, 1]; numpy scalars and 0-d arrays are accepted."""
    if isinstance(retain, np.ndarray) and retain.ndim == 0:
        retain = retain.item()
    if isinstance(retain, bool | np.bool_) or not isinstance(retain, numbers.Real):
        msg = f"`retain` must be a real number in (0, 1]; got {retain!r} ({type(retain).__name__})"
        raise TypeError(msg)
    value = float(retain)
    if not (math.isfinite(value) and 0 < value <= 1):
        msg = (
            f"`retain` must lie in (0, 1] (parameters after / parameters before); got {value!r}"
        )
        raise ValueError(msg)
    return value


def allocate_budget(
    shapes: Sequence[tuple[int, int]],
    gains: Sequence[object],
    total_energies: Sequence[float],
    retain: float,
    total_params: int,
    *,
    min_rank: int = 1,
    fixed_ranks: Mapping[int, int] | None = None,
    allocation: str = "global",
) -> list[int | None]:
    r"""Per-layer ranks (``None`` = kept dense) that keep ``retain`` of the whole model.

    The budget rule of DESIGN, in one place: the parameters outside the
    layers (embeddings, norms, biases, a head, layers too small to factor)
    are kept and count against the budget; layers in ``fixed_ranks`` take
    their rank; every other layer takes ``min_rank`` up front; the rest of
    the budget goes to rank units by :func:`allocate_ranks` (greedy gain per
    parameter, concave-hull groups, prefixes only). Each layer's units stop
    at its break-even rank, followed by one keep-dense unit (gain: the
    energy beyond break-even, cost: the parameters beyond it; see
    :func:`layer_units`); a layer that buys it stays dense. No layer is ever
    factored at its break-even rank for lack of that unit.

    Parameters
    ----------
    shapes : sequence of (m, n)
        Layer shapes (out x in), each with break-even rank >= 1.
    gains : sequence of (R_l,) array_like
        Per-unit gains of each layer, ranks 1..R_l with
        :math:`R_l \ge` ``break_even_rank(m, n)`` (curvature units).
    total_energies : sequence of float
        :math:`\lVert M \rVert_F^2` of each layer: the energy kept dense.
    retain : float in (0, 1]
        Parameters after / parameters before, for the whole model. ``>= 1``
        keeps every layer dense (only ``fixed_ranks`` are factored).
    total_params : int
        Parameters of the whole model before compression.
    min_rank : int, optional
        Rank floor of the allocated layers (capped at each break-even rank).
    fixed_ranks : mapping of layer index -> rank, optional
        Ranks set by the user (e.g. a ``rank_pattern``); they are paid for
        first and not allocated.
    allocation : {"global", "uniform"}, optional
        The greedy global rule, or the same parameter fraction in every
        layer (:func:`allocate_uniform`, the ablation).

    Returns
    -------
    list of int or None
        One entry per layer.

    Raises
    ------
    TypeError
        If ``retain`` is not a real number.
    ValueError
        ``retain`` outside (0, 1], or too small for the parameters outside
        the layers plus the fixed ranks plus ``min_rank`` everywhere (the
        message gives the smallest feasible ``retain``); mismatched lengths;
        an unknown ``allocation``; a fixed rank or ``min_rank`` out of range.

    Notes
    -----
    With :math:`P` the whole model's parameters, :math:`F` those outside
    the layers and :math:`D_\ell = m_\ell n_\ell`, the layers may hold
    :math:`\text{retain}\cdot P - F` parameters; the floor
    :math:`\sum_\ell r_0 (m_\ell + n_\ell) + r_0^2` is paid first, and the
    greedy spends the rest as the fraction
    :math:`(\text{retain}\cdot P - F - \text{floor}) / \sum \text{unit costs}`
    of the remaining units.
    """
    retain = _check_retain(retain)
    if allocation not in ALLOCATIONS:
        msg = f"`allocation` must be one of {list(ALLOCATIONS)}; got {allocation!r}"
        raise ValueError(msg)
    n_layers = len(shapes)
    if len(gains) != n_layers or len(total_energies) != n_layers:
        msg = (
            f"`shapes`, `gains` and `total_energies` must have one entry per layer; got "
            f"{n_layers}, {len(gains)} and {len(total_energies)}"
        )
        raise ValueError(msg)
    if isinstance(min_rank, bool) or not isinstance(min_rank, numbers.Integral) or min_rank < 1:
        msg = f"`min_rank` must be an integer >= 1; got {min_rank!r}"
        raise ValueError(msg)
    shapes = _check_shapes(shapes)
    gains = [_check_gains(g, i, shapes[i]) for i, g in enumerate(gains)]
    total_energies = [_check_energy(e, i) for i, e in enumerate(total_energies)]
    if isinstance(total_params, bool) or not isinstance(total_params, numbers.Integral):
        msg = f"`total_params` must be an integer; got {total_params!r}"
        raise TypeError(msg)
    fixed = _check_fixed_ranks(fixed_ranks, shapes)
    dense = [m * n for m, n in shapes]
    outside = int(total_params) - sum(dense)
    if outside < 0:
        msg = (
            f"`total_params`={total_params} is smaller than the layers' own "
            f"{sum(dense)} parameters"
        )
        raise ValueError(msg)
    free = [i for i in range(n_layers) if i not in fixed]
    ranks: list[int | None] = [fixed.get(i) for i in range(n_layers)]
    fixed_cost = sum(factor_params(*shapes[i], r) for i, r in fixed.items())
    floors = {i: min(int(min_rank), break_even_rank(*shapes[i])) for i in free}
    floor_cost = sum(factor_params(*shapes[i], floors[i]) for i in free)
    available = retain * total_params - outside - fixed_cost
    if available < floor_cost * (1 - 1e-12):
        need = (outside + fixed_cost + floor_cost) / total_params
        msg = (
            f"`retain`={retain} is too small: the parameters outside the compressed layers "
            f"are {outside / total_params:.4f} of the model, the fixed ranks "
            f"{fixed_cost / total_params:.4f}, and rank {min_rank} in every other layer "
            f"{floor_cost / total_params:.4f}; `retain` must be at least {need:.4f} (or "
            "target more layers, or lower `min_rank`)"
        )
        raise ValueError(msg)
    free_dense = sum(dense[i] for i in free)
    if not free or available >= free_dense:
        return ranks  # everything not fixed stays dense
    if allocation == "uniform":
        share = available / free_dense
        uniform = allocate_uniform([shapes[i] for i in free], share)
        for i, r in zip(free, uniform, strict=True):
            ranks[i] = max(r, floors[i])
        return ranks
    unit_gains, unit_costs = [], []
    for i in free:
        g, c = layer_units(gains[i], *shapes[i], float(total_energies[i]))
        unit_gains.append(g[floors[i]:])  # the floor is bought up front
        unit_costs.append(c[floors[i]:])
    total_cost = float(sum(c.sum() for c in unit_costs))
    budget = (available - floor_cost) / total_cost
    taken = [0] * len(free) if budget <= 0 else allocate_ranks(unit_gains, unit_costs, min(budget, 1.0))
    for i, t, g in zip(free, taken, unit_gains, strict=True):
        ranks[i] = None if t == len(g) else floors[i] + t
    return ranks


def _check_shapes(shapes: Sequence[object]) -> list[tuple[int, int]]:
    out = []
    for i, shape in enumerate(shapes):
        dims = tuple(shape) if isinstance(shape, tuple | list) else ()
        ok = len(dims) == 2 and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) >= 1 for d in dims
        )
        if not ok or break_even_rank(int(dims[0]), int(dims[1])) < 1:
            msg = (
                f"`shapes[{i}]` must be a pair of positive integers (m, n) of a layer that "
                f"can be factored (break-even rank >= 1); got {shape!r}"
            )
            raise ValueError(msg)
        out.append((int(dims[0]), int(dims[1])))
    return out


def _check_gains(gains: object, i: int, shape: tuple[int, int]) -> np.ndarray:
    g = _real_vector(gains, f"gains[{i}]")
    r_be = break_even_rank(*shape)
    if g.ndim != 1 or g.size < r_be or not np.all(np.isfinite(g)) or np.any(g < 0):
        msg = (
            f"`gains[{i}]` must be a 1-D array of at least {r_be} (the break-even rank) "
            f"finite gains >= 0; got shape {g.shape}"
        )
        raise ValueError(msg)
    return g


def _check_energy(energy: object, i: int) -> float:
    if isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not (
        math.isfinite(float(energy)) and float(energy) >= 0
    ):
        msg = f"`total_energies[{i}]` must be a finite number >= 0; got {energy!r}"
        raise ValueError(msg)
    return float(energy)


def _check_fixed_ranks(
    fixed_ranks: Mapping[int, int] | None, shapes: Sequence[tuple[int, int]]
) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, r in (fixed_ranks or {}).items():
        if not 0 <= int(i) < len(shapes):
            msg = f"`fixed_ranks` key {i!r} is not a layer index in [0, {len(shapes)})"
            raise ValueError(msg)
        limit = break_even_rank(*shapes[int(i)])
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= limit:
            msg = (
                f"`fixed_ranks[{i}]` must be an integer in [1, {limit}] (the break-even rank "
                f"of a {shapes[int(i)][0]}x{shapes[int(i)][1]} layer); got {r!r}"
            )
            raise ValueError(msg)
        out[int(i)] = int(r)
    return out
