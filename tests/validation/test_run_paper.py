"""The paper runner end to end on tiny models (``--preset smoke``), outputs and resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "validation" / "run_paper.py"


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), "--preset", "smoke", "--out", str(out), "--no-progress", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_smoke_writes_every_output(smoke):
    out, _ = smoke
    for name in ("results.json", "results.csv", "results.md", "accuracy_vs_retain_language.png",
                 "accuracy_vs_retain_vision.png", "ranks_language.png", "predicted_loss_vision.png"):
        assert (out / name).stat().st_size > 0, name
    payload = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in payload["rows"]}
    for expected in ("JACTUS@0.8", "SVD-LLM+LoRA@0.8", "LoRA@1.0", "DoRA@1.0", "JACTUS@0.6",
                     "JACTUS tau=0@0.8", "JACTUS no-Cg@0.8", "JACTUS uniform@0.8", "JACTUS no-dense@0.8"):
        assert expected in methods
    tasks = {r["task"] for r in payload["rows"] if r["part"] == "language"}
    assert tasks == {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "average"}
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(payload["rows"])
    assert all(r["seed"] == "0" and float(r["wall_time_s"]) >= 0 for r in rows)


def test_untuned_rows_are_evaluated_before_any_step(smoke):
    out, _ = smoke
    payload = json.loads((out / "results.json").read_text())
    untuned = [r for r in payload["rows"] if r["method"].endswith(" untuned")]
    assert {r["method"] for r in untuned} == {"JACTUS@0.8 untuned", "SVD-LLM+LoRA@0.8 untuned"}
    assert all(r["trainable_params"] == 0 for r in untuned)
    for path in (out / "methods").glob("*untuned*.json"):
        assert json.loads(path.read_text())["train_losses"] == []
    pairs = {(c["a"], c["b"]) for c in payload["paired_comparisons"]["vision"]}
    assert ("JACTUS@0.8 untuned", "SVD-LLM+LoRA@0.8 untuned") in pairs
    assert ("JACTUS@0.8", "JACTUS@0.8 untuned") in pairs
    assert ("JACTUS@0.8", "SVD-LLM+LoRA@0.8 untuned") not in pairs


def test_splits_are_recorded_and_disjoint(smoke):
    out, _ = smoke
    splits = json.loads((out / "results.json").read_text())["splits"]
    per_task = [*splits["language"]["tasks"].values(), splits["vision"]["digits"]]
    assert len(per_task) == 9
    for ids in per_task:
        tune, test = set(ids["tune"]), set(ids["test"])
        assert tune and test and not tune & test


def test_budgets_and_intervals(smoke):
    out, _ = smoke
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        if r["settings"]["kind"] in ("jactus", "ctf"):
            assert r["retain_achieved"] <= r["retain_target"] + 1e-9
            assert r["retain_achieved"] > r["retain_target"] - 0.02
        if r["task"] == "average":
            assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    comps = json.loads((out / "results.json").read_text())["paired_comparisons"]
    assert any(c["a"] == "JACTUS@0.8" and c["b"] == "SVD-LLM+LoRA@0.8" for c in comps["language"])


def test_rerun_resumes_from_finished_methods(smoke):
    out, _ = smoke
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("already done") == 30  # 15 methods x 2 parts
