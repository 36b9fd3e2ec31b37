"""Benchmark ``factorization``: ``plan_layer(...).factorize(r)`` against its LAPACK floor, and the randomized path.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from jactus_linalg import DEFAULT_DAMPING, break_even_rank, plan_layer
from jactus_linalg.jactus import task_split
from validation.bench_machine import BenchResult, Row, medians, paired_ratio, profiled_once, rounds, say
from validation.bench_problems import (
    TASK_FRACTION,
    LayerProblem,
    fast_max_rank,
    layer_problem,
    shapes_for,
    typical_rank,
)


def exact_path(prob: LayerProblem, rank: int, max_rank: int | None = None, svd: str = "exact",
               task_fraction: float = TASK_FRACTION):
    """The path under test: ``plan_layer(...)`` then ``.factorize(rank)``."""
    plan = plan_layer(
        prob.weight, input_cov=prob.input_cov, grad_cov=prob.grad_cov,
        grad_mean=prob.grad_mean, task_fraction=task_fraction, svd=svd, max_rank=max_rank,
    )
    return plan, plan.factorize(rank)


@dataclass
class FloorInputs:
    """The matrices the unavoidable LAPACK calls act on (built once, untimed)."""

    damped_input: np.ndarray
    damped_grad: np.ndarray
    weight: np.ndarray  # Fortran order, as BLAS takes it
    damping: tuple[float, float]
    task_directions: int  # j at the plan's max_rank (break-even), the exact path's eigenpairs
    rank: int  # the rank the exact path cuts at: the floor un-whitens that many directions


def contract_damping(cov: np.ndarray) -> float:
    """Absolute damping of the design contract: ``DEFAULT_DAMPING * mean(diag C)``."""
    return DEFAULT_DAMPING * float(np.mean(np.diag(cov)))


def floor_inputs(prob: LayerProblem, rank: int) -> FloorInputs:
    """Damped covariances, the weight, and the task directions the exact path needs."""
    dx, dg = contract_damping(prob.input_cov), contract_damping(prob.grad_cov)
    m, n = prob.weight.shape
    return FloorInputs(
        damped_input=prob.input_cov + dx * np.eye(prob.input_cov.shape[0]),
        damped_grad=prob.grad_cov + dg * np.eye(prob.grad_cov.shape[0]),
        weight=np.asfortranarray(prob.weight),
        damping=(dx, dg),
        task_directions=max(task_split(break_even_rank(m, n), TASK_FRACTION)[1], 1),
        rank=rank,
    )


def whitening_floor(f: FloorInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cholesky of both damped covariances, then :math:`M = L_g^\top W L_x` by two ``trmm``.

    Returns ``(L_x, L_g, M)``.
    """
    lx = scipy.linalg.cholesky(f.damped_input, lower=True, check_finite=False)
    lg = scipy.linalg.cholesky(f.damped_grad, lower=True, check_finite=False)
    right = scipy.linalg.blas.dtrmm(1.0, lx, f.weight, side=1, lower=1)  # W L_x
    return lx, lg, scipy.linalg.blas.dtrmm(1.0, lg, right, lower=1, trans_a=1)  # L_g^T (W L_x)


def lapack_floor(f: FloorInputs) -> None:
    """The floor of a layer: :func:`whitening_floor`, one ``gesdd`` SVD of ``M``, the un-whitening.

    The un-whitening, :math:`A = L_g^{-\top} U_r` and :math:`B = L_x^{-\top} V_r`
    (two ``trsm``), is what turns the SVD into factors of ``W``: every
    implementation pays it (SVD-LLM's code multiplies by an explicit inverse).
    """
    lx, lg, whitened = whitening_floor(f)
    u, _, vt = scipy.linalg.svd(whitened, full_matrices=False, check_finite=False,
                                lapack_driver="gesdd")
    scipy.linalg.blas.dtrsm(1.0, lg, u[:, : f.rank], lower=1, trans_a=1)
    scipy.linalg.blas.dtrsm(1.0, lx, vt[: f.rank].T, lower=1, trans_a=1)


def task_floor(f: FloorInputs) -> None:
    """:func:`lapack_floor` plus the top-``j`` eigenpairs of both damped covariances (``syevr``).

    What the exact path at :math:`\tau > 0` cannot skip: its task directions
    :math:`E_g, E_x` (``spectral.top_eigenvectors``, exact).
    """
    lapack_floor(f)
    for cov in (f.damped_input, f.damped_grad):
        k = cov.shape[0]
        scipy.linalg.eigh(cov, subset_by_index=[k - min(f.task_directions, k), k - 1],
                          driver="evr", check_finite=False)


def check_same_damping(plan, floor: FloorInputs) -> None:
    """Raise if the plan damped differently from the floor (then they timed different matrices)."""
    used = (plan.input_op.damping, plan.grad_op.damping)
    if not np.allclose(used, floor.damping, rtol=1e-12, atol=0.0):
        msg = f"plan damping {used} differs from the floor's {floor.damping}: update the floor"
        raise RuntimeError(msg)


