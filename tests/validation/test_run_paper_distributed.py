"""``run_paper.py`` under ``torchrun`` (2 processes, gloo, CPU) against one process.

The smoke preset's vision part, run both ways: the calibration statistics,
sharded by whole batches and all-reduced, must equal the single-process ones
up to float32 rounding; every method finishes; and each result line is
printed once, by the main process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jactus_linalg.torch import CalibrationStats

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "validation" / "run_paper.py"
# two calibration batches: each of the two processes calibrates on one
# (one seed and one target keep it to one statistics file per run)
ARGS = ["--preset", "smoke", "--parts", "vision", "--calibration-batches", "2", "--no-progress",
        "--threads", "1", "--seeds", "0", "--targets", "digits"]


def _run(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, *ARGS, "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    single = _run([sys.executable, str(RUNNER)], base / "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", str(RUNNER)]
    double = _run(torchrun, base / "double")
    return (base / "single", single), (base / "double", double)


def _layer_means(folder: Path) -> dict[str, np.ndarray]:
    """Every layer's token count and mean statistics (C_x, C_g, G) from the statistics file.

    The counts tell sharding from duplication: two processes that each took
    every batch would give the same means over twice the tokens.
    """
    (path,) = folder.glob("stats-vision-*.safetensors")
    stats = CalibrationStats.load(path)
    out = {}
    for name in stats:
        layer = stats.layer(name)
        out[f"{name}/n_samples"] = np.asarray(float(layer.n_samples))
        for field in ("input_cov", "grad_cov", "grad_mean"):
            value = getattr(layer, field)
            if value is not None:
                out[f"{name}/{field}"] = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    return out


def test_two_processes_give_the_single_process_statistics(runs):
    (one, _), (two, _) = runs
    a, b = _layer_means(one), _layer_means(two)
    assert a.keys() == b.keys() and a
    for key in a:
        scale = max(float(np.abs(a[key]).max()), np.finfo(np.float64).tiny)
        # the probe head that calibration differentiates through is trained in
        # float32 under DDP (gradients averaged over the two shards), so it
        # differs from the single-process head by float32 rounding; the sums
        # themselves are float64 (their exact agreement across processes is
        # tests/torch/test_distributed.py's business)
        tol = 100 * np.finfo(np.float32).eps * scale
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=tol, err_msg=key)


def test_every_method_finishes_under_torchrun(runs):
    (one, _), (two, _) = runs
    def methods(folder: Path) -> set[str]:
        rows = json.loads((folder / "results.json").read_text())["rows"]
        return {r["method"] for r in rows if r["part"] == "vision"}

    assert methods(two) == methods(one) and len(methods(two)) >= 5


def test_each_result_line_is_printed_once(runs):
    _, (_, double) = runs
    lines = [ln for ln in double.stdout.splitlines() if ln.startswith("[vision")]
    assert lines and len(lines) == len(set(lines))
    assert double.stdout.count("results in ") == 1
