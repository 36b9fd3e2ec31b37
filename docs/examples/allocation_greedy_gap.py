"""Global rank allocation: greedy against the exhaustive optimum, and where the gap comes from.

Four small instances, each checked by brute force over every prefix
combination:

1. concave layers (gain/cost non-increasing within each layer), at budgets
   that land exactly on a prefix of the ratio-sorted order (greedy is
   optimal there) and at budgets in between (greedy is within the gain of
   the first unit that did not fit);
2. a concave instance where the greedy *also* spends the budget exactly,
   but only after skipping a unit: spending exactly is not enough for
   optimality;
3. a non-concave layer, like a JACTUS layer whose interleaved task units
   gain little and unlock a large weight unit: the upper concave hull groups
   them;
4. the break-even rank and the "keep dense" unit of ``layer_units``.

Run: ``python docs/examples/allocation_greedy_gap.py``
"""

from __future__ import annotations

import itertools

import numpy as np

from jactus_linalg import (
    allocate_ranks,
    break_even_rank,
    factor_params,
    layer_units,
    plan_layer,
    task_split,
)


def exhaustive(gains: list[np.ndarray], costs: list[np.ndarray], limit: float) -> float:
    """Best total gain over all prefix choices with cost <= limit."""
    best = 0.0
    cum_g = [np.concatenate([[0.0], np.cumsum(g)]) for g in gains]
    cum_c = [np.concatenate([[0.0], np.cumsum(c)]) for c in costs]
    for choice in itertools.product(*(range(len(g) + 1) for g in gains)):
        cost = sum(c[t] for c, t in zip(cum_c, choice, strict=True))
        if cost <= limit * (1 + 1e-12):
            best = max(best, sum(g[t] for g, t in zip(cum_g, choice, strict=True)))
    return best


def hull_groups(gains: np.ndarray, costs: np.ndarray) -> list[tuple[int, int, float]]:
    """Upper concave hull of the prefix curve: (first unit, last unit, gain/cost) per group."""
    x = np.concatenate([[0.0], np.cumsum(costs)])
    y = np.concatenate([[0.0], np.cumsum(gains)])
    hull = [0]
    for i in range(1, len(x)):
        while len(hull) >= 2:
            p, t = hull[-2], hull[-1]
            if (y[t] - y[p]) * (x[i] - x[t]) <= (y[i] - y[t]) * (x[t] - x[p]):
                hull.pop()  # t is on or below the chord from p to i
            else:
                break
        hull.append(i)
    return [(a + 1, b, (y[b] - y[a]) / (x[b] - x[a])) for a, b in itertools.pairwise(hull)]


def greedy_total(gains, costs, budget):
    taken = allocate_ranks(gains, costs, budget)
    gain = sum(float(g[:t].sum()) for g, t in zip(gains, taken, strict=True))
    cost = sum(float(c[:t].sum()) for c, t in zip(costs, taken, strict=True))
    return taken, gain, cost


def concave_instance() -> None:
    print("1. concave layers (3 layers, 4 units each, costs m + n + 2r + 1)")
    rng = np.random.default_rng(6)
    shapes = [(8, 6), (10, 4), (6, 6)]
    costs = [m + n + 1 + 2 * np.arange(4.0) for m, n in shapes]
    gains = [np.sort(rng.uniform(1, 10, 4))[::-1] * c / c[0] / (1 + np.arange(4)) for c in costs]
    total = sum(float(c.sum()) for c in costs)
    # ratio-sorted order of all units (concave: within-layer order is respected)
    units = sorted(
        (
            (g[i] / c[i], li, i)
            for li, (g, c) in enumerate(zip(gains, costs, strict=True))
            for i in range(4)
        ),
        key=lambda u: (-u[0], u[1], u[2]),
    )
    prefix_costs = np.cumsum([costs[li][i] for _, li, i in units])
    budgets = sorted({*(prefix_costs[[2, 5, 8]] / total), 0.1, 0.53, 0.9})
    print(
        f"   {'budget':>7} | {'greedy':>8} | {'optimum':>8} | {'gap':>7} | "
        f"{'g* (first misfit)':>17} | prefix"
    )
    for b in budgets:
        _, gain, _ = greedy_total(gains, costs, b)
        opt = exhaustive(gains, costs, b * total)
        n_fit = int(np.searchsorted(prefix_costs, b * total * (1 + 1e-12), side="right"))
        g_star = gains[units[n_fit][1]][units[n_fit][2]] if n_fit < len(units) else 0.0
        on_prefix = bool(np.isclose(prefix_costs, b * total, rtol=1e-12).any())
        print(
            f"   {b:7.4f} | {gain:8.4f} | {opt:8.4f} | {opt - gain:7.4f} | "
            f"{g_star:17.4f} | {on_prefix}"
        )
        assert gain <= opt * (1 + 1e-12) and opt - gain <= g_star * (1 + 1e-12)
        if on_prefix:
            assert np.isclose(gain, opt, rtol=1e-12)


