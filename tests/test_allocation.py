"""Global rank allocation: budget, prefixes, greedy optimality, break-even."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import jactus_linalg as jl

from .numerics import tolerance
from .strategies import concave_instances, unit_instances

budgets = st.floats(0.01, 1.0)


def _totals(gains, costs, taken):
    gain = sum(float(np.sum(g[:t])) for g, t in zip(gains, taken, strict=True))
    cost = sum(float(np.sum(c[:t])) for c, t in zip(costs, taken, strict=True))
    return gain, cost


def _exhaustive(gains, costs, limit):
    """Best total gain over all prefix combinations with cost <= limit."""
    best = 0.0
    for taken in itertools.product(*(range(len(g) + 1) for g in gains)):
        gain, cost = _totals(gains, costs, taken)
        if cost <= limit and gain > best:
            best = gain
    return best


def _n_units(gains):
    return sum(len(g) for g in gains)


def _distinct(values) -> bool:
    """Sorted positive values separated far beyond rounding (no ties to break)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return bool(np.all(np.diff(v) > tolerance(np.float64, max(v.size, 1), c=1e6) * v[1:]))


def _upper_hull_points(g: np.ndarray, c: np.ndarray) -> set[int]:
    """Prefix lengths on the upper concave hull of the points (Σc, Σg), by brute force."""
    x = np.concatenate([[0.0], np.cumsum(c)])
    y = np.concatenate([[0.0], np.cumsum(g)])
    on = set()
    for t in range(len(x)):
        above = False
        for a in range(t):
            for b in range(t + 1, len(x)):
                chord = y[a] + (y[b] - y[a]) * (x[t] - x[a]) / (x[b] - x[a])
                if chord > y[t] + tolerance(np.float64, len(x)) * max(1.0, abs(y[-1])):
                    above = True
        if not above:
            on.add(t)
    return on


@given(inst=unit_instances(max_layers=5, max_units=8), budget=budgets)
def test_budget_respected(inst, budget):
    gains, costs = inst
    taken = jl.allocate_ranks(gains, costs, budget)
    assert len(taken) == len(gains)
    assert all(isinstance(t, int) for t in taken)
    assert all(0 <= t <= len(g) for t, g in zip(taken, gains, strict=True))
    total_cost = sum(float(np.sum(c)) for c in costs)
    _, spent = _totals(gains, costs, taken)
    assert spent <= budget * total_cost * (1 + tolerance(np.float64, _n_units(gains)))


@given(inst=concave_instances(max_layers=4, max_units=6))
def test_full_budget_takes_every_unit_with_gain(inst):
    gains, costs = inst
    taken = jl.allocate_ranks(gains, costs, 1.0)
    assert taken == [len(g) for g in gains]


def _hull_groups(g: np.ndarray, c: np.ndarray) -> list[tuple[int, float, float]]:
    """``(n_units, gain, cost)`` of the upper-hull segments of one layer's prefix curve."""
    vertices = sorted(_upper_hull_points(g, c))
    x = np.concatenate([[0.0], np.cumsum(c)])
    y = np.concatenate([[0.0], np.cumsum(g)])
    return [(b - a, y[b] - y[a], x[b] - x[a]) for a, b in itertools.pairwise(vertices)]


def _reference_allocation(gains, costs, budget):
    """The allocation rule, naively: repeatedly take the best next hull group
    of any open layer; a group that does not fit closes its layer after the
    units of it that still fit (which are grouped again by their own hull)."""
    left = budget * sum(float(np.sum(c)) for c in costs) * (1 + 1e-12)
    taken = [0] * len(gains)
    end = [len(g) for g in gains]
    while True:
        best = None
        for ell, (g, c) in enumerate(zip(gains, costs, strict=True)):
            if taken[ell] >= end[ell]:
                continue
            groups = _hull_groups(g[taken[ell] : end[ell]], c[taken[ell] : end[ell]])
            units, gain, cost = groups[0]
            if gain > 0 and (best is None or gain / cost > best[0]):
                best = (gain / cost, ell, units, cost)
        if best is None:
            return taken
        _, ell, units, cost = best
        if cost <= left:
            left -= cost
            taken[ell] += units
        else:
            part = costs[ell][taken[ell] : taken[ell] + units]
            end[ell] = taken[ell] + int(np.searchsorted(np.cumsum(part), left, side="right"))


