"""Benchmark ``compress``: ViT-Base from synthetic statistics in a fresh subprocess (time, peak memory).

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from validation.bench_machine import BenchResult, Row, profile_entries, say
from validation.bench_problems import LORA_RANK, build_vit, stats_nbytes, synthetic_stats, vit_config

ROOT = Path(__file__).resolve().parents[1]


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
    original = copy.deepcopy(model)  # compress replaces the linears; the floor reads their weights
    rss_before = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    prof = cProfile.Profile()  # ~1 us per Python call; compress makes ~1e5, in minutes of LAPACK
    start = time.perf_counter()
    prof.enable()
    report = compress(model, stats, retain=0.8, progress=False)
    prof.disable()
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    floor_seconds = timed_floor(original, stats)
    out = {
        "seconds": seconds, "floor_seconds": floor_seconds, "layers": len(stats), "stats_bytes": stats_nbytes(stats),
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


def timed_floor(model: Any, stats: Any) -> float:
    """Seconds of the LAPACK floor of the whole model's ``compress`` (``bench_retain_sweep``'s).

    One Cholesky per damped input group and per damped gradient covariance,
    one ``gesdd`` per whitened weight; the inputs are built untimed.
    """
    from validation.bench_retain_sweep import floor_inputs, lapack_floor

    matrices = floor_inputs(model, stats)
    start = time.perf_counter()
    lapack_floor(matrices)
    return time.perf_counter() - start


def run_worker(name: str, args: argparse.Namespace) -> dict:
    """Run ``bench.py --worker name`` in a fresh interpreter; return its JSON output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, str(ROOT / "validation" / "bench.py"), "--worker", name,
               "--worker-out", str(out)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            msg = f"worker {name} failed ({done.returncode}):\n{done.stderr[-4000:]}"
            raise RuntimeError(msg)
        return json.loads(out.read_text())


def bench_compress(args: argparse.Namespace) -> BenchResult:
    """compress of ViT-Base <= 1.2x the sum of its layers' LAPACK floors; peak RSS < 3x the statistics."""
    res = BenchResult("compress", "whole-model compression of a ViT-Base-shaped model")
    case = "tiny ViT (quick)" if args.quick else "ViT-Base, 72 linears"
    say(f"  compress: {case}, fresh subprocess")
    d = run_worker("compress", args)
    res.profiles["compress"] = d.pop("profile")
    res.details = d
    res.rows = [
        Row("compress", case, "compress(retain=0.8) / sum of its layers' LAPACK floors",
            d["seconds"] / d["floor_seconds"], 1.2, "<=", profile="compress"),
        Row("compress", case, "compress(retain=0.8) wall time, no target", d["seconds"],
            math.inf, "<=", "s"),
        Row("compress", case, "LAPACK floors wall time, no target", d["floor_seconds"],
            math.inf, "<=", "s"),
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
