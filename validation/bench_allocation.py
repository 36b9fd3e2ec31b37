"""Benchmark ``allocation``: ``allocate_ranks`` for 1,000 layers x 4,096 units.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import argparse

import numpy as np

from jactus_linalg import allocate_ranks, rank_unit_costs
from validation.bench_machine import BenchResult, Row, medians, profiled_once, rounds, say


def allocation_instance(layers: int, units: int, concave: bool, seed: int = 0):
    """Per-layer gains and costs of a 4096x4096-layer-like instance.

    Concave: gains decay as a per-layer power law, so gain/cost falls. Non-concave:
    the same gains times a factor in [0.2, 1.8) per unit, so ratios rise
    and fall and the allocator must group units by their upper concave hull.
    """
    rng = np.random.default_rng(seed)
    steps = np.arange(1, units + 1, dtype=np.float64)
    costs = rank_unit_costs(4096, 4096, units)
    gains, cost_list = [], []
    for _ in range(layers):
        g = rng.uniform(0.5, 2.0) * steps ** -rng.uniform(0.5, 2.0)
        if not concave:
            g = g * rng.uniform(0.2, 1.8, units)
        gains.append(g)
        cost_list.append(costs.copy())
    return gains, cost_list


def bench_allocation(args: argparse.Namespace) -> BenchResult:
    """Target 5: ``allocate_ranks`` for 1,000 layers x 4,096 units in < 1 s."""
    res = BenchResult("allocation", "global rank allocation")
    layers, units = (100, 512) if args.quick else (1000, 4096)
    case = f"{layers} layers x {units} units"
    say(f"  allocation: {case}, {args.repeat} round(s)")
    for concave in (True, False):
        gains, costs = allocation_instance(layers, units, concave)
        taken: list[int] = []

        def run(g=gains, c=costs, out=taken):
            out[:] = allocate_ranks(g, c, 0.5)

        kind = "concave" if concave else "non-concave"
        times = rounds({"allocate": run}, args.repeat)
        # profiled apart: cProfile's per-call cost is large against millions of Python calls
        profiled_once(run, res.profiles, kind)()
        res.rows.append(Row("allocation", f"{case}, {kind}", "allocate_ranks(budget=0.5) time",
                            medians(times)["allocate"], 1.0, "<=", "s", profile=kind))
        res.details[kind] = {"times_s": times["allocate"], "units_taken": int(sum(taken))}
    return res