@given(inst=unit_instances(max_layers=4, max_units=6), budget=budgets)
def test_allocation_takes_prefixes(inst, budget):
    """Counts are prefixes, and no layer ends its prefix on a unit that gains
    nothing: a cheap unit that only unlocks a better one is bought with it
    (hull grouping) or not at all."""
    gains, costs = inst
    taken = jl.allocate_ranks(gains, costs, budget)
    for g, t in zip(gains, taken, strict=True):
        assert 0 <= t <= len(g)
        if t > 0:
            assert g[t - 1] > 0


@given(inst=unit_instances(max_layers=4, max_units=6), budget=budgets)
def test_allocation_matches_reference_greedy(inst, budget):
    gains, costs = inst
    ratios = [
        gn / cs
        for g, c in zip(gains, costs, strict=True)
        for a in range(len(g))
        for b in range(a + 1, len(g) + 1)
        for gn, cs in [(float(np.sum(g[a:b])), float(np.sum(c[a:b])))]
        if gn > 0
    ]
    assume(_distinct(ratios))  # no ties for the two implementations to break differently
    assert jl.allocate_ranks(gains, costs, budget) == _reference_allocation(gains, costs, budget)


@given(inst=unit_instances(max_layers=3, max_units=4), budget=budgets)
def test_nonconcave_within_one_hull_group_of_optimum(inst, budget):
    """Each layer's hull bounds what any prefix can gain, so the greedy over
    hull groups is within one group's gain of the optimum."""
    gains, costs = inst
    taken = jl.allocate_ranks(gains, costs, budget)
    limit = budget * sum(float(np.sum(c)) for c in costs)
    got, _ = _totals(gains, costs, taken)
    best = _exhaustive(gains, costs, limit * (1 + tolerance(np.float64, _n_units(gains))))
    largest_group = max(gn for g, c in zip(gains, costs, strict=True) for _, gn, _ in _hull_groups(g, c))
    tol = tolerance(np.float64, _n_units(gains)) * sum(float(np.sum(g)) for g in gains)
    assert got <= best + tol
    assert best - got <= largest_group + tol


@given(inst=concave_instances(max_layers=3, max_units=4), budget=budgets)
def test_within_one_unit_of_exhaustive_optimum(inst, budget):
    gains, costs = inst
    taken = jl.allocate_ranks(gains, costs, budget)
    total_cost = sum(float(np.sum(c)) for c in costs)
    limit = budget * total_cost
    got, _ = _totals(gains, costs, taken)
    best = _exhaustive(gains, costs, limit * (1 + tolerance(np.float64, _n_units(gains))))
    tol = tolerance(np.float64, _n_units(gains)) * sum(float(np.sum(g)) for g in gains)
    assert got <= best + tol, "the greedy is feasible, so never above the optimum"
    not_taken = [g[t] for g, t in zip(gains, taken, strict=True) if t < len(g)]
    gap_bound = max(not_taken, default=0.0)
    # G ≥ OPT - g*, with g* the first unit that did not fit (one of those not taken)
    assert best - got <= gap_bound + tol


@given(inst=concave_instances(max_layers=3, max_units=4), data=st.data())
def test_exact_when_budget_spent(inst, data):
    """At the budgets the greedy lands on exactly (the breakpoints of the
    gain/cost order), the greedy total equals the exhaustive optimum."""
    gains, costs = inst
    ratios = [
        (g[i] / c[i], layer, i)
        for layer, (g, c) in enumerate(zip(gains, costs, strict=True))
        for i in range(len(g))
    ]
    order = sorted(ratios, key=lambda t: (-t[0], t[1], t[2]))
    assume(_distinct([r for r, _, _ in ratios]))
    total_cost = sum(float(np.sum(c)) for c in costs)
    stop = data.draw(st.integers(1, len(order)))
    prefix = order[:stop]
    breakpoint = sum(costs[layer][i] for _, layer, i in prefix)
    taken = jl.allocate_ranks(gains, costs, min(breakpoint / total_cost, 1.0))
    got, spent = _totals(gains, costs, taken)
    tol = tolerance(np.float64, _n_units(gains))
    assert spent == pytest.approx(breakpoint, rel=tol)
    expected_counts = [sum(1 for _, layer, _ in prefix if layer == ell) for ell in range(len(gains))]
    assert taken == expected_counts
    best = _exhaustive(gains, costs, breakpoint * (1 + tol))
    assert got == pytest.approx(best, rel=tol)


