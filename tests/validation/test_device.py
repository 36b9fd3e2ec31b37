"""``--device``: the default, full and smoke presets' language part off the CPU.

Records, statistics and sweep records made on another device carry it in
their keys and labels, so that they never mix with the CPU's (the CPU's
keys are the ones they were before parts could move). The CUDA case runs
under ``pytest -m cuda`` on a machine with a GPU and skips itself elsewhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from validation import run_paper, sweep
from validation.methods import Method

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                             reason="CUDA is not available on this machine")


def _config(device: str | None) -> run_paper.RunConfig:
    return run_paper.RunConfig(preset=run_paper.presets()["smoke"], out=Path("unused"),
                               progress=False, paper=run_paper.PaperInputs(device=device))


def test_the_language_part_moves_only_when_a_device_other_than_the_cpu_is_named():
    assert run_paper.local_device(_config(None)) is None
    assert run_paper.local_device(_config("cpu")) is None
    assert run_paper.local_device(_config("cuda")) == torch.device("cuda")
    assert run_paper.local_device(_config("cuda:1")) == torch.device("cuda", 1)


def test_keys_and_labels_carry_a_device_other_than_the_cpu():
    class Base:  # a base model's parameters on a device (no GPU needed to name one)
        def __init__(self, device: str):
            self.device = torch.device(device)

        def parameters(self):
            return iter([self])

    class Part:
        name, seed, base_fingerprint = "language", 1, None

        def __init__(self, device: str):
            self.base = Base(device)

    cpu, gpu = Part("cpu"), Part("cuda")
    assert run_paper.device_field(cpu) == {} and run_paper.device_field(gpu) == {"device": "cuda"}
    cfg = run_paper.presets()["smoke"].language
    method = Method("LoRA@1.0", "LoRA", "lora")
    # the CPU keys as the code before --device computed them (commit ba1cd34): a change to them
    # would orphan every stored record (or the smoke preset's settings changed: update both)
    before = "ef9a21b78023660f"
    assert run_paper.record_key(cfg, method, 0, 1, "language", None) == before
    assert run_paper.record_key(cfg, method, 0, 1, "language", None, {}) == before
    assert run_paper.record_key(cfg, method, 0, 1, "language", None, {"device": "cuda"}) != before
    assert run_paper.statistics_key(cfg, 0, cpu) == "1aff016d76657c9f"
    assert run_paper.statistics_key(cfg, 0, gpu) != "1aff016d76657c9f"
    assert sweep.part_tag(cpu) == "order=1 language"
    assert sweep.part_tag(gpu) == "order=1 language device=cuda"
    assert "device" not in sweep.part_fields(cpu) and sweep.part_fields(gpu)["device"] == "cuda"
    # a sweep uses the records made on the device its parts are on now, and keeps the others
    done = {sweep.part_tag(p): {**sweep.part_fields(p), "score": s} for p, s in ((cpu, 1.0), (gpu, 2.0))}
    assert list(sweep.on_current_bases(done, {"language": [cpu]})) == ["order=1 language"]
    assert list(sweep.on_current_bases(done, {"language": [gpu]})) == ["order=1 language device=cuda"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])])
def test_language_sweep_on_a_device(tmp_path, device):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"language": {"task_fraction": 0.0}}))
    out = tmp_path / "out"
    chosen = sweep.main(["--part", "language", "--preset", "smoke", "--lrs", "1e-3",
                         "--families", "JACTUS,LoRA", "--device", device, "--out", str(out),
                         "--page", str(tmp_path / "page.md"), "--settings", str(settings),
                         "--no-progress"])
    assert chosen["lr"] == {"JACTUS": 1e-3, "LoRA": 1e-3}
    assert f"--device {device}" in chosen["source"]  # the settings say where they were chosen
    assert f"--lrs 0.001 --device {device}`" in (tmp_path / "page.md").read_text()
    done = json.loads((out / "sweep.json").read_text())
    assert len(done) == 6 and all(math.isfinite(v["score"]) for v in done.values())
    assert {v.get("task_fraction") for v in done.values() if v["family"] == "JACTUS"} == {0.0}
    assert {v["preset"] for v in done.values()} == {"smoke"}
    if device == "cpu":  # the CPU's labels and fields are the ones they were
        assert not any("device" in label or "device" in v for label, v in done.items())
    else:
        assert all(label.endswith(" device=cuda") and v["device"] == "cuda"
                   for label, v in done.items())


def test_the_summary_names_a_part_run_off_the_cpu():
    full = run_paper.presets()["full"]
    extra = {"date": "now", "command": "c", "machine": {"cpus": 2, "cpu": "cpu"},
             "wall_time_s": 60.0, "recorded_time_s": 60.0, "learning_rates": {},
             "devices": {"language": "cuda", "vision": "cpu"}}
    header = run_paper.summary_header(full, extra, {"language": {}, "vision": {}})[0]
    assert header.endswith("on 2 CPUs (cpu), language on cuda. Command: `c`.")
    extra["devices"]["language"] = "cpu"
    assert "on cuda" not in run_paper.summary_header(full, extra, {})[0]


def test_calibration_accumulates_in_float64_but_for_the_paper_preset():
    for name, preset in run_paper.presets().items():
        for part in ("language", "vision"):
            expected = None if name == "paper" else "float64"
            assert run_paper.statistics_dtype(getattr(preset, part)) == expected
