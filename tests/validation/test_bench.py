"""The benchmark runner end to end on small shapes (``--quick``).

No timing is asserted: machines are noisy. The test checks that the runner
exits 0, prints a ratio line (measured value, target, PASS or MISS) for every
benchmark, and writes the same rows to its JSON file. BLAS runs on one thread
(``--threads 1``), which skips the start-up thread probe and keeps the run
short on a busy machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..numerics import tolerance

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "validation" / "bench.py"
NAMES = ("factorization", "compress", "calibration", "deployed", "allocation", "peers", "mergeable",
         "retain-sweep", "end-to-end", "tuning-loss")
#: a table row: benchmark name first, then ``<measured> <= or >= <target> PASS|MISS``
RATIO_LINE = re.compile(r"^([\w-]+)\s+.*\s(\S+)\s+(<=|>=) (\S+(?: s)?)\s+(PASS|MISS|shown)$")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    return done, out


def _ratio_lines(stdout: str) -> list[re.Match]:
    return [m for line in stdout.splitlines() if (m := RATIO_LINE.match(line.strip()))]


def test_quick_run_exits_zero(quick_run):
    done, _ = quick_run
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_benchmark_prints_a_ratio_line(quick_run):
    done, _ = quick_run
    seen = {m.group(1) for m in _ratio_lines(done.stdout)}
    assert set(NAMES) <= seen, f"no ratio line for {set(NAMES) - seen}:\n{done.stdout[-3000:]}"


def test_json_holds_the_printed_rows_and_the_machine(quick_run):
    done, out = quick_run
    payload = json.loads(out.read_text())
    assert set(payload["benchmarks"]) == set(NAMES)
    machine = payload["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["date"]
    assert machine["torch_threads"] == 1
    rows = [r for b in payload["benchmarks"].values() for r in b["rows"]]
    summary = done.stdout.split("== summary ==", 1)[1]
    assert len(_ratio_lines(summary)) == len(rows)
    for row in rows:
        assert row["sense"] in ("<=", ">=")
        # "passed" is the comparison of the recorded value with its target, not a free flag
        within = row["value"] <= row["target"] if row["sense"] == "<=" else row["value"] >= row["target"]
        assert row["passed"] is within, row
    printed = [m.group(5) for m in _ratio_lines(summary)]
    assert printed.count("MISS") == sum(not row["passed"] for row in rows)


def test_only_runs_the_named_benchmark(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--only", "allocation"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {m.group(1) for m in _ratio_lines(done.stdout)} == {"allocation"}


def test_unknown_benchmark_is_refused():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--only", "nonsense"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr


def test_peers_rows_compare_with_svd_llm_and_cold_svd(quick_run):
    """The peers benchmark: timing ratios against SVD-LLM's code, equal output error, the BLAS-mixing ratio."""
    _, out = quick_run
    peers = json.loads(out.read_text())["benchmarks"]["peers"]
    metrics = {r["metric"] for r in peers["rows"]}
    assert "svd-llm special case (f64 stats) / SVD-LLM code" in metrics
    assert "MKL SVD after package whitening / cold (same cache)" in metrics
    for shape in ("192x192", "384x192"):
        errors = peers["details"][shape]["output_error"]
        ref = errors["svd-llm code"]
        # same numerics: the float64 special case is SVD-LLM's up to its float32 SVD
        n = max(int(d) for d in shape.split("x"))
        assert abs(errors["package f64 stats"] / ref - 1) <= tolerance(np.float32, n)
        assert abs(errors["compress path"] / ref - 1) <= tolerance(np.float32, n)
    blas = peers["details"]["blas_mixing"]["median_s"]
    assert set(blas) == {"cold", "cold, cache evicted", "after torch cholesky", "after whitening",
                         "after scipy trtri"}


def test_bench_products_measures_the_float32_product_cost():
    """validation/bench_products.py on a small problem: float32 products summed in float64
    move the top eigenvalues by float32 rounding (more than float64's, at most c N eps32)."""
    from validation.bench_products import synthetic

    rows = 60
    res = synthetic(dim=32, batches=2, rows=rows, rank=8)
    assert 0.0 < res["top_eig_rel"] <= tolerance(np.float32, 2 * rows)
    assert tolerance(np.float64, rows) < res["cov_rel"] <= tolerance(np.float32, 2 * rows)
    assert res["err_float64"] > 0.0 and res["err_cost"] <= tolerance(np.float32, 32)


def test_the_driver_sets_threads_before_numpy_loads():
    """bench.py reads THREAD_VARS from bench_machine before numpy loads its BLAS: that module
    (and the package) must not import numpy; the benchmarks' names stay importable from bench."""
    probe = (
        "import sys\n"
        "import validation.bench_machine as m\n"
        "assert 'numpy' not in sys.modules, 'bench_machine imported numpy'\n"
        "import validation.bench as b\n"
        "assert all(hasattr(b, n) for n in b.__all__)\n"
        "print(m.THREAD_VARS)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OPENBLAS_NUM_THREADS" in done.stdout


def test_end_to_end_rows_and_the_compressed_model_at_retain(quick_run):
    """The end-to-end benchmark (tiny Llama in the quick run): its calibrate ratio against the
    calibration target, the seconds of calibrate, compress and the LAPACK floors, and a
    compressed model whose deployed parameters are 0.8 of the dense ones within 1e-3."""
    _, out = quick_run
    e2e = json.loads(out.read_text())["benchmarks"]["end-to-end"]
    rows = {r["metric"]: r for r in e2e["rows"]}
    ratio = rows["calibrate / plain fwd+bwd (4 batches)"]
    assert ratio["unit"] == "x" and ratio["target"] == 1.6 and ratio["value"] > 0
    for metric in ("calibrate (4 batches), no target", "compress(retain=0.8), no target",
                   "sum of the compressed layers' LAPACK floors, no target"):
        assert rows[metric]["unit"] == "s" and rows[metric]["value"] > 0, metric
    details = e2e["details"]
    assert set(details["median_s"]) == {"plain", "calibrate", "compress", "floor"}
    assert details["retain_target"] == 0.8
    assert details["params_after"] / details["params_before"] == pytest.approx(
        details["retain_achieved"], rel=1e-12)
    assert abs(details["retain_achieved"] - 0.8) <= 1e-3
    assert 0 <= details["layers_kept_dense"] < details["layers"]


def test_tuning_loss_row_and_the_agreement_of_the_two_losses(quick_run):
    """The tuning-loss benchmark (tiny Llama in the quick run): its ratio row, shown without a
    target there, and the two losses' agreement it checked before timing."""
    _, out = quick_run
    bench = json.loads(out.read_text())["benchmarks"]["tuning-loss"]
    (row,) = bench["rows"]
    assert row["metric"] == "answer_loss step / model(**batch).loss step"
    assert row["unit"] == "x" and row["value"] > 0 and row["target"] == float("inf")
    details = bench["details"]
    assert 0 < details["scored_tokens"] < details["tokens"]
    assert details["largest_relative_loss_difference"] <= 1e-4
    assert set(details["median_s"]) == {"answer", "model"}