def test_budget_landed_on_after_a_skip_is_within_one_unit():
    """Spending the budget exactly is not enough for optimality: here the
    greedy skips a unit that does not fit, then fills the budget exactly with
    a poor one. The one-unit bound still holds."""
    gains = [np.array([10.0]), np.array([3.8]), np.array([7.2]), np.array([0.2])]
    costs = [np.array([5.0]), np.array([2.0]), np.array([4.0]), np.array([2.0])]
    taken = jl.allocate_ranks(gains, costs, 9.0 / 13.0)
    got, spent = _totals(gains, costs, taken)
    best = _exhaustive(gains, costs, 9.0)
    assert spent == 9.0
    assert best - got <= 7.2  # the first unit that did not fit
    assert got <= best


def test_concave_hull_groups_nonmonotone_gains():
    # layer 0: a weak unit that unlocks a strong one (ratios 0.1 then 10);
    # layer 1: two units of ratio 1. Half the budget buys two units.
    gains = [np.array([1.0, 100.0]), np.array([10.0, 10.0])]
    costs = [np.array([10.0, 10.0]), np.array([10.0, 10.0])]
    assert jl.allocate_ranks(gains, costs, 0.5) == [2, 0]
    # a budget that cannot buy the whole group buys the other layer instead
    assert jl.allocate_ranks(gains, costs, 0.25) == [0, 1]
    # the hull groups are taken as a whole, never split: the weak unit alone
    # gains little, so it is never bought on its own
    for budget in np.linspace(0.05, 1.0, 20):
        assert jl.allocate_ranks(gains, costs, float(budget))[0] in (0, 2)
    # budget for one unit: the other layer's good unit, not the weak one
    # (buying part of a group at the group's ratio would pick [1, 0])
    gains = [np.array([0.1, 10.0]), np.array([5.0])]
    costs = [np.array([1.0, 1.0]), np.array([1.0])]
    assert jl.allocate_ranks(gains, costs, 1 / 3) == [0, 1]
    # a unit that gains nothing is never bought to use up the budget
    assert jl.allocate_ranks([np.array([0.0, 1.0])], [np.array([1.0, 1.0])], 0.5) == [0]
    # what fits of a group that does not is bought in its own ratio order
    gains = [np.array([5.0, 0.1, 100.0]), np.array([1.0])]
    costs = [np.array([1.0, 1.0, 1.0]), np.array([1.0])]
    assert jl.allocate_ranks(gains, costs, 0.5) == [1, 1]


@pytest.mark.parametrize(("m", "n"), [(8, 8), (20, 6), (5, 30), (64, 48), (3, 3)])
def test_break_even_layer_stays_dense(m, n):
    r_be = jl.break_even_rank(m, n)
    # a flat spectrum: no low-rank structure at all
    k = min(m, n)
    sigma2 = np.ones(k)
    gains, costs = jl.layer_units(sigma2, m, n, total_energy=float(k))
    assert gains.shape == costs.shape == (r_be + 1,)
    # rank units up to break-even, then one unit that turns the layer dense
    assert np.array_equal(costs[:-1], jl.rank_unit_costs(m, n, r_be))
    assert np.sum(costs) == m * n, "taking every unit costs exactly the dense matrix"
    assert np.sum(gains) == pytest.approx(k), "... and keeps all its energy"
    assert gains[-1] == pytest.approx(k - r_be)
    # allocate alongside a compressible layer: a layer that gets its last unit
    # is dense (never a rank past break-even)
    other_g = np.geomspace(1.0, 1e-6, 10)
    other_c = jl.rank_unit_costs(40, 40, 10)
    for budget in np.linspace(0.05, 1.0, 12):
        taken = jl.allocate_ranks([gains, other_g], [costs, other_c], float(budget))[0]
        assert taken <= r_be + 1
        params = m * n if taken == r_be + 1 else jl.factor_params(m, n, taken)
        assert params <= m * n
        if taken <= r_be:
            assert jl.factor_params(m, n, taken) < m * n or taken == 0
    assert jl.allocate_ranks([gains, other_g], [costs, other_c], 1.0)[0] == r_be + 1


def test_layer_units_require_break_even_gains():
    with pytest.raises(ValueError, match="gains"):
        jl.layer_units(np.ones(2), 30, 30, total_energy=5.0)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33, 100, 4096])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 64, 11008])
def test_break_even_rank_definition(m, n):
    r = jl.break_even_rank(m, n)
    assert r >= 0
    assert jl.factor_params(m, n, r + 1) >= m * n, "one more rank would not pay"
    if r > 0:
        assert jl.factor_params(m, n, r) < m * n, "the factors at r are smaller than dense"
    assert r < min(m, n)


