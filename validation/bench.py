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
    floor (Cholesky of the damped ``Cx`` and ``Cg``, ``M = Lgᵀ W Lx`` by two
    ``trmm``, one gesdd SVD of ``M``): <= 1.3x at tau 0; at tau 0.25 against
    that floor plus the top-j eigenpairs of both covariances (``syevr``):
    <= 1.3x. The randomized path at ``max_rank`` = 10% of ``min(m, n)``:
    <= 1.3x the whitening floor (the two Cholesky factorizations and ``M``),
    with its curvature-norm error within 1% of the exact path's.
``compress``
    ``jactus_linalg.torch.compress`` of a randomly initialised ViT-Base (72
    linears) from synthetic float64 statistics, in a fresh subprocess: <= 1.2x
    the sum of its layers' LAPACK floors (timed after it, same process: one
    Cholesky per damped input group and gradient covariance, one gesdd per
    whitened weight), peak RSS increase < 3x the statistics.
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
``retain-sweep``
    ``compress_many`` at retains 0.6-0.9 (one decomposition) against one
    ``compress`` (<= 1.2x), and that ``compress`` against the sum of its
    layers' LAPACK floors (<= 1.2x), on ``--vit-layers`` ViT-Base blocks
    (``validation/bench_retain_sweep.py``).
``end-to-end``
    SmolLM2-135M: ``calibrate`` over 16 batches of 8x96 random token ids
    against a plain forward+backward over them (<= 1.6x), and the seconds
    of that ``calibrate``, of ``compress`` at retain 0.8 and of the
    compressed layers' LAPACK floors (shown, no target); ``--quick``: the
    tiny Llama of ``validation.assets`` (``validation/bench_end_to_end.py``).
``tuning-loss``
    SmolLM2-135M with LoRA: a tuning step whose loss applies the output head
    at the answer tokens only (``validation.tuning_data.answer_loss``, the
    runner's) against the model's own loss at every position: <= 0.9x
    (``validation/bench_tuning_loss.py``).

Modules, by topic: ``bench_machine`` (result rows, machine description,
threads, side-by-side timing, profiles), ``bench_problems`` (shapes, one
layer's weight and statistics with known spectra from
:mod:`jactus_linalg.testing`, the ViT models), and one module per
benchmark (``bench_factorization``, ``bench_compress``,
``bench_calibration``, ``bench_deployed``, ``bench_allocation``,
``bench_peers``, ``bench_mergeable``, ``bench_retain_sweep``,
``bench_end_to_end``, ``bench_tuning_loss``;
``bench_products`` runs on its own). This file is the driver; their
names stay importable from ``validation.bench``.

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
import collections
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from validation.bench_machine import THREAD_VARS  # numpy-free: read before BLAS loads

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("factorization", "compress", "calibration", "deployed", "allocation", "peers", "mergeable",
              "retain-sweep", "end-to-end", "tuning-loss")


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

# the benchmarks by topic; the names stay importable from validation.bench
from validation.bench_allocation import allocation_instance, bench_allocation  # noqa: E402
from validation.bench_calibration import (  # noqa: E402
    VitSetup,
    bench_calibration,
    calibrate_pass,
    plain_pass,
    vit_setup,
)
from validation.bench_compress import bench_compress, compress_worker, run_worker  # noqa: E402
from validation.bench_deployed import (  # noqa: E402
    bench_deployed,
    deployed_models,
    optimizer_state_bytes,
    train_step,
    trainable,
)
from validation.bench_factorization import (  # noqa: E402
    bench_factorization,
    bench_factorization_shape,
    exact_path,
    factorization_runs,
    floor_inputs,
    lapack_floor,
    print_factorization_details,
)
from validation.bench_machine import (  # noqa: E402
    BenchResult,
    Row,
    available_cores,
    choose_threads,
    format_profile,
    format_table,
    machine_info,
    medians,
    paired_ratio,
    profiled_once,
    rounds,
    say,
    set_threads,
    verdict,
)
from validation.bench_problems import (  # noqa: E402
    CALIBRATION_TOKENS,
    LLAMA_SHAPES,
    LORA_RANK,
    QUICK_SHAPES,
    TASK_FRACTION,
    VIT_SHAPES,
    LayerProblem,
    build_vit,
    decaying_tokens,
    fast_max_rank,
    known_spectrum_matrix,
    layer_problem,
    shapes_for,
    synthetic_stats,
    typical_rank,
    vit_config,
)

__all__ = [
    "CALIBRATION_TOKENS",
    "LLAMA_SHAPES",
    "LORA_RANK",
    "QUICK_SHAPES",
    "TASK_FRACTION",
    "VIT_SHAPES",
    "BenchResult",
    "LayerProblem",
    "Row",
    "VitSetup",
    "allocation_instance",
    "available_cores",
    "bench_allocation",
    "bench_calibration",
    "bench_compress",
    "bench_deployed",
    "bench_factorization",
    "bench_factorization_shape",
    "build_vit",
    "calibrate_pass",
    "choose_threads",
    "compress_worker",
    "decaying_tokens",
    "deployed_models",
    "exact_path",
    "factorization_runs",
    "fast_max_rank",
    "floor_inputs",
    "format_profile",
    "format_table",
    "known_spectrum_matrix",
    "lapack_floor",
    "layer_problem",
    "machine_info",
    "main",
    "medians",
    "optimizer_state_bytes",
    "paired_ratio",
    "plain_pass",
    "print_factorization_details",
    "profiled_once",
    "rounds",
    "run_worker",
    "say",
    "set_threads",
    "shapes_for",
    "synthetic_stats",
    "train_step",
    "trainable",
    "typical_rank",
    "vit_config",
    "vit_setup",
]

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
    from validation.bench_end_to_end import bench_end_to_end  # noqa: PLC0415
    from validation.bench_mergeable import bench_mergeable  # noqa: PLC0415
    from validation.bench_peers import bench_peers  # noqa: PLC0415
    from validation.bench_retain_sweep import bench_retain_sweep  # noqa: PLC0415
    from validation.bench_tuning_loss import bench_tuning_loss  # noqa: PLC0415

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
        "retain-sweep": lambda: bench_retain_sweep(args),
        "end-to-end": lambda: bench_end_to_end(args),
        "tuning-loss": lambda: bench_tuning_loss(args),
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
    counts = collections.Counter(verdict(r) for r in rows)
    say(f"{counts['PASS']} PASS, {counts['MISS']} MISS, {counts['shown']} shown without a target; "
        f"total {time.perf_counter() - start:.0f} s; load average at end: "
        + " ".join(f"{x:.2f}" for x in info["load_average_end"]))
    if args.json:
        payload = {"machine": info, "command": ["python", "validation/bench.py", *argv],
                   "total_s": time.perf_counter() - start,
                   "benchmarks": {res.name: res.to_dict() for res in results}}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float))
        say(f"wrote {args.json}")
    return 1 if (args.strict and counts['MISS']) else 0


if __name__ == "__main__":
    sys.exit(main())