def exact_spend_is_not_enough() -> None:
    print("\n2. the budget spent exactly after a skipped unit (one unit per layer)")
    gains = [np.array([2.0]), np.array([1.9]), np.array([0.1]), np.array([2.8])]
    costs = [np.array([2.0]), np.array([2.0]), np.array([1.0]), np.array([3.0])]
    budget = 5.0 / 8.0
    taken, gain, cost = greedy_total(gains, costs, budget)
    opt = exhaustive(gains, costs, 5.0)
    print(
        f"   ratios 1.00, 0.95, 0.10, 0.93; budget 5 of 8: greedy takes {taken}, "
        f"cost {cost:g}, gain {gain:g}; optimum {opt:g} (layers 1 and 4)"
    )
    print(f"   gap {opt - gain:g} <= gain of the first misfit (layer 4) = 2.8")
    assert cost == 5.0 and gain < opt and opt - gain <= 2.8


def non_concave_layer() -> None:
    print("\n3. a non-concave layer: a small task unit in front of a large weight unit")
    rng = np.random.default_rng(8)
    m, n = 24, 32
    weight = rng.standard_normal((m, n)) * np.geomspace(1, 0.1, n)
    plan = plan_layer(
        weight,
        grad_cov=np.cov(rng.standard_normal((m, 4 * m))),
        input_cov=np.cov(rng.standard_normal((n, 4 * n))),
        task_fraction=0.25,
        max_rank=8,
    )
    ratios = plan.gains / plan.costs
    print("   a JACTUS layer (tau=0.25), units 1-8:")
    print("   gain/cost " + " ".join(f"{x:.1e}" for x in ratios))
    task_units = [
        r
        for r in range(1, 9)
        if task_split(r, 0.25, plan.task_rank)[1] > task_split(r - 1, 0.25, plan.task_rank)[1]
    ]
    print(f"   task units (j grows): {task_units}; their low ratios make the layer non-concave")
    groups = hull_groups(plan.gains, plan.costs)
    print(
        "   upper-concave-hull groups: "
        + ", ".join(
            f"units {a}-{b} ({ratio:.2e})" if a < b else f"unit {a} ({ratio:.2e})"
            for a, b, ratio in groups
        )
    )
    assert all(g1[2] >= g2[2] for g1, g2 in itertools.pairwise(groups))
    print("   synthetic two-layer instance, checked by brute force:")
    gains = [np.array([4.0, 0.001, 3.5, 0.5]), np.array([3.0, 2.0, 1.0, 0.5])]
    costs = [np.array([10.0, 12.0, 14.0, 16.0]), np.array([10.0, 12.0, 14.0, 16.0])]
    total = sum(float(c.sum()) for c in costs)
    for limit in (20.0, 36.0, 48.0):
        taken, gain, _ = greedy_total(gains, costs, limit / total)
        opt = exhaustive(gains, costs, limit)
        print(f"   budget {limit:4.0f}: greedy takes {taken}, gain {gain:.3f}; optimum {opt:.3f}")
        assert gain <= opt * (1 + 1e-12)


def break_even() -> None:
    print("\n4. break-even rank and the dense unit")
    m, n = 8, 8
    r_be = break_even_rank(m, n)
    print(
        f"   {m}x{n} layer: break-even rank {r_be} "
        f"(factor_params: r={r_be} -> {factor_params(m, n, r_be)}, "
        f"r={r_be + 1} -> {factor_params(m, n, r_be + 1)}, dense {m * n})"
    )
    gains, costs = layer_units(np.array([5.0, 3.0, 1.0, 0.5, 0.2]), m, n, total_energy=10.0)
    print(
        f"   layer_units gains {gains.tolist()}, costs {costs.tolist()} "
        f"(the last unit turns the layer dense; costs sum to {costs.sum():g} = m n)"
    )
    assert costs.sum() == m * n
    taken = allocate_ranks([gains], [costs], 1.0)
    print(f"   budget 1.0 -> {taken[0]} of {len(gains)} units: the layer stays dense")
    assert taken[0] == len(gains)


def main() -> None:
    concave_instance()
    exact_spend_is_not_enough()
    non_concave_layer()
    break_even()


if __name__ == "__main__":
    main()