def test_factor_params_and_unit_costs_agree():
    m, n = 12, 9
    costs = jl.rank_unit_costs(m, n, 6)
    for r in range(7):
        assert jl.factor_params(m, n, r) == r * (m + n) + r * r
        assert np.sum(costs[:r]) == jl.factor_params(m, n, r)
    assert np.array_equal(costs, m + n + 2 * np.arange(6) + 1)


def test_zero_gain_units_are_never_bought():
    gains = [np.array([5.0, 0.0, 0.0]), np.array([1.0])]
    costs = [np.array([1.0, 1.0, 1.0]), np.array([1.0])]
    assert jl.allocate_ranks(gains, costs, 1.0) == [1, 1]


def test_allocation_accepts_array_backends(backend):
    gains = [backend.asarray(np.array([3.0, 1.0])), backend.asarray(np.array([2.0]))]
    costs = [backend.asarray(np.array([1.0, 1.0])), backend.asarray(np.array([1.0]))]
    assert jl.allocate_ranks(gains, costs, 2 / 3) == [1, 1]


# --- allocate_budget: the whole-model budget rule (DESIGN), without torch ----------


def _budget_problem(rng, shapes):
    """Per-layer decaying gains up to break-even and a total energy above their sum."""
    gains, energies = [], []
    for m, n in shapes:
        r_be = jl.break_even_rank(m, n)
        g = np.sort(rng.uniform(0.1, 10.0, r_be))[::-1]
        gains.append(g)
        energies.append(float(g.sum()) + rng.uniform(0.0, 5.0))
    return gains, energies


def _params(shapes, ranks, outside):
    return outside + sum(
        m * n if r is None else jl.factor_params(m, n, r)
        for (m, n), r in zip(shapes, ranks, strict=True)
    )


@given(
    seed=st.integers(0, 2**16),
    retain=st.floats(0.3, 0.999),
    allocation=st.sampled_from(["global", "uniform"]),
    min_rank=st.integers(1, 3),
)
def test_allocate_budget_meets_the_whole_model_budget(seed, retain, allocation, min_rank):
    rng = np.random.default_rng(seed)
    shapes = [(12, 10), (20, 16), (8, 24), (16, 16)]
    gains, energies = _budget_problem(rng, shapes)
    outside = 150
    total = outside + sum(m * n for m, n in shapes)
    floor = outside + sum(jl.factor_params(m, n, min(min_rank, jl.break_even_rank(m, n))) for m, n in shapes)
    if retain * total < floor:
        with pytest.raises(ValueError, match=r"`retain`=.* is too small.*must be at least"):
            jl.allocate_budget(shapes, gains, energies, retain, total, min_rank=min_rank, allocation=allocation)
        return
    ranks = jl.allocate_budget(shapes, gains, energies, retain, total, min_rank=min_rank, allocation=allocation)
    assert len(ranks) == len(shapes)
    for (m, n), r in zip(shapes, ranks, strict=True):
        # never past break-even in factored form; the floor holds
        assert r is None or min(min_rank, jl.break_even_rank(m, n)) <= r <= jl.break_even_rank(m, n)
    if allocation == "global":
        assert _params(shapes, ranks, outside) <= retain * total * (1 + 1e-12)


def test_allocate_budget_dense_when_retain_is_one(rng):
    shapes = [(12, 10), (20, 16)]
    gains, energies = _budget_problem(rng, shapes)
    total = sum(m * n for m, n in shapes) + 7
    assert jl.allocate_budget(shapes, gains, energies, 1.0, total) == [None, None]
    assert jl.allocate_budget(shapes, gains, energies, np.float32(1.0), total) == [None, None]
    # a user's fixed rank is still honoured at retain = 1
    assert jl.allocate_budget(shapes, gains, energies, 1.0, total, fixed_ranks={1: 2}) == [None, 2]


def test_allocate_budget_keeps_a_layer_dense_instead_of_capping_at_break_even():
    """A layer whose energy lies beyond break-even buys the keep-dense unit, never r_be."""
    shapes = [(10, 10), (10, 10)]
    r_be = jl.break_even_rank(10, 10)
    gains = [np.full(r_be, 1.0), np.geomspace(1.0, 1e-6, r_be)]
    # layer 0 keeps huge energy beyond break-even: worth densifying
    energies = [float(r_be) + 1e6, float(np.sum(gains[1]))]
    total = 200
    # room for layer 0 dense and layer 1 at rank 1
    retain = (100 + jl.factor_params(10, 10, 1)) / total
    ranks = jl.allocate_budget(shapes, gains, energies, retain, total)
    assert ranks == [None, 1]
    # slightly less: layer 0 cannot be dense, and is factored below break-even only
    ranks = jl.allocate_budget(shapes, gains, energies, retain - 2 / total, total)
    assert ranks[0] is not None and ranks[0] <= r_be


