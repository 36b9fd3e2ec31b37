"""Benchmark ``factorization``: ``plan_layer(...).factorize(r)`` against its LAPACK floor, and the randomized path.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from jactus_linalg import DEFAULT_DAMPING, break_even_rank, plan_layer
from validation.bench_machine import BenchResult, Row, medians, paired_ratio, profiled_once, rounds, say
from validation.bench_problems import (
    TASK_FRACTION,
    LayerProblem,
    fast_max_rank,
    layer_problem,
    shapes_for,
    typical_rank,
)


def exact_path(prob: LayerProblem, rank: int, max_rank: int | None = None, svd: str = "exact"):
    """The path under test: ``plan_layer(...)`` then ``.factorize(rank)``."""
    plan = plan_layer(
        prob.weight, input_cov=prob.input_cov, grad_cov=prob.grad_cov,
        grad_mean=prob.grad_mean, task_fraction=TASK_FRACTION, svd=svd, max_rank=max_rank,
    )
    return plan, plan.factorize(rank)


@dataclass
class FloorInputs:
    """The matrices the unavoidable LAPACK calls act on."""

    damped_input: np.ndarray
    damped_grad: np.ndarray
    whitened_weight: np.ndarray
    whitened_gradient: np.ndarray
    damping: tuple[float, float]


def contract_damping(cov: np.ndarray) -> float:
    """Absolute damping of the design contract: ``DEFAULT_DAMPING * mean(diag C)``."""
    return DEFAULT_DAMPING * float(np.mean(np.diag(cov)))


def floor_inputs(prob: LayerProblem) -> FloorInputs:
    """Damped covariances and the whitened ``M`` and ``Γ`` they give (built once, untimed)."""
    dx, dg = contract_damping(prob.input_cov), contract_damping(prob.grad_cov)
    cx = prob.input_cov + dx * np.eye(prob.input_cov.shape[0])
    cg = prob.grad_cov + dg * np.eye(prob.grad_cov.shape[0])
    lx = scipy.linalg.cholesky(cx, lower=True)
    lg = scipy.linalg.cholesky(cg, lower=True)
    gamma = scipy.linalg.solve_triangular(lx, prob.grad_mean.T, lower=True).T
    return FloorInputs(
        damped_input=cx,
        damped_grad=cg,
        whitened_weight=lg.T @ prob.weight @ lx,
        whitened_gradient=scipy.linalg.solve_triangular(lg, gamma, lower=True),
        damping=(dx, dg),
    )


def lapack_floor(f: FloorInputs) -> None:
    """Cholesky of both covariances and full gesdd SVDs of M and Γ."""
    scipy.linalg.cholesky(f.damped_input, lower=True, check_finite=False)
    scipy.linalg.cholesky(f.damped_grad, lower=True, check_finite=False)
    for a in (f.whitened_weight, f.whitened_gradient):
        scipy.linalg.svd(a, full_matrices=False, check_finite=False, lapack_driver="gesdd")


def check_same_damping(plan, floor: FloorInputs) -> None:
    """Raise if the plan damped differently from the floor (then they timed different matrices)."""
    used = (plan.input_op.damping, plan.grad_op.damping)
    if not np.allclose(used, floor.damping, rtol=1e-12, atol=0.0):
        msg = f"plan damping {used} differs from the floor's {floor.damping}: update the floor"
        raise RuntimeError(msg)


def factorization_runs(prob: LayerProblem, rank: int, fast_rank: int, floor: FloorInputs):
    """The four timed functions, the results they keep, and the profiles of their first calls.

    Returns
    -------
    fns : dict of str to callable
    kept : dict
        Last ``(plan, layer)`` of each path.
    profiles : dict
        Profile entries of the first ``exact`` and ``randomized@R`` calls.
    """
    kept: dict[str, tuple] = {}
    profiles: dict[str, list] = {}

    def keep(name, *a, **k):
        return lambda: kept.__setitem__(name, exact_path(prob, *a, **k))

    fns = {
        "floor": lambda: lapack_floor(floor),
        "exact": profiled_once(keep("exact", rank), profiles, "exact"),
        "exact@R": keep("exact@R", fast_rank, fast_rank),
        "randomized@R": profiled_once(
            keep("randomized@R", fast_rank, fast_rank, svd="randomized"), profiles, "randomized@R"),
    }
    return fns, kept, profiles


def bench_factorization_shape(m: int, n: int, repeat: int) -> tuple[list[Row], dict, dict]:
    """Rows and details of one layer shape (see the module docstring)."""
    case = f"{m}x{n}"
    prob = layer_problem(m, n)
    rank, fast_rank = typical_rank(m, n), fast_max_rank(m, n)
    floor = floor_inputs(prob)
    fns, kept, profiles = factorization_runs(prob, rank, fast_rank, floor)
    times = rounds(fns, repeat)
    check_same_damping(kept["exact"][0], floor)
    err_exact, err_fast = kept["exact@R"][1].error, kept["randomized@R"][1].error
    rows = [
        Row("factorization", case, f"exact (r={rank}) / LAPACK floor",
            paired_ratio(times, "exact", "floor"), 1.3, "<=", profile=f"exact {case}"),
        Row("factorization", case, f"exact@R / randomized@R (R={fast_rank})",
            paired_ratio(times, "exact@R", "randomized@R"), 5.0, ">=",
            profile=f"randomized@R {case}"),
        Row("factorization", case, f"randomized error vs exact (r={fast_rank})",
            100 * abs(err_fast / err_exact - 1), 1.0, "<=", "%"),
    ]
    details = {
        "shape": [m, n], "tokens": prob.tokens, "rank": rank, "max_rank_fast": fast_rank,
        "break_even_rank": break_even_rank(m, n), "median_s": medians(times),
        "median_cpu_s": medians(times, "cpu"), "times_s": times,
        "error_exact": err_exact, "error_randomized": err_fast,
    }
    named = {f"{k} {case}": v for k, v in profiles.items()}
    return rows, details, named


def bench_factorization(args: argparse.Namespace) -> BenchResult:
    """Target 1: exact path <= 1.3x its floor; randomized >= 5x faster, error within 1%."""
    res = BenchResult("factorization", "per-layer factorization time against its LAPACK floor")
    for m, n in shapes_for(args.shapes, args.quick):
        big = max(m, n) >= 4096
        repeat = args.repeat_large if big else args.repeat
        say(f"  factorization {m}x{n} ({repeat} round(s))")
        rows, details, profiles = bench_factorization_shape(m, n, repeat)
        res.rows += rows
        res.details[f"{m}x{n}"] = details
        res.profiles.update(profiles)
    res.notes.append(
        "floor = scipy.linalg.cholesky of Cx + dx I and Cg + dg I (d = 1e-3 mean diag C, the "
        "plan's own damping, checked) and "
        "scipy.linalg.svd(..., lapack_driver='gesdd') of M and Gamma, on the same matrices; "
        "exact = plan_layer(W, input_cov=Cx, grad_cov=Cg, grad_mean=G, "
        f"task_fraction={TASK_FRACTION}, svd='exact').factorize(r), r = largest rank keeping "
        "<= 80% of the layer's parameters, "
        "max_rank = break-even (the default, as compress uses it); randomized@R and exact@R use "
        "max_rank = R = 10% of min(m, n) and factorize(R)"
    )
    return res


def print_factorization_details(res: BenchResult) -> None:
    """Median seconds and errors per shape."""
    for case, d in res.details.items():
        med = d["median_s"]
        say(f"  {case}: tokens {d['tokens']}, r={d['rank']}, R={d['max_rank_fast']}, median s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
            + f"; error exact {d['error_exact']:.6g}, randomized {d['error_randomized']:.6g}")
