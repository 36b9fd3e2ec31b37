"""``validation`` is a package: two ways to start the runner, no import-time side effects, one run configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("run_paper", "sweep", "methods", "parts", "paper_data", "commonsense", "scoring", "tuning_data",
           "vision", "assets", "train", "report")


@pytest.mark.parametrize("command", [
    [str(ROOT / "validation" / "run_paper.py"), "--help"],
    ["-m", "validation.run_paper", "--help"],
    [str(ROOT / "validation" / "sweep.py"), "--help"],
    ["-m", "validation.sweep", "--help"],
], ids=["script", "module", "sweep-script", "sweep-module"])
def test_runner_starts_as_script_and_as_module(command, tmp_path):
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, check=False)  # not the repository root: the installed package
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--out" in done.stdout


def test_importing_changes_no_environment_variable_and_no_sys_path():
    probe = (
        "import json, os, sys\n"
        "import torch, transformers, peft  # their own import-time settings are not ours\n"
        "env, path = dict(os.environ), list(sys.path)\n"
        f"for name in {MODULES!r}:\n"
        "    __import__('validation.' + name)\n"
        "print(json.dumps({'env': sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),"
        " 'path_changed': sys.path != path}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"env": [], "path_changed": False}


def test_run_config_is_built_once_from_argv(tmp_path):
    from validation.run_paper import PaperInputs, RunConfig, presets, run_config

    config = run_config(["--preset", "smoke", "--out", str(tmp_path), "--steps", "7", "--retain", "0.5", "0.7",
                         "--methods", "JACTUS, LoRA", "--parts", "vision", "--no-progress",
                         "--vision-datasets", "dtd,eurosat", "--dtype", "float32"])
    assert isinstance(config, RunConfig)
    assert config.out == tmp_path
    assert config.method_filter == ("JACTUS", "LoRA")
    assert config.progress is False
    assert config.preset.vision.steps == 7 and config.preset.language.steps == 7
    assert config.preset.vision.retains == (0.5, 0.7)
    assert config.preset.vision.enabled and not config.preset.language.enabled
    assert config.paper == PaperInputs(vision_datasets=("dtd", "eurosat"), dtype="float32")
    untouched = presets()["smoke"].vision
    assert config.preset.vision.n_tune == untouched.n_tune
    assert config.command.startswith("python validation/run_paper.py --preset smoke")
    default = run_config([])
    assert default.out == Path("results") / "default" and default.method_filter == ()


def test_run_config_rejects_an_unknown_part():
    from validation.run_paper import run_config

    with pytest.raises(SystemExit, match="--parts: unknown part"):
        run_config(["--parts", "language,audio"])
