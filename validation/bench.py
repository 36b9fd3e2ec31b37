"""Performance benchmarks of jactus_linalg, each a ratio measured in one run against its target.

Usage
-----
``python validation/bench.py``                    every benchmark (ViT shapes + Llama 4096x4096)
``python validation/bench.py --quick``            small shapes, seconds (used by the test suite)
``python validation/bench.py --only factorization --shapes all``   one benchmark, every shape
``python validation/bench.py --json bench.json``  also save every number

Benchmarks (targets from the project's issue):

``factorization``
    Per layer, ``plan_layer(..., svd="exact").factorize(r)`` against its LAPACK
    floor (Cholesky of the damped ``Cx`` and ``Cg``, gesdd SVDs of ``M`` and
    ``Gamma``, timed alone on the same matrices): <= 1.3x. The randomized path
    at ``max_rank`` = 10% of ``min(m, n)``: >= 5x faster than the exact path at
    that ``max_rank``, with its curvature-norm error within 1%.
``compress``
    ``jactus_linalg.torch.compress`` of a randomly initialised ViT-Base (72
    linears) from synthetic float64 statistics, in a fresh subprocess: < 60 s,
    peak RSS increase < 3x the statistics.
``calibration``
    ``calibrate`` over N batches against a plain forward+backward over the same
    batches: <= 1.6x.
``deployed``
    Forward latency of the model compressed at retain 0.8 against the dense
    model (<= 1.0x); a training step with only the cores trainable against a
    peft LoRA step at equal batch (<= 1.0x); AdamW state memory of both.
``allocation``
    ``allocate_ranks`` for 1,000 layers x 4,096 units: < 1 s (concave and
    non-concave gains).
``peers``
    ``projected_lowrank(W, r, input_cov=XᵀX, damping="svd-llm")`` against the
    transcription of SVD-LLM's per-layer code
    (``validation/svdllm_reference.py``) on the same float32 weight and
    float64 Gram, at the factorization shapes: <= 1.0x, at equal output
    error. An MKL SVD (torch) timed right after the package's whitening of a
    torch covariance, against the same SVD cold: <= 1.1x (no scipy/OpenBLAS
    call on the torch path). In ``validation/bench_peers.py``.
``mergeable``
    The mergeable core of a layer kept dense against peft LoRA on the same
    layer at the same rank (``validation/bench_mergeable.py``): training
    step <= 1.0x, training memory <= 1.0x.

Times are medians over ``--repeat`` rounds; within a round the timed
functions run back to back in rotating order, so a ratio is the median of
ratios measured side by side under the same machine load. Threads
(``--threads auto``) are chosen before each benchmark: one per core, unless
small SVDs show multi-threaded LAPACK collapsing on a busy shared machine
(then 1). The first call of each path under test runs under cProfile; the
profile is printed where a target is missed (``--profile``: always). The
exit status is 0 unless a benchmark fails to run (``--strict``: also 1 on
any MISS).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("factorization", "compress", "calibration", "deployed", "allocation", "peers", "mergeable")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _threads_from_argv(argv: Sequence[str]) -> int | None:
    """An integer ``--threads`` value, read before numpy loads its BLAS (``auto`` gives None)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
    return int(value) if value is not None and value.isdigit() else None


