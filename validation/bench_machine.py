"""Benchmark plumbing: result rows, the machine's description, threads, side-by-side timing, profiles.

Imports no numpy at module level: ``bench.py`` reads :data:`THREAD_VARS` from here before
numpy loads its BLAS.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import cProfile
import datetime
import functools
import importlib.metadata
import math
import os
import platform
import pstats
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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


def verdict(row: Row) -> str:
    """``PASS`` or ``MISS`` against the target; ``shown`` for a row without one (infinite target)."""
    if math.isinf(row.target):
        return "shown"
    return "PASS" if row.passed else "MISS"


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table: benchmark, case, metric, threads, measured, target, PASS/MISS/shown."""
    head = ("benchmark", "case", "metric", "thr", "measured", "target", "result")
    body = [
        (r.bench, r.case, r.metric, str(r.threads), _fmt(r.value, r.unit),
         f"{r.sense} {_fmt(r.target, r.unit)}", verdict(r))
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


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: vector extensions that decide which CPU kernels torch and the BLAS run
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "fma", "asimd", "sve")


@functools.cache
def cpu_vector_flags() -> tuple[str, ...]:
    """The vector extensions in :data:`VECTOR_FLAGS` that /proc/cpuinfo lists (empty elsewhere).

    Rounding on a CPU depends on which kernels torch and the BLAS pick, and they
    pick by these extensions: two machines that differ here can give language
    records that differ in the last digits (record keys do not hold the CPU).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return tuple(f for f in VECTOR_FLAGS if f in flags)


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
        "vector_flags": list(cpu_vector_flags()),
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "blas_threads": blas_threads(),
        "load_average_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": importlib.metadata.version("numpy"),
        "scipy": importlib.metadata.version("scipy"),
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
    import numpy as np
    import scipy.linalg
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