def factorization_runs(prob: LayerProblem, rank: int, fast_rank: int, floor: FloorInputs):
    """The timed functions, the results they keep, and the profiles of their first calls.

    Returns
    -------
    fns : dict of str to callable
        ``floor``, ``task floor``, ``whitening floor``, ``exact`` (tau 0),
        ``exact tau`` (the benchmark's tau) and ``randomized@R``.
    kept : dict
        Last ``(plan, layer)`` of each path.
    profiles : dict
        Profile entries of the first call of each path.
    """
    kept: dict[str, tuple] = {}
    profiles: dict[str, list] = {}

    def keep(name, *a, **k):
        return profiled_once(lambda: kept.__setitem__(name, exact_path(prob, *a, **k)),
                             profiles, name)

    fns = {
        "floor": lambda: lapack_floor(floor),
        "task floor": lambda: task_floor(floor),
        "whitening floor": lambda: whitening_floor(floor),
        "exact": keep("exact", rank, task_fraction=0.0),
        "exact tau": keep("exact tau", rank),
        "randomized@R": keep("randomized@R", fast_rank, fast_rank, svd="randomized"),
    }
    return fns, kept, profiles


def bench_factorization_shape(m: int, n: int, repeat: int) -> tuple[list[Row], dict, dict]:
    """Rows and details of one layer shape (see the module docstring)."""
    case = f"{m}x{n}"
    prob = layer_problem(m, n)
    rank, fast_rank = typical_rank(m, n), fast_max_rank(m, n)
    floor = floor_inputs(prob, rank)
    fns, kept, profiles = factorization_runs(prob, rank, fast_rank, floor)
    times = rounds(fns, repeat)
    check_same_damping(kept["exact tau"][0], floor)
    err_exact = exact_path(prob, fast_rank, fast_rank)[1].error  # exact@R, once, untimed
    err_fast = kept["randomized@R"][1].error
    rows = [
        Row("factorization", case, f"exact, tau 0 (r={rank}) / floor",
            paired_ratio(times, "exact", "floor"), 1.3, "<=", profile=f"exact {case}"),
        Row("factorization", case,
            f"exact, tau {TASK_FRACTION} (r={rank}) / floor + top-j eigenpairs",
            paired_ratio(times, "exact tau", "task floor"), 1.3, "<=",
            profile=f"exact tau {case}"),
        Row("factorization", case, f"randomized@R (R={fast_rank}) / whitening floor",
            paired_ratio(times, "randomized@R", "whitening floor"), 1.3, "<=",
            profile=f"randomized@R {case}"),
        Row("factorization", case, f"randomized error vs exact (R={fast_rank})",
            100 * abs(err_fast / err_exact - 1), 1.0, "<=", "%"),
    ]
    details = {
        "shape": [m, n], "tokens": prob.tokens, "rank": rank, "max_rank_fast": fast_rank,
        "break_even_rank": break_even_rank(m, n), "task_directions": floor.task_directions,
        "median_s": medians(times), "median_cpu_s": medians(times, "cpu"), "times_s": times,
        "error_exact": err_exact, "error_randomized": err_fast,
    }
    named = {f"{k} {case}": v for k, v in profiles.items()}
    return rows, details, named


def bench_factorization(args: argparse.Namespace) -> BenchResult:
    """Exact path <= 1.3x its floor; randomized path <= 1.3x the whitening floor, error within 1%."""
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
        "plan's own damping, checked), M = Lg^T W Lx by two BLAS trmm, "
        "scipy.linalg.svd(M, lapack_driver='gesdd') and the un-whitening Lg^-T U_r, Lx^-T V_r "
        "by two BLAS trsm; task floor = floor + the top-j eigenpairs "
        "of both damped covariances (scipy.linalg.eigh, driver 'evr', subset_by_index), j = "
        f"round(tau x break-even rank), tau = {TASK_FRACTION}; whitening floor = the two "
        "Cholesky factorizations and M. exact = plan_layer(W, input_cov=Cx, grad_cov=Cg, "
        "task_fraction=tau, svd='exact').factorize(r) with the default max_rank (break-even, as "
        "compress plans), at tau 0 (against the floor) and at tau (against the task floor); "
        "r = largest rank keeping <= 80% of the layer's parameters. randomized@R: the same "
        "call with svd='randomized', max_rank = R = 10% of min(m, n), factorize(R), its "
        "error against exact@R (computed once, untimed)"
    )
    return res


def print_factorization_details(res: BenchResult) -> None:
    """Median seconds and errors per shape."""
    for case, d in res.details.items():
        med = d["median_s"]
        say(f"  {case}: tokens {d['tokens']}, r={d['rank']}, R={d['max_rank_fast']}, median s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
            + f"; error exact {d['error_exact']:.6g}, randomized {d['error_randomized']:.6g}")