def test_allocate_budget_matches_allocate_ranks_on_the_units(rng):
    """The core rule is allocate_ranks on layer_units after the floor (one solver)."""
    shapes = [(12, 10), (20, 16), (8, 24)]
    gains, energies = _budget_problem(rng, shapes)
    outside = 40
    total = outside + sum(m * n for m, n in shapes)
    retain = 0.6
    ranks = jl.allocate_budget(shapes, gains, energies, retain, total)
    units = [jl.layer_units(g, m, n, e) for g, (m, n), e in zip(gains, shapes, energies, strict=True)]
    ug = [g[1:] for g, _ in units]
    uc = [c[1:] for _, c in units]
    floor = sum(jl.factor_params(m, n, 1) for m, n in shapes)
    budget = (retain * total - outside - floor) / sum(c.sum() for c in uc)
    taken = jl.allocate_ranks(ug, uc, budget)
    want = [None if t == len(g) else 1 + t for t, g in zip(taken, ug, strict=True)]
    assert ranks == want


def test_allocate_budget_fixed_ranks_are_paid_first(rng):
    shapes = [(12, 10), (20, 16)]
    gains, energies = _budget_problem(rng, shapes)
    total = sum(m * n for m, n in shapes)
    ranks = jl.allocate_budget(shapes, gains, energies, 0.5, total, fixed_ranks={0: 4})
    assert ranks[0] == 4
    assert _params(shapes, ranks, 0) <= 0.5 * total
    with pytest.raises(ValueError, match=r"`fixed_ranks\[0\]` must be an integer in \[1, 4\]"):
        jl.allocate_budget(shapes, gains, energies, 0.5, total, fixed_ranks={0: 9})


@pytest.mark.parametrize(
    ("retain", "error", "match"),
    [
        (0.0, ValueError, r"`retain` must lie in \(0, 1\].*got 0.0"),
        (1.5, ValueError, r"`retain` must lie in \(0, 1\].*got 1.5"),
        (float("nan"), ValueError, r"`retain` must lie in \(0, 1\]"),
        ("0.8", TypeError, r"`retain` must be a real number"),
        (True, TypeError, r"`retain` must be a real number"),
        (0.01, ValueError, r"`retain`=0.01 is too small: the parameters outside .* at least 0\.\d+"),
    ],
)
def test_allocate_budget_names_a_bad_retain(rng, retain, error, match):
    shapes = [(12, 10), (20, 16)]
    gains, energies = _budget_problem(rng, shapes)
    total = sum(m * n for m, n in shapes) + 30
    with pytest.raises(error, match=match):
        jl.allocate_budget(shapes, gains, energies, retain, total)


def test_allocate_budget_accepts_numpy_scalars(rng):
    shapes = [(12, 10), (20, 16)]
    gains, energies = _budget_problem(rng, shapes)
    total = sum(m * n for m, n in shapes)
    a = jl.allocate_budget(shapes, gains, energies, 0.6, total)
    assert jl.allocate_budget(shapes, gains, energies, np.float32(0.6), total) == a
    assert jl.allocate_budget(shapes, gains, energies, np.array(0.6), total) == a
    with pytest.raises(ValueError, match="allocation"):
        jl.allocate_budget(shapes, gains, energies, 0.6, total, allocation="greedy")


def test_gains_near_float64_max_do_not_overflow():
    """Issue 14 item 16: sums of gains near the float64 maximum are rescaled, not inf."""
    assert jl.allocate_ranks([np.full(3, 1e308)], [np.ones(3)], 1.0) == [3]
    assert jl.allocate_ranks([np.full(3, 1e308), np.full(2, 1e307)], [np.ones(3), np.ones(2)], 0.6) == [3, 0]
    huge_costs = [np.full(4, 1e308)]
    assert jl.allocate_ranks([np.ones(4)], huge_costs, 0.5) == [2]


def test_bisect_budget_finds_the_boundary():
    x = jl.bisect_budget(lambda t: t <= 0.3, 0.0, 1.0)
    assert 0.3 - 2.0**-50 <= x <= 0.3
    assert jl.bisect_budget(lambda t: True, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="`fits` must hold at `lo`"):
        jl.bisect_budget(lambda t: False, 0.0, 1.0)