if (_THREADS := _threads_from_argv(sys.argv[1:])) is not None:
    for _var in THREAD_VARS:
        os.environ[_var] = str(_THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from jactus_linalg import (  # noqa: E402
    DEFAULT_DAMPING,
    allocate_ranks,
    break_even_rank,
    factor_params,
    plan_layer,
    rank_unit_costs,
)

# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass
class Row:
    """One measured quantity against its target.

    Attributes
    ----------
    bench, case, metric : str
        Benchmark, what was measured on (a shape, a model), and the quantity.
    value, target : float
        Measured value and target, in ``unit``.
    sense : {"<=", ">="}
        The value passes when ``value <= target`` (or ``>=``).
    unit : str
        ``"x"`` for ratios, ``"s"`` for seconds, ``"%"`` for percentages.
    profile : str or None
        Key of the profile (in :attr:`BenchResult.profiles`) that explains
        this value: printed when the target is missed (or with ``--profile``).
    threads : int
        BLAS/OpenMP/torch threads it was measured with.
    """

    bench: str
    case: str
    metric: str
    value: float
    target: float
    sense: str
    unit: str = "x"
    profile: str | None = None
    threads: int = 0

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.target if self.sense == "<=" else self.value >= self.target

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class BenchResult:
    """Rows, supporting numbers and notes of one benchmark."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: dict = field(default_factory=dict)
    seconds: float = 0.0
    threads: int = 0
    conditions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "threads": self.threads,
            "conditions": self.conditions,
            "rows": [r.to_dict() for r in self.rows],
            "details": self.details,
            "notes": self.notes,
            "profiles": self.profiles,
            "seconds": self.seconds,
        }

    def profiles_to_show(self, show: bool | None) -> list[str]:
        """Profile keys to print: all (``True``), none (``False``), or those of missed rows."""
        if show is False:
            return []
        keys = [r.profile for r in self.rows if r.profile and (show or not r.passed)]
        return [k for k in dict.fromkeys(keys) if k in self.profiles]


def _fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.3f}%"
    return f"{value:.3g} {unit}"


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table: benchmark, case, metric, threads, measured, target, PASS/MISS."""
    head = ("benchmark", "case", "metric", "thr", "measured", "target", "result")
    body = [
        (r.bench, r.case, r.metric, str(r.threads), _fmt(r.value, r.unit),
         f"{r.sense} {_fmt(r.target, r.unit)}", "PASS" if r.passed else "MISS")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def say(*parts: object) -> None:
    """Print and flush (progress lines interleave with subprocess output)."""
    print(*parts, flush=True)


# ---------------------------------------------------------------------------
# machine and timing
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_threads() -> list[dict]:
    """Thread pools of the loaded BLAS/OpenMP libraries (threadpoolctl, if installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {"api": p.get("internal_api"), "threads": p.get("num_threads"),
         "lib": Path(p.get("filepath", "")).name}
        for p in threadpool_info()
    ]


def available_cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def git_state() -> dict:
    """Commit of the checkout and the uncommitted files under ``jactus_linalg/``."""
    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout if done.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "jactus_linalg").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "core_uncommitted": [line.split(maxsplit=1)[1] for line in dirty if line.strip()]}


def machine_info() -> dict:
    """CPU model, cores, thread pools, library versions, load average, date and git state."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "blas_threads": blas_threads(),
        "load_average_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "git": git_state(),
    }


Timings = dict  # {function name: {"wall": [s per round], "cpu": [s per round]}}


def rounds(fns: dict[str, Callable[[], object]], repeat: int) -> Timings:
    """Wall and process-CPU time of each function, ``repeat`` rounds, rotating order.

    Parameters
    ----------
    fns : dict of str to callable
        The functions to compare side by side.
    repeat : int
        Rounds; each runs every function once, starting one further along
        the list than the round before, so no function always goes first.

    Returns
    -------
    dict
        ``{name: {"wall": [...], "cpu": [...]}}``, seconds per round.
    """
    names = list(fns)
    times = {k: {"wall": [0.0] * repeat, "cpu": [0.0] * repeat} for k in names}
    for i in range(repeat):
        shift = i % len(names)
        for k in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[k]()
            times[k]["wall"][i] = time.perf_counter() - wall
            times[k]["cpu"][i] = time.process_time() - cpu
    return times


def paired_ratio(times: Timings, num: str, den: str, kind: str = "wall") -> float:
    """Median over rounds of ``num / den`` times (ratios measured side by side)."""
    pairs = zip(times[num][kind], times[den][kind], strict=True)
    return statistics.median(a / b for a, b in pairs)


def medians(times: Timings, kind: str = "wall") -> dict[str, float]:
    """Median seconds of each timed function."""
    return {k: statistics.median(v[kind]) for k, v in times.items()}


def set_threads(n: int) -> None:
    """Set the BLAS/OpenMP pools (threadpoolctl) and torch's intra-op threads to ``n``."""
    import torch

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the pools keep what the environment gave them
        pass
    else:
        threadpool_limits(limits=n)
    torch.set_num_threads(n)


#: ``auto``: (SVD size, largest tolerated slowdown of one thread per core against one thread).
#: A busy machine shows at 256x256 already, cheaply (2 s, not 20 s at 768x768, when
#: collapsed); 768x768 then checks that a second thread is not plainly slower.
PROBES = ((256, 3.0), (768, 1.5))


def _probe_seconds(size: int, give_up: float = math.inf) -> float:
    """Median of 3 timings (after a warm-up) of a ``size`` SVD by scipy plus one by torch.

    Stops early, returning the time so far, once a single timing exceeds ``give_up``.
    """
    import torch

    a = np.random.default_rng(0).standard_normal((size, size))
    t = torch.from_numpy(a)
    runs = []
    for _ in range(4):
        start = time.perf_counter()
        scipy.linalg.svd(a, lapack_driver="gesdd")
        torch.linalg.svd(t)
        runs.append(time.perf_counter() - start)
        if runs[-1] > give_up:
            return runs[-1]
    return statistics.median(runs[1:])


def choose_threads(requested: str, cores: int) -> tuple[int, dict]:
    """Thread count for the run: ``requested``, or for ``auto`` 1 or ``cores``.

    On a shared machine whose cores are busy, multi-threaded LAPACK can be
    tens of times slower than one thread (its threads wait at barriers for a
    core). ``auto`` times small SVDs both ways (:data:`PROBES`) and uses one
    thread per core unless that is slower than one thread by more than the
    tolerated factor.

    Returns
    -------
    threads : int
    probe : dict
        ``{size: {threads: seconds}}`` of the SVDs timed (empty unless ``auto``).
    """
    if requested != "auto":
        return int(requested), {}
    if cores <= 1:
        return 1, {}
    probe: dict[str, dict[str, float]] = {}
    for size, tolerated in PROBES:
        set_threads(1)
        one = _probe_seconds(size)
        set_threads(cores)
        many = _probe_seconds(size, give_up=tolerated * one)
        probe[str(size)] = {"1": one, str(cores): many}
        if many > tolerated * one:
            return 1, probe
    return cores, probe


def profile_entries(prof: cProfile.Profile, top: int = 14) -> dict:
    """Self time of the heaviest functions a profiler saw, heaviest first.

    Matrix products written as ``@`` are not Python calls: their time is the
    self time of the function that writes them. LAPACK calls show up as the
    scipy/torch function that makes them.

    Returns
    -------
    dict
        ``{"total_s": profiled seconds, "entries": [{"function", "calls",
        "self_s", "cumulative_s"}, ...]}``.
    """
    stats = pstats.Stats(prof)
    entries = [
        {"function": f"{_short_path(path)}:{line}({func})", "calls": calls, "self_s": self_s,
         "cumulative_s": cum_s}
        for (path, line, func), (_, calls, self_s, cum_s, _) in stats.stats.items()
    ]
    entries.sort(key=lambda e: e["self_s"], reverse=True)
    return {"total_s": stats.total_tt, "entries": entries[:top]}


def profiled_once(fn: Callable[[], object], store: dict, key: str) -> Callable[[], object]:
    """``fn``, whose first call runs under cProfile (into ``store[key]``).

    The profiler costs about a microsecond per Python call; a factorization
    makes a few thousand, against LAPACK calls of milliseconds to minutes.
    """

    def run():
        if key in store:
            return fn()
        prof = cProfile.Profile()
        prof.enable()
        try:
            return fn()
        finally:
            prof.disable()
            store[key] = profile_entries(prof)

    return run


def _short_path(path: str) -> str:
    """``jactus_linalg/...`` or the part after ``site-packages/`` (``~`` for built-ins)."""
    if "jactus_linalg/" in path:
        return "jactus_linalg/" + path.rsplit("jactus_linalg/", 1)[1]
    return path.split("site-packages/", 1)[-1]


def format_profile(profile: dict) -> str:
    """A :func:`profile_entries` result as text lines, with each share of the total."""
    total = profile["total_s"]
    lines = [f"    {'self s':>8} {'share':>6} {'calls':>6}  function (of {total:.3f} s profiled)"]
    for e in profile["entries"]:
        share = 100 * e["self_s"] / total if total > 0 else math.nan
        lines.append(f"    {e['self_s']:8.3f} {share:5.1f}% {e['calls']:6d}  {e['function']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 1. per-layer factorization against its LAPACK floor
# ---------------------------------------------------------------------------

VIT_SHAPES = [(768, 768), (3072, 768), (768, 3072)]
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(192, 192), (384, 192), (192, 384)]
TASK_FRACTION = 0.25
TOKENS_PER_FEATURE = 1.25  # calibration tokens per feature of the wider side
TASK_RANK = 16  # rank of the input-gradient coupling that makes G = E[g x^T] informative


@dataclass
class LayerProblem:
    """Weight and realistic statistics of one layer (float64 numpy)."""

    weight: np.ndarray
    input_cov: np.ndarray
    grad_cov: np.ndarray
    grad_mean: np.ndarray
    tokens: int


def random_orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """``rows x cols`` orthonormal columns (QR of a Gaussian matrix)."""
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def decaying_tokens(rng: np.random.Generator, count: int, dim: int, ratio: float) -> np.ndarray:
    """``count`` tokens whose covariance has a geometric spectrum from 1 down to ``ratio``."""
    scales = np.geomspace(1.0, math.sqrt(ratio), dim)
    return (rng.standard_normal((count, dim)) * scales) @ random_orthonormal(rng, dim, dim).T


def known_spectrum_matrix(rng: np.random.Generator, m: int, n: int, ratio: float) -> np.ndarray:
    """``U diag(s) Vᵀ``: random orthonormal ``U``, ``V``; ``s`` geometric from 1 to ``ratio``."""
    k = min(m, n)
    s = np.geomspace(1.0, ratio, k)
    return (random_orthonormal(rng, m, k) * s) @ random_orthonormal(rng, n, k).T


def layer_problem(m: int, n: int, seed: int = 0) -> LayerProblem:
    """Weight ``W`` (m x n) with a decaying spectrum and statistics from N > max(m, n) tokens.

    Inputs ``x`` have a covariance spectrum decaying over 4 decades; output
    gradients are ``g = g0 + T x`` with ``g0`` of a decaying spectrum and a
    rank-16 task map ``T``, so ``G = E[g xᵀ]`` carries a low-rank signal
    above sampling noise, as a real task gradient does.
    """
    rng = np.random.default_rng(seed)
    tokens = math.ceil(TOKENS_PER_FEATURE * max(m, n))
    weight = known_spectrum_matrix(rng, m, n, 1e-3)
    x = decaying_tokens(rng, tokens, n, 1e-4)
    g = decaying_tokens(rng, tokens, m, 1e-4)
    task = (rng.standard_normal((n, TASK_RANK)), rng.standard_normal((m, TASK_RANK)))
    g += (x @ task[0]) @ task[1].T / math.sqrt(n * TASK_RANK)
    return LayerProblem(
        weight=weight,
        input_cov=x.T @ x / tokens,
        grad_cov=g.T @ g / tokens,
        grad_mean=g.T @ x / tokens,
        tokens=tokens,
    )


def typical_rank(m: int, n: int, keep: float = 0.8) -> int:
    """Largest rank whose factors hold at most ``keep`` of the dense layer's parameters."""
    r = break_even_rank(m, n)
    while r > 1 and factor_params(m, n, r) > keep * m * n:
        r -= 1
    return r


def fast_max_rank(m: int, n: int) -> int:
    """``max_rank`` = k + j for the fast path: 10% of ``min(m, n)``."""
    return max(int(0.1 * min(m, n)), 1)


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


def shapes_for(which: str, quick: bool) -> list[tuple[int, int]]:
    """Layer shapes of a run: ``default`` is ViT-Base plus Llama's 4096x4096."""
    if quick:
        return QUICK_SHAPES
    return {
        "default": [*VIT_SHAPES, LLAMA_SHAPES[0]],
        "vit": VIT_SHAPES,
        "llama": LLAMA_SHAPES,
        "all": [*VIT_SHAPES, *LLAMA_SHAPES],
    }[which]


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


# ---------------------------------------------------------------------------
# 2. whole-model compression of ViT-Base (fresh subprocess)
# ---------------------------------------------------------------------------

CALIBRATION_TOKENS = 256 * 197  # 256 images of 197 tokens, as the statistics' sample count
LORA_RANK = 8  # the peft LoRA baseline's rank (benchmarks 2 and 4)


def vit_config(quick: bool, layers: int | None = None):
    """ViT-Base (``ViTConfig()`` defaults), or a tiny ViT for ``--quick``."""
    from transformers import ViTConfig

    if quick:
        config = ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
    else:
        config = ViTConfig()
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def build_vit(config, seed: int = 0):
    """``ViTForImageClassification`` with random init, in eval mode."""
    import torch
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval()


def input_groups(model, example) -> dict[str, str]:
    """``{target layer: name of the first target reading the same input tensor}``."""
    import torch

    from jactus_linalg.torch.targets import find_targets

    first: dict[int, str] = {}
    groups: dict[str, str] = {}
    keep = []

    def hook(name):
        def record(_mod, args):
            keep.append(args[0])
            groups[name] = first.setdefault(id(args[0]), name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in find_targets(model).items()]
    try:
        with torch.no_grad():
            model(pixel_values=example)
    finally:
        for h in handles:
            h.remove()
    return groups


def base_second_moment(dim: int, seed: int, ratio: float = 1e-4):
    """float64 torch Gram matrix of ``1.25 dim`` tokens with a decaying spectrum."""
    import torch

    rng = np.random.default_rng(seed)
    x = decaying_tokens(rng, math.ceil(TOKENS_PER_FEATURE * dim), dim, ratio)
    return torch.from_numpy(x.T @ x / x.shape[0])


def synthetic_stats(model, example, seed: int = 0):
    """A :class:`CalibrationStats` for every target of ``model``, filled without calibrating.

    Each second moment is a per-dimension base Gram matrix (tokens with a
    decaying spectrum) under a random per-layer diagonal rescaling, so every
    layer differs; each ``G`` is a rank-16 task signal plus noise. All float64.
    """
    import torch

    from jactus_linalg import MomentAccumulator
    from jactus_linalg.torch.stats import CalibrationStats, LayerInfo
    from jactus_linalg.torch.targets import find_targets

    targets = find_targets(model)
    groups = input_groups(model, example)
    stats = CalibrationStats(meta={"model": type(model).__name__, "targets": "all-linear",
                                   "exclude": None, "mode": "gram", "synthetic": True})
    gen = torch.Generator().manual_seed(seed)
    bases: dict[int, torch.Tensor] = {}

    def moment(dim: int, name: str) -> MomentAccumulator:
        if dim not in bases:
            bases[dim] = base_second_moment(dim, seed + dim)
        scale = torch.exp(torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5)
        acc = MomentAccumulator(dim, name=name, mode="gram", dtype="float64")
        acc.total = (scale[:, None] * bases[dim] * scale[None, :]) * CALIBRATION_TOKENS
        acc.count = CALIBRATION_TOKENS
        return acc

    for name, mod in targets.items():
        m, n = mod.out_features, mod.in_features
        group = groups[name]
        stats.layers[name] = LayerInfo(name, n, m, group)
        if group not in stats.inputs:
            stats.inputs[group] = moment(n, f"{name}:input_cov")
        stats.grads[name] = moment(m, f"{name}:grad_cov")
        left = torch.randn(m, TASK_RANK, generator=gen, dtype=torch.float64)
        right = torch.randn(n, TASK_RANK, generator=gen, dtype=torch.float64)
        noise = torch.randn(m, n, generator=gen, dtype=torch.float64)
        stats.grad_sums[name] = (left @ right.T / TASK_RANK + 0.01 * noise) * CALIBRATION_TOKENS
    stats.n_batches = 1
    return stats


def stats_nbytes(stats) -> int:
    """Bytes held by the statistics' tensors (input and gradient moments, ``G`` sums)."""
    tensors = [a.total for a in (*stats.inputs.values(), *stats.grads.values())]
    tensors += list(stats.grad_sums.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def proc_status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    msg = f"/proc/self/status has no {key}"
    raise RuntimeError(msg)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); ``False`` if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def compress_worker(quick: bool) -> dict:
    """Build ViT-Base and its statistics, then time ``compress`` and its peak RSS increase."""
    import torch

    from jactus_linalg.torch import compress, core_parameters
    from jactus_linalg.torch.baselines import lora_adapter_params
    from jactus_linalg.torch.targets import find_targets

    config = vit_config(quick)
    model = build_vit(config)
    shapes = [(m.out_features, m.in_features) for m in find_targets(model).values()]
    example = torch.zeros(1, config.num_channels, config.image_size, config.image_size)
    stats = synthetic_stats(model, example)
    rss_before = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    prof = cProfile.Profile()  # ~1 us per Python call; compress makes ~1e5, in minutes of LAPACK
    start = time.perf_counter()
    prof.enable()
    report = compress(model, stats, retain=0.8, progress=False)
    prof.disable()
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    out = {
        "seconds": seconds, "layers": len(stats), "stats_bytes": stats_nbytes(stats),
        "rss_before_kib": rss_before, "peak_kib": peak, "peak_reset": reset,
        "peak_increase_bytes": 1024 * (peak - rss_before),
        "retain_achieved": report.retain_achieved, "params_before": report.params_before,
        "params_after": report.params_after,
        "dense_layers": sum(r.rank is None for r in report.layers),
        "core_params": sum(p.numel() for p in core_parameters(model)),
        "lora_params": lora_adapter_params(shapes, LORA_RANK),
        "torch_threads": torch.get_num_threads(),
    }
    out["profile"] = profile_entries(prof)
    return out


def run_worker(name: str, args: argparse.Namespace) -> dict:
    """Run ``bench.py --worker name`` in a fresh interpreter; return its JSON output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
               "--worker-out", str(out)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            msg = f"worker {name} failed ({done.returncode}):\n{done.stderr[-4000:]}"
            raise RuntimeError(msg)
        return json.loads(out.read_text())


def bench_compress(args: argparse.Namespace) -> BenchResult:
    """Target 2: compress ViT-Base in < 60 s, peak RSS increase < 3x the statistics."""
    res = BenchResult("compress", "whole-model compression of a ViT-Base-shaped model")
    case = "tiny ViT (quick)" if args.quick else "ViT-Base, 72 linears"
    say(f"  compress: {case}, fresh subprocess")
    d = run_worker("compress", args)
    res.profiles["compress"] = d.pop("profile")
    res.details = d
    res.rows = [
        Row("compress", case, "compress(retain=0.8) wall time", d["seconds"], 60.0, "<=", "s",
            profile="compress"),
        Row("compress", case, "peak RSS increase / statistics size",
            d["peak_increase_bytes"] / d["stats_bytes"], 3.0, "<="),
    ]
    res.notes.append(
        f"statistics: {d['stats_bytes'] / 2**20:.0f} MiB (float64 Cx per input group, Cg and G "
        f"per layer, {d['layers']} layers); RSS before compress {d['rss_before_kib'] / 1024:.0f} "
        f"MiB (model + statistics), peak during compress {d['peak_kib'] / 1024:.0f} MiB "
        f"(VmHWM{' reset before compress' if d['peak_reset'] else ', NOT reset: upper bound'}); "
        f"retain achieved {d['retain_achieved']:.4f}, {d['dense_layers']} layer(s) kept dense; "
        f"AdamW state (2 x params x 4 bytes) to tune the {d['core_params']} core parameters: "
        f"{8 * d['core_params'] / 2**20:.1f} MiB, LoRA r={LORA_RANK} on every target "
        f"({d['lora_params']} adapter parameters): {8 * d['lora_params'] / 2**20:.1f} MiB "
        "(heads not counted)"
    )
    return res


# ---------------------------------------------------------------------------
# 3. calibration overhead and 4. deployed model (shared model and batches)
# ---------------------------------------------------------------------------


@dataclass
class VitSetup:
    """A ViT, its calibration batches and loss, shared by benchmarks 3 and 4."""

    model: object
    batches: list
    loss_fn: Callable
    label: str
    stats: object = None


def vit_setup(args: argparse.Namespace) -> VitSetup:
    """ViT-Base widths (768/3072, 12 heads, 197 tokens) with ``--vit-layers`` layers."""
    import torch

    config = vit_config(args.quick, None if args.quick else args.vit_layers)
    model = build_vit(config)
    gen = torch.Generator().manual_seed(1)
    size = (args.batch, config.num_channels, config.image_size, config.image_size)
    batches = [
        {"pixel_values": torch.randn(size, generator=gen),
         "labels": torch.randint(0, config.num_labels, (args.batch,), generator=gen)}
        for _ in range(args.batches)
    ]
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    label = (f"ViT {config.hidden_size}/{config.intermediate_size}, {config.num_hidden_layers} "
             f"layers, batch {args.batch}x{tokens} tokens")
    return VitSetup(model, batches, lambda m, b: m(**b).loss, label)


def plain_pass(setup: VitSetup) -> None:
    """Forward + backward over every batch (all parameters require grad), no statistics."""
    for batch in setup.batches:
        setup.loss_fn(setup.model, batch).backward()
        setup.model.zero_grad(set_to_none=True)


def calibrate_pass(setup: VitSetup) -> None:
    """``calibrate`` over the same batches; keeps the statistics for benchmark 4."""
    from jactus_linalg.torch import calibrate

    setup.stats = calibrate(setup.model, setup.batches, setup.loss_fn, progress=False)


def bench_calibration(args: argparse.Namespace, setup: VitSetup) -> BenchResult:
    """Target 3: calibrate over N batches <= 1.6x a plain forward+backward."""
    res = BenchResult("calibration", "calibration overhead against a plain forward+backward")
    say(f"  calibration: {setup.label}, {len(setup.batches)} batches, {args.repeat} round(s)")
    plain_pass(setup)  # warm-up (allocator, MKL/oneDNN kernels)
    fns = {"plain": lambda: plain_pass(setup),
           "calibrate": profiled_once(lambda: calibrate_pass(setup), res.profiles, "calibrate")}
    times = rounds(fns, args.repeat)
    metric = f"calibrate / plain fwd+bwd ({len(setup.batches)} batches)"
    res.rows = [Row("calibration", setup.label, metric,
                    paired_ratio(times, "calibrate", "plain"), 1.6, "<=", profile="calibrate")]
    res.details = {"median_s": medians(times), "times_s": times, "model": setup.label}
    res.notes.append(
        "plain = loss.backward() with every parameter requiring grad, eval mode, grads dropped "
        "after each batch; calibrate = jactus_linalg.torch.calibrate (float64 statistics, "
        "gradients to target weights only, eval mode)"
    )
    return res


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (AdamW: exp_avg, exp_avg_sq, step)."""
    import torch

    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def train_step(model, optimizer, batch, loss_fn) -> None:
    """One optimizer step on one batch."""
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    optimizer.step()


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def deployed_models(setup: VitSetup, retain: float):
    """``(dense, compressed, lora)``: copies of the setup's model (calibrates if needed)."""
    from jactus_linalg.torch import compress, lora_model, mark_trainable

    if setup.stats is None:
        calibrate_pass(setup)
    dense = copy.deepcopy(setup.model).eval()
    compressed = copy.deepcopy(setup.model).eval()
    report = compress(compressed, setup.stats, retain=retain, progress=False)
    mark_trainable(compressed, extra="classifier")
    lora = lora_model(copy.deepcopy(setup.model), rank=LORA_RANK, modules_to_save=["classifier"])
    lora.eval()
    return dense, compressed, lora, report



def bench_deployed(args: argparse.Namespace, setup: VitSetup) -> BenchResult:
    """Target 4: compressed forward <= dense; core-only step <= LoRA step; optimizer memory."""
    import torch

    res = BenchResult("deployed", "deployed model: latency, training step, optimizer state")
    say(f"  deployed: {setup.label}, compress at retain 0.8, {args.repeat} round(s)")
    dense, compressed, lora, report = deployed_models(setup, 0.8)
    batch = setup.batches[0]
    with torch.inference_mode():
        fwd = {"dense": lambda: dense(pixel_values=batch["pixel_values"]),
               "compressed": lambda: compressed(pixel_values=batch["pixel_values"])}
        for f in fwd.values():
            f()  # warm-up
        fwd_times = rounds(fwd, args.repeat)
    opts = {"cores": torch.optim.AdamW(trainable(compressed), lr=1e-4),
            "lora": torch.optim.AdamW(trainable(lora), lr=1e-4)}
    step = {"cores": lambda: train_step(compressed, opts["cores"], batch, setup.loss_fn),
            "lora": lambda: train_step(lora, opts["lora"], batch, setup.loss_fn)}
    for f in step.values():
        f()  # warm-up; creates the AdamW states
    step_times = rounds(step, args.repeat)
    res.rows = [
        Row("deployed", setup.label, "forward: compressed@0.8 / dense",
            paired_ratio(fwd_times, "compressed", "dense"), 1.0, "<="),
        Row("deployed", setup.label, f"train step: cores only / peft LoRA r={LORA_RANK}",
            paired_ratio(step_times, "cores", "lora"), 1.0, "<="),
    ]
    memory = {k: {"trainable_params": sum(p.numel() for p in trainable(m)),
                  "adamw_formula_bytes": 2 * 4 * sum(p.numel() for p in trainable(m)),
                  "adamw_measured_bytes": optimizer_state_bytes(opts[k])}
              for k, m in (("cores", compressed), ("lora", lora))}
    res.details = {"forward_median_s": medians(fwd_times), "step_median_s": medians(step_times),
                   "forward_times_s": fwd_times, "step_times_s": step_times, "memory": memory,
                   "retain_achieved": report.retain_achieved,
                   "dense_layers": sum(r.rank is None for r in report.layers)}
    res.notes.append(
        f"compressed with calibrate statistics of benchmark 3 (retain achieved "
        f"{report.retain_achieved:.4f}, {res.details['dense_layers']} of "
        f"{len(report.layers)} targets kept dense and frozen); both step variants train "
        "their classifier head too; "
        f"AdamW state = 2 x trainable x 4 bytes: cores {_memory(memory['cores'])}, "
        f"LoRA r={LORA_RANK} {_memory(memory['lora'])}"
    )
    return res


def _memory(entry: dict) -> str:
    mib = entry["adamw_formula_bytes"] / 2**20
    return f"{mib:.2f} MiB ({entry['trainable_params']} params)"


# ---------------------------------------------------------------------------
# 5. allocation
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and models (seconds)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--shapes", default="default", choices=("default", "vit", "llama", "all"),
                   help="factorization shapes: default = ViT-Base + Llama 4096x4096; "
                        "vit; llama (4096x4096, 11008x4096, 4096x11008); all")
    p.add_argument("--repeat", type=int, default=3, help="rounds per measurement (median)")
    p.add_argument("--repeat-large", type=int, default=1,
                   help="rounds for factorization shapes with a side >= 4096")
    p.add_argument("--vit-layers", type=int, default=2,
                   help="layers of the ViT-Base-width model of benchmarks 3 and 4")
    p.add_argument("--batch", type=int, default=8, help="images per batch (benchmarks 3, 4)")
    p.add_argument("--batches", type=int, default=4, help="calibration batches (benchmark 3)")
    p.add_argument("--threads", default="auto",
                   help="BLAS/OpenMP/torch threads: a number, or auto (default): one per core "
                        "unless small SVDs timed before each benchmark show multi-threading "
                        "collapsing (a busy shared machine), then 1")
    p.add_argument("--profile", action="store_true",
                   help="print every cProfile breakdown (default: those of missed targets; "
                        "none with --quick)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.repeat_large, args.batch, args.batches = 2, 1, 4, 2
    args.selected = _selected(args.only, p)
    return args


def _selected(only: str | None, parser: argparse.ArgumentParser) -> list[str]:
    if only is None:
        return list(BENCHMARKS)
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return names


def settle_threads(args: argparse.Namespace) -> dict:
    """Choose and set this benchmark's threads (``--threads``); print and return the conditions.

    ``auto`` probes again before every benchmark: on a shared machine the
    load changes while the benchmarks run.
    """
    threads, probe = choose_threads(args.threads_request, available_cores())
    set_threads(threads)
    args.threads = threads
    load = list(os.getloadavg())
    how = ""
    if probe:
        timed = "; ".join(
            f"{size}x{size} " + ", ".join(f"{k} thread(s) {v * 1e3:.0f} ms" for k, v in t.items())
            for size, t in probe.items()
        )
        how = f" (auto, SVD by scipy + torch: {timed})"
    say(f"  threads {threads}{how}; load average {load[0]:.2f}")
    return {"thread_probe_s": probe, "load_average": load}


def run_benchmarks(args: argparse.Namespace) -> list[BenchResult]:
    """Run the selected benchmarks in order, printing each table as it completes."""
    from validation.bench_mergeable import bench_mergeable  # noqa: PLC0415
    from validation.bench_peers import bench_peers  # noqa: PLC0415

    results = []
    setup = vit_setup(args) if {"calibration", "deployed"} & set(args.selected) else None
    runners = {
        "factorization": lambda: bench_factorization(args),
        "compress": lambda: bench_compress(args),
        "calibration": lambda: bench_calibration(args, setup),
        "deployed": lambda: bench_deployed(args, setup),
        "allocation": lambda: bench_allocation(args),
        "peers": lambda: bench_peers(args),
        "mergeable": lambda: bench_mergeable(args),
    }
    for name in args.selected:
        say(f"\n== {name} ==")
        conditions = settle_threads(args)
        start = time.perf_counter()
        res = runners[name]()
        res.seconds = time.perf_counter() - start
        res.threads, res.conditions = args.threads, conditions
        for row in res.rows:
            row.threads = res.threads
        say(format_table(res.rows))
        if name == "factorization":
            print_factorization_details(res)
        show = True if args.profile else (False if args.quick else None)
        for key in res.profiles_to_show(show):
            say(f"  profile of the first {key} call:")
            say(format_profile(res.profiles[key]))
        for note in res.notes:
            say(f"  note: {note}")
        say(f"  ({res.seconds:.1f} s)")
        results.append(res)
    return results


def print_header(info: dict, args: argparse.Namespace) -> None:
    """Date, machine, thread choice, load, versions, git state and the command."""
    blas = ", ".join(f"{b['lib']} {b['threads']}" for b in info["blas_threads"]) or "n/a"
    say(f"jactus_linalg benchmarks, {info['date']}")
    say(f"machine: {info['cpu']}, {info['cores']} cores; at start torch threads "
        f"{info['torch_threads']}, BLAS threads: {blas}")
    say(f"threads: {info['threads_request']} (BLAS, OpenMP and torch; chosen per benchmark)")
    core = info["git"]["core_uncommitted"]
    dirty = f", uncommitted core files: {', '.join(core)}" if core else ""
    say(f"git {info['git']['commit']}{dirty}")
    say(f"load average at start: {' '.join(f'{x:.2f}' for x in info['load_average_start'])}; "
        f"numpy {info['numpy']}, scipy {info['scipy']}, torch {info['torch']}, "
        f"python {info['python']}")
    say(f"command: python validation/bench.py {' '.join(args.argv)}".rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    args.threads_request = args.threads
    if args.worker:
        set_threads(int(args.threads))
        out = {"compress": compress_worker}[args.worker](args.quick)
        Path(args.worker_out).write_text(json.dumps(out))
        return 0
    info = machine_info()
    info["threads_request"] = args.threads
    print_header(info, args)
    start = time.perf_counter()
    results = run_benchmarks(args)
    info["load_average_end"] = list(os.getloadavg())
    rows = [r for res in results for r in res.rows]
    say("\n== summary ==")
    say(format_table(rows))
    missed = [r for r in rows if not r.passed]
    say(f"{len(rows) - len(missed)} PASS, {len(missed)} MISS; "
        f"total {time.perf_counter() - start:.0f} s; load average at end: "
        + " ".join(f"{x:.2f}" for x in info["load_average_end"]))
    if args.json:
        payload = {"machine": info, "command": ["python", "validation/bench.py", *argv],
                   "total_s": time.perf_counter() - start,
                   "benchmarks": {res.name: res.to_dict() for res in results}}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float))
        say(f"wrote {args.json}")
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
