"""The paper runner end to end on tiny models (``--preset smoke``), outputs and resume.

The smoke preset covers every option of the default and full presets: three
seeds, two vision targets (their average), language at retain 0.8 and 0.9
with the lm-eval metrics, the per-family learning rates read from
``validation/tuned_settings.json``, the head's own parameter group, the
predicted-against-measured loss rise, ``--save-models`` and the verdict on
the paper's ordering. Fast unit tests of the pieces come first.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from validation import run_paper, sweep, sweep_lanes, sweep_steps, sweep_tau
from validation.report import claim_lines, family_styles, plot_dev_sweep, summarize
from validation.train import parameter_groups, tune

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "validation" / "run_paper.py"
SEEDS = {0, 1, 2}


def smoke_bases() -> dict[int, str]:
    """The fingerprint of the smoke preset's pretrained ViT per seed (what sweep records carry)."""
    cfg = run_paper.presets()["smoke"].vision
    return {s: run_paper.pretrained_vision_model(cfg, s, progress=False)[1] for s in SEEDS}


# ----------------------------------------------------------------------------- units


def test_head_has_its_own_parameter_group():
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(3, 3))
    model.add_module("classifier", torch.nn.Linear(3, 2))
    groups = parameter_groups(model, 1e-3, head=["classifier"], head_lr=1e-2)
    by_name = {g["name"]: g for g in groups}
    assert by_name["method"]["lr"] == 1e-3 and by_name["head"]["lr"] == 1e-2
    assert {id(p) for p in by_name["head"]["params"]} == {id(p) for p in model.classifier.parameters()}
    # without a head rate, one group
    assert len(parameter_groups(model, 1e-3, head=["classifier"])) == 1


def test_tune_moves_the_head_at_its_own_rate():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(4, 4))
    model.add_module("classifier", torch.nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]

    def loss(m, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    tune(model, batches, loss, steps=1, lr=1e-12, progress=False, head=["classifier"], head_lr=1e-1)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    # AdamW's first step moves each weight by about its rate
    assert moved["body.weight"] < 1e-9 < 1e-2 < moved["classifier.weight"]


def test_choice_metrics_follow_lm_eval_definitions():
    from validation.commonsense import MCItem
    from validation.parts import choice_metrics
    from validation.scoring import ScoreResult

    item = MCItem(id="t:0", task="t", context="c", choices=("a", "bbbb"), label=1)
    # choice 0: -2 nats over 1 char / 1 token; choice 1: -4 nats over 4 chars / 2 tokens
    res = ScoreResult([item], [np.array([-2.0, -4.0])], [np.array([1, 2])], [np.array([1, 4])])
    m = choice_metrics(res)
    assert not m["acc"][0]  # unnormalised: -2 > -4 picks choice 0
    assert m["correct"][0]  # per character: -2 < -1 picks choice 1
    assert m["answer_nll"][0] == pytest.approx(2.0)
    assert m["margin"][0] == pytest.approx(-2.0 - (-2.0))


def test_language_dev_items_are_outside_tune_and_test():
    from validation.commonsense import split_task
    from validation.parts import three_way_splits

    splits = three_way_splits(("arc_c", "boolq"), n_tune=300, n_test=100, n_dev=16, seed=0)
    for _task, s in splits.items():
        ids = {k: {i.id for i in v} for k, v in s.items()}
        assert ids["dev"] and not ids["dev"] & (ids["tune"] | ids["test"])
        assert not ids["tune"] & ids["test"]
    assert len(splits["arc_c"]["tune"]) == 299 - 100 - 16  # a short task keeps what is left
    assert len(splits["boolq"]["tune"]) == 300
    # tune and test are split_task's (adding dev items changes neither)
    from validation.commonsense import load_task

    plain = split_task(load_task("boolq"), 300, 100, 0)
    assert [i.id for i in plain.tune] == [i.id for i in splits["boolq"]["tune"]]


def test_vision_dev_items_are_outside_tune_and_test():
    from validation.vision import digits_task, shifted_digits_task

    for build in (lambda: digits_task(0, 500, 500, n_dev=200), lambda: shifted_digits_task(0, 500, 500, 200)):
        task = build()
        tune, test, dev = set(task.tune_ids), set(task.test_ids), set(task.dev_ids)
        assert len(dev) == 200 and not dev & (tune | test) and not tune & test
        assert task.with_dev_as_test().test_ids == task.dev_ids
    assert digits_task(0, 500, 500, n_dev=200).tune_ids == digits_task(0, 500, 500).tune_ids


def test_fmnist_tops_holds_out_the_pretraining_classes(tmp_path):
    from validation.vision import HELDOUT_CLASSES, PRETRAIN_CLASSES, _only_classes, fmnist_tops_task

    assert not set(HELDOUT_CLASSES) & set(PRETRAIN_CLASSES)
    assert set(HELDOUT_CLASSES) | set(PRETRAIN_CLASSES) == set(range(10))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 30)
    images = rng.integers(0, 255, (labels.size, 28, 28), dtype=np.uint8)
    for stem, arr, code in (("train-images-idx3-ubyte", images, 3), ("train-labels-idx1-ubyte", labels, 1)):
        header = bytes([0, 0, 0x08, code]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (tmp_path / stem).write_bytes(header + arr.tobytes())
    task = fmnist_tops_task(0, n_tune=40, n_test=40, n_dev=20, folder=tmp_path)
    assert task.num_labels == 4 and set(task.tune_y.tolist()) <= {0, 1, 2, 3}
    rows = [int(i.split(":")[1]) for i in task.tune_ids + task.test_ids + task.dev_ids]
    assert set(labels[rows].tolist()) <= set(HELDOUT_CLASSES)
    _x, y = _only_classes(torch.zeros(len(labels), 1, 2, 2), torch.from_numpy(labels.astype(np.int64)),
                         PRETRAIN_CLASSES)
    assert len(y) == 30 * len(PRETRAIN_CLASSES) and set(y.tolist()) == set(range(len(PRETRAIN_CLASSES)))


def test_weights_fingerprint_is_deterministic():
    from validation.vision import tiny_vit, weights_fingerprint

    assert weights_fingerprint(tiny_vit(0)) == weights_fingerprint(tiny_vit(0))
    assert weights_fingerprint(tiny_vit(0)) != weights_fingerprint(tiny_vit(1))


def test_pretraining_gives_the_same_bytes_whatever_the_thread_count():
    """On 2 threads the smoke ViT's float32 sums round otherwise than on 1: it pretrains on one."""
    from validation.vision import tiny_pretrained_vit, weights_fingerprint

    before = torch.get_num_threads()
    prints = set()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            prints.add(weights_fingerprint(tiny_pretrained_vit(seed=0, epochs=1)))
            assert torch.get_num_threads() == threads  # the caller's count, restored
    finally:
        torch.set_num_threads(before)
    assert len(prints) == 1


def test_learning_rates_come_from_the_settings_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"vision": {"lr": {f: 0.5 for f in run_paper.FAMILIES}, "lr_head": 0.25}}))
    cfg = run_paper.with_learning_rates("vision", run_paper.PartConfig(), path)
    assert cfg.lrs == {f: 0.5 for f in run_paper.FAMILIES} and cfg.lr_head == 0.25
    kept = run_paper.with_learning_rates("vision", run_paper.PartConfig(lrs={"LoRA": 0.1}), path)
    assert kept.lrs["LoRA"] == 0.1 and kept.lrs["JACTUS"] == 0.5
    with pytest.raises(SystemExit, match="language"):
        run_paper.with_learning_rates("language", run_paper.PartConfig(), path)
    # the checked-in file covers both parts and every family
    for part in ("language", "vision"):
        cfg = run_paper.with_learning_rates(part, run_paper.PartConfig())
        assert set(cfg.lrs) >= set(run_paper.FAMILIES) and cfg.lr_head > 0


def test_a_preset_reads_its_own_settings_file_and_says_when_it_has_none(tmp_path, monkeypatch):
    default_file = tmp_path / "tuned_settings.json"
    monkeypatch.setattr(run_paper, "SETTINGS_FILE", default_file)
    rates = {"lr": {f: 0.5 for f in run_paper.FAMILIES}, "lr_head": 0.25, "chosen_by_sweep": True,
             "source": "default page"}
    default_file.write_text(json.dumps({"vision": rates, "language": {**rates, "task_fraction": 0.0}}))
    own = run_paper.preset_settings_file("full")
    assert run_paper.preset_settings_file("default") == default_file
    assert own == tmp_path / "tuned_settings-full.json"
    # no file of its own yet: the full preset reads the default preset's rates, and says so
    assert run_paper.settings_for("full", "language") == default_file
    source = run_paper.settings_source("full", "language")
    assert source["tuned_for"] == "default" and source["file"] == "validation/tuned_settings.json"
    line = run_paper._rates_line("language", {"language": source}, "full")
    assert "in the default preset's configuration, NOT this preset's" in line
    assert "tuned_settings-full.json" in line
    # given the run's part, the source says whether it tunes as the default preset's does:
    # the full preset's language part (300 steps) does not, its vision part does
    full, default = run_paper.presets()["full"], run_paper.presets()["default"]
    assert not run_paper.settings_source("full", "language", full.language)["same_configuration"]
    vision = run_paper.settings_source("full", "vision", full.vision)
    assert vision["tuned_for"] == "default" and vision["same_configuration"]
    assert "the same as this preset's" in run_paper._rates_line("vision", {"vision": vision}, "full")
    assert run_paper.tuning_configuration(full.vision) == run_paper.tuning_configuration(
        replace(default.vision, lrs={"LoRA": 1.0}, retains=(0.5,), threads=1))
    assert run_paper.tuning_configuration(full.vision) != run_paper.tuning_configuration(
        replace(default.vision, steps=601))
    extra = {"date": "now", "command": "python validation/run_paper.py --preset full",
             "machine": {"cpus": 2, "cpu": "cpu"}, "wall_time_s": 60.0, "recorded_time_s": 7200.0,
             "learning_rates": {"language": run_paper.settings_source("full", "language",
                                                                      full.language),
                                "vision": vision}}
    header = "\n".join(run_paper.summary_header(full, extra, {"language": {}, "vision": {}}))
    assert "Command: `python validation/run_paper.py --preset full`" in header
    assert "2.0 h of method time" in header and "1 min of wall time" in header
    assert "the language rates were chosen in the default preset's configuration, not this one's" in header
    assert "the vision rates" not in header
    # the rates line names the rates the run trained with, which may not be the file's
    line = run_paper._rates_line("vision", {"vision": vision}, "full",
                                 replace(full.vision, lrs={f: 0.7 for f in run_paper.FAMILIES},
                                         lr_head=0.2))
    assert "JACTUS 0.7" in line and "head 0.2" in line and "JACTUS 0.5" not in line
    # the paper preset sets its rates: no file is named, nothing is said to be borrowed
    paper = run_paper.presets()["paper"]
    for part in ("language", "vision"):
        assert run_paper.settings_source("paper", part, getattr(paper, part)) == {}
    line = run_paper._rates_line("vision", {"vision": {}}, "paper", paper.vision)
    assert line == "Learning rates (set in the preset): " + ", ".join(
        f"{f} 0.001" for f in run_paper.FAMILIES) + ", head 0.001."
    paper_extra = {**extra, "learning_rates": {"language": {}, "vision": {}}}
    assert "Learning rates" not in "\n".join(
        run_paper.summary_header(paper, paper_extra, {"language": {}, "vision": {}}))
    # an entry of some families only (a sweep of --families LoRA) is not the preset's own yet
    own.write_text(json.dumps({"language": {**rates, "lr": {"LoRA": 0.125}}}))
    assert run_paper.settings_for("full", "language") == default_file
    assert not run_paper.complete_entry({"lr": {f: 1.0 for f in run_paper.FAMILIES}})  # no head
    # its own complete entry for one part: that part reads it, the other part still the default's
    own.write_text(json.dumps({"language": {**rates, "lr": {f: 0.125 for f in run_paper.FAMILIES},
                                            "source": "full page"}}))
    assert run_paper.settings_for("full", "language") == own
    assert run_paper.settings_for("full", "vision") == default_file
    assert run_paper.settings_for("default", "language") == default_file
    cfg = run_paper.with_learning_rates("language", run_paper.PartConfig(),
                                        run_paper.settings_for("full", "language"))
    assert cfg.lrs["JACTUS"] == 0.125
    source = run_paper.settings_source("full", "language")
    assert source["tuned_for"] == "full" and source["source"] == "full page"
    assert "NOT" not in run_paper._rates_line("language", {"language": source}, "full")
    assert run_paper.settings_source("default", "language")["tuned_for"] == "default"
    # the runner's command line takes the preset's own rates
    config = run_paper.run_config(["--preset", "full", "--parts", "language"])
    assert config.preset.language.lrs["LoRA"] == 0.125
    from jactus_linalg import DEFAULT_TASK_FRACTION

    assert config.preset.language.task_fraction == DEFAULT_TASK_FRACTION  # own entry has none
    # a sweep reads what the runner reads and writes the preset's own file; --settings is both;
    # the smoke preset has no file of its own: its sweeps write into their folder
    out = tmp_path / "out"
    assert run_paper.sweep_settings_files(None, "full", "vision", out) == (default_file, own)
    assert run_paper.sweep_settings_files(None, "default", "vision", out) == (
        default_file, default_file)
    assert run_paper.sweep_settings_files(tmp_path / "x.json", "full", "vision", out) == (
        tmp_path / "x.json", tmp_path / "x.json")
    assert run_paper.preset_settings_file("smoke") is None
    assert run_paper.sweep_settings_files(None, "smoke", "vision", out) == (
        default_file, out / "settings.json")
    # the tau sweep needs the preset's own rates for the part (it tunes tau at them)
    tau_args = argparse.Namespace(settings=None, preset="full", part="language", out=None)
    assert sweep_tau.tau_settings_files(tau_args) == (own, own)
    with pytest.raises(SystemExit, match=re.escape("validation.sweep --part vision --preset full")):
        sweep_tau.tau_settings_files(argparse.Namespace(**{**vars(tau_args), "part": "vision"}))
    smoke_args = argparse.Namespace(settings=None, preset="smoke", part="vision", out=out)
    assert sweep_tau.tau_settings_files(smoke_args) == (default_file, out / "settings.json")
    assert sweep.default_page(smoke_args, out, "tau") == out / "sweep-vision-tau-smoke.md"
    assert sweep.default_page(tau_args, out) == (
        sweep.ROOT / "docs" / "results" / "sweep-language-full.md")
    # the sweeps' folders and pages keep the default preset's names and give others their own
    args = argparse.Namespace(part="language", preset="full")
    assert sweep.sweep_name(args) == "sweep-language-full"
    assert sweep.sweep_name(args, "tau") == "sweep-language-tau-full"
    assert sweep.sweep_name(argparse.Namespace(part="vision", preset="default"), "steps") == (
        "sweep-vision-steps")


def test_task_fraction_comes_from_the_settings_file_unless_set(tmp_path):
    from jactus_linalg import DEFAULT_TASK_FRACTION

    path = tmp_path / "s.json"
    rates = {"lr": {f: 0.5 for f in run_paper.FAMILIES}, "lr_head": 0.25}
    path.write_text(json.dumps({"vision": {**rates, "task_fraction": 0.1}, "language": rates}))
    assert run_paper.with_learning_rates("vision", run_paper.PartConfig(), path).task_fraction == 0.1
    # a set tau wins, even with every rate set (the early return); no entry: the package default
    full = run_paper.PartConfig(lrs={f: 1.0 for f in run_paper.FAMILIES}, lr_head=1.0,
                                task_fraction=0.5)
    assert run_paper.with_learning_rates("vision", full, path).task_fraction == 0.5
    lang = run_paper.with_learning_rates("language", run_paper.PartConfig(), path)
    assert lang.task_fraction == DEFAULT_TASK_FRACTION
    # the paper preset keeps the package default whatever the small models' sweep chose
    paper = run_paper.presets()["paper"]
    assert paper.language.task_fraction == paper.vision.task_fraction == DEFAULT_TASK_FRACTION


def test_tau_sweep_chooses_the_best_pair_and_prefers_the_smaller_tau():
    done = {f"{t} {lr} {o}": {"task_fraction": t, "lr": lr, "order": o, "score": s}
            for (t, lr), scores in (((0.0, 1e-3), (0.5, 0.6, 0.7)), ((0.25, 1e-3), (0.8, 0.7, 0.9)),
                                    ((0.5, 1e-3), (0.8, 0.7, 0.9)), ((0.25, 1e-2), (0.1, 0.2, 0.3)))
            for o, s in enumerate(scores)}
    table = sweep_tau.table_of(done)
    assert table[(0.25, 1e-3)][0] == pytest.approx(0.8) and table[(0.25, 1e-3)][2] == 3
    assert sweep_tau.choose(table) == (0.25, 1e-3)  # tie with 0.5: the smaller tau
    with pytest.raises(SystemExit, match="at least 3"):
        sweep_tau.main(["--orders", "0", "1"])
    with pytest.raises(SystemExit, match="--task-fractions"):
        sweep_tau.main(["--task-fractions", "1.5"])


def test_tau_sweep_end_to_end_on_the_smoke_preset(tmp_path):
    settings = tmp_path / "settings.json"
    rates = {"lr": {f: 1e-3 for f in run_paper.FAMILIES}, "lr_head": 1e-2}
    settings.write_text(json.dumps({"vision": rates, "language": {"lr": {"LoRA": 7.0}}}))
    page = tmp_path / "tau.md"
    (tmp_path / "out").mkdir()
    bases = smoke_bases()
    other_steps = {f"tau=1 lr=0.001 head=0.01 steps=99 order={o} vision/digits base={bases[o]}": {
        "task_fraction": 1.0, "lr": 1e-3, "lr_head": 1e-2, "steps": 99, "order": o,
        "target": "vision/digits", "base": bases[o], "score": 1.0}
        for o in SEEDS}  # made at 99 steps: not used
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(other_steps))
    entry = sweep_tau.main(["--part", "vision", "--preset", "smoke", "--task-fractions", "0", "0.5",
                            "--out", str(tmp_path / "out"), "--page", str(page),
                            "--settings", str(settings), "--no-progress"])
    assert entry["task_fraction"] in (0.0, 0.5) and entry["lr"]["JACTUS"] == 1e-3
    written = json.loads(settings.read_text())
    assert written["language"] == {"lr": {"LoRA": 7.0}}  # other parts kept
    assert written["vision"]["lr"]["LoRA"] == 1e-3 and "sweep_tau" in written["vision"]["task_fraction_source"]
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert {v["order"] for v in done.values()} == SEEDS
    assert {v["task_fraction"] for v in done.values()} == {0.0, 0.5, 1.0}
    assert {v["target"] for v in done.values()} == {"vision/digits", "vision/digits-shifted"}
    text = page.read_text()
    assert "test items are never scored" in text and "| 0 |" in text and "| 0.5 |" in text
    assert "| 1 |" not in text  # the records made at other steps are kept, not used
    assert page.with_suffix(".png").stat().st_size > 0 and "](tau.png)" in text
    # the runner reads the choice
    cfg = run_paper.with_learning_rates("vision", run_paper.PartConfig(), settings)
    assert cfg.task_fraction == entry["task_fraction"]
    # a second command adds a rate at one tau; the choice is over every pair in --out
    sweep_tau.main(["--part", "vision", "--preset", "smoke", "--task-fractions", "0", "--lrs", "1e-2",
                    "--out", str(tmp_path / "out"), "--page", str(page),
                    "--settings", str(settings), "--no-progress"])
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert {(v["task_fraction"], v["lr"]) for v in done.values() if v["steps"] != 99} == {
        (0.0, 1e-3), (0.5, 1e-3), (0.0, 1e-2)}
    assert "lr 0.01" in page.read_text() and "| 0.5 | " in page.read_text()


def test_tau_sweep_in_lanes_joins_their_records_and_resumes_from_saved_ones(tmp_path, capsys,
                                                                           monkeypatch):
    out, again = tmp_path / "out", tmp_path / "again"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"language": {"lr": {f: 1e-3 for f in run_paper.FAMILIES},
                                                 "lr_head": 1e-3}}))
    argv = ["--part", "language", "--preset", "smoke", "--task-fractions", "0", "0.5",
            "--settings", str(settings), "--no-progress", "--jobs", "2"]
    entry = sweep_tau.main([*argv, "--out", str(out), "--page", str(tmp_path / "tau.md")])
    assert entry["task_fraction"] in (0.0, 0.5) and entry["lr"]["JACTUS"] == 1e-3
    printed = capsys.readouterr().out
    assert "0 records from --merge-from, 6 from the lanes" in printed
    assert "sweep lanes: 6 of 6 models recorded" in printed
    done = json.loads((out / "sweep.json").read_text())
    assert {(v["task_fraction"], v["order"]) for v in done.values()} == {
        (t, o) for t in (0.0, 0.5) for o in SEEDS}
    assert {v["preset"] for v in done.values()} == {"smoke"}
    for i, tau in enumerate((0.0, 0.5)):  # one lane per task fraction, its log beside
        lane = json.loads((out / f"lane{i}" / "sweep.json").read_text())
        assert {v["task_fraction"] for v in lane.values()} == {tau}
        assert "dev score" in (out / f"lane{i}" / "log.txt").read_text()
    assert "| 0.5 |" in (tmp_path / "tau.md").read_text()
    assert json.loads(settings.read_text())["language"]["task_fraction"] == entry["task_fraction"]
    # another folder (another machine) resumes from the saved records: nothing is tuned again
    again_entry = sweep_tau.main([*argv, "--out", str(again), "--merge-from", str(out),
                                  "--page", str(tmp_path / "tau-again.md")])
    printed = capsys.readouterr().out
    assert "6 records from --merge-from, 0 from the lanes" in printed
    assert json.loads((again / "sweep.json").read_text()) == done
    assert again_entry["task_fraction"] == entry["task_fraction"]
    assert not any((again / "lane0").glob("checkpoints/*"))
    # --stats-from: a sweep in a new folder reads a lane's calibration instead of calibrating
    def no_calibration(*_args, **_kwargs):
        raise AssertionError("calibrated although --stats-from held the statistics")

    monkeypatch.setattr(run_paper, "calibrate", no_calibration)
    (source,) = (out / "lane0").glob("stats-*.safetensors")
    third = tmp_path / "third"
    sweep_tau.main(["--part", "language", "--preset", "smoke", "--task-fractions", "0",
                    "--settings", str(settings), "--no-progress", "--out", str(third),
                    "--page", str(tmp_path / "tau-third.md"), "--stats-from", str(out / "lane0")])
    assert (third / source.name).samefile(source)  # linked, not copied
    assert "--stats-from: " in capsys.readouterr().out
    scores = {k: v["score"] for k, v in json.loads((third / "sweep.json").read_text()).items()}
    assert scores == {k: v["score"] for k, v in done.items() if k in scores} and len(scores) == 3


def test_lanes_read_the_parents_statistics_folders_by_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stats").mkdir()
    args = sweep_tau._parser().parse_args(["--part", "language", "--stats-from", "stats"])
    argv = sweep_lanes.shared_lane_argv(args, tmp_path / "lane0", tmp_path)
    assert argv[argv.index("--stats-from") + 1] == str(tmp_path / "stats")
    with pytest.raises(SystemExit, match=r"--stats-from: .*missing is not a folder"):
        sweep.link_statistics([tmp_path / "missing"], tmp_path)


def test_steps_check_chooses_the_best_mean_over_families_and_ranks_them():
    done = {f"{f} {s} {o}": {"family": f, "steps": s, "order": o, "score": v + 0.01 * o}
            for f, by_steps in (("LoRA", {10: 0.5, 20: 0.7, 40: 0.7}),
                                ("JACTUS", {10: 0.6, 20: 0.6, 40: 0.7}))
            for s, v in by_steps.items() for o in range(3)}
    table = sweep_steps.table_of(done)
    assert table[("LoRA", 20)][0] == pytest.approx(0.71) and table[("LoRA", 20)][2] == 3
    assert sweep_steps.choose(table) == 40  # mean 0.71 at 40 against 0.66 at 20
    done.update({f"LoRA 40 {o} b": {"family": "LoRA", "steps": 40, "order": o, "score": 0.0}
                 for o in range(3)})  # a second target halves LoRA's score at 40 steps
    table = sweep_steps.table_of(done)
    assert table[("LoRA", 40)][0] == pytest.approx(0.355)
    assert sweep_steps.choose(table) == 20
    assert sweep_steps.rankings(table) == {10: ["JACTUS", "LoRA"], 20: ["LoRA", "JACTUS"],
                                           40: ["JACTUS", "LoRA"]}
    with pytest.raises(SystemExit, match="at least 3"):
        sweep_steps.main(["--steps", "5", "--orders", "0", "1"])
    with pytest.raises(SystemExit, match="--steps"):
        sweep_steps.main(["--steps", "0", "5"])
    with pytest.raises(SystemExit, match="--families"):
        sweep_steps.main(["--steps", "5", "--families", "QLoRA"])


def test_steps_check_end_to_end_on_the_smoke_preset(tmp_path):
    settings = tmp_path / "settings.json"
    rates = {"lr": {f: 1e-3 for f in run_paper.FAMILIES}, "lr_head": 1e-2, "task_fraction": 0.5}
    settings.write_text(json.dumps({"vision": rates}))
    before = settings.read_text()
    page = tmp_path / "steps.md"
    result = sweep_steps.main(["--part", "vision", "--preset", "smoke", "--steps", "1", "2",
                               "--families", "JACTUS,LoRA", "--out", str(tmp_path / "out"),
                               "--page", str(page), "--settings", str(settings),
                               "--no-progress"])
    assert result["steps"] in (1, 2) and set(result["rankings"]) == {1, 2}
    assert settings.read_text() == before  # a check: nothing written to the settings
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(done) == 2 * 2 * 3 * 2  # families x steps x orders x targets
    assert {v["order"] for v in done.values()} == SEEDS
    assert {v["steps"] for v in done.values()} == {1, 2}
    text = page.read_text()
    assert "test items are never scored" in text and "| JACTUS |" in text and "| LoRA |" in text
    assert "mean over families" in text and f"**{result['steps']}**" in text
    # the preset's own 2 steps are judged against the best of the grid
    assert ("best of the grid on dev items" in text) == (result["steps"] == 2)
    assert {v["task_fraction"] for v in done.values() if v["family"] == "JACTUS"} == {0.5}
    # a rerun resumes: nothing is tuned again
    mtime = (tmp_path / "out" / "sweep.json").stat().st_mtime_ns
    sweep_steps.main(["--part", "vision", "--preset", "smoke", "--steps", "1", "2",
                      "--families", "JACTUS,LoRA", "--out", str(tmp_path / "out"),
                      "--page", str(page), "--settings", str(settings), "--no-progress"])
    assert (tmp_path / "out" / "sweep.json").stat().st_mtime_ns == mtime
    # new rates (a new sweep): LoRA tunes again, and the page uses only the records at them
    settings.write_text(json.dumps({"vision": {**rates, "lr": {**rates["lr"], "LoRA": 1e-2}}}))
    again = sweep_steps.main(["--part", "vision", "--preset", "smoke", "--steps", "2",
                              "--families", "LoRA", "--out", str(tmp_path / "out"),
                              "--page", str(page), "--settings", str(settings),
                              "--no-progress"])
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(done) == 24 + 3 * 2 and {v["lr"] for v in done.values()} == {1e-3, 1e-2}
    assert set(again["table"]) == {("JACTUS", 1), ("JACTUS", 2), ("LoRA", 2)}
    assert "LoRA 0.01" in page.read_text()
    # a new head rate: every family tunes again (its records are made with the head at it)
    settings.write_text(json.dumps({"vision": {**rates, "lr_head": 3e-2}}))
    again = sweep_steps.main(["--part", "vision", "--preset", "smoke", "--steps", "2",
                              "--families", "LoRA", "--out", str(tmp_path / "out"),
                              "--page", str(page), "--settings", str(settings),
                              "--no-progress"])
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(done) == 24 + 3 * 2 + 3 * 2 and set(again["table"]) == {("LoRA", 2)}
    assert {v["lr_head"] for v in done.values()} == {1e-2, 3e-2}


def test_every_preset_runs_three_seeds_and_full_is_large_enough():
    presets = run_paper.presets()
    assert all(len(set(p.seeds)) >= 3 for p in presets.values())
    full = presets["full"].language
    assert full.steps >= 300 and full.n_test >= 100 and full.n_tune * 8 >= 2000
    assert 0.8 in presets["default"].language.retains and 0.9 in presets["default"].language.retains
    assert len(presets["default"].vision.targets) >= 2


def _rec(name, family, kind, retain, correct):
    return {"method": {"name": name, "family": family, "kind": kind, "retain": retain, "options": {}},
            "correct": correct, "metrics": {}, "retain_achieved": retain, "trainable_params": 1,
            "total_params": 10, "wall_time_s": 0.0}


def test_comparisons_pool_items_over_seeds_and_verdict_follows_the_numbers():
    rng = np.random.default_rng(0)
    by_seed = {}
    for seed in range(3):
        base = rng.random(60) < 0.5
        by_seed[seed] = {
            "JACTUS@0.8": _rec("JACTUS@0.8", "JACTUS", "jactus", 0.8, {"t": [1] * 60}),
            "SVD-LLM+LoRA@0.8": _rec("SVD-LLM+LoRA@0.8", "SVD-LLM+LoRA", "ctf", 0.8,
                                     {"t": base.astype(int).tolist()}),
            "LoRA@1.0": _rec("LoRA@1.0", "LoRA", "lora", 1.0, {"t": [1] * 60}),
            "DoRA@1.0": _rec("DoRA@1.0", "DoRA", "dora", 1.0, {"t": [1] * 59 + [0]}),
        }
    comps = run_paper.comparisons(by_seed)
    pair = {(c["a"], c["b"]): c for c in comps}
    assert pair[("JACTUS@0.8", "SVD-LLM+LoRA@0.8")]["n_items"] == 180
    assert pair[("JACTUS@0.8", "SVD-LLM+LoRA@0.8")]["ci_low"] > 0
    summary = summarize(by_seed)
    assert summary["JACTUS@0.8"]["n_seeds"] == 3 and summary["JACTUS@0.8"]["sd"] == 0.0
    lines = claim_lines("vision", summary, comps)
    assert len(lines) == 1 and "HOLDS" in lines[0]
    # flip: compress-then-finetune right everywhere, JACTUS never
    for recs in by_seed.values():
        recs["JACTUS@0.8"]["correct"] = {"t": [0] * 60}
    lines = claim_lines("vision", summarize(by_seed), run_paper.comparisons(by_seed))
    assert "does NOT hold" in lines[0] and "below" in lines[0]


def test_sweep_selects_the_best_mean_over_orders_and_flags_edges():
    done = {f"{lr} {o}": {"family": "LoRA", "lr": lr, "score": s}
            for lr, scores in ((1e-4, (0.5, 0.6, 0.7)), (1e-3, (0.8, 0.7, 0.9)), (1e-2, (0.1, 0.2, 0.3)))
            for o, s in enumerate(scores)}
    chosen = sweep.select(done, "LoRA")
    assert chosen["lr"] == 1e-3 and not chosen["edge"]
    assert chosen["table"][1e-3][0] == pytest.approx(0.8) and chosen["table"][1e-3][2] == 3
    done["x"] = {"family": "LoRA", "lr": 1e-1, "score": 5.0}
    assert sweep.select(done, "LoRA")["edge"]
    with pytest.raises(SystemExit, match="at least 3"):
        sweep.main(["--orders", "0", "1"])


def test_jactus_records_of_another_task_fraction_are_kept_but_not_used():
    done = {"a": {"family": "JACTUS", "task_fraction": 0.0},
            "b": {"family": "JACTUS", "task_fraction": 0.5},
            "c": {"family": "JACTUS"},  # made before records carried their tau: used
            "d": {"family": "LoRA"}}
    assert set(sweep.at_task_fraction(done, 0.0)) == {"a", "c", "d"}
    assert set(sweep.at_task_fraction(done, 0.5)) == {"b", "c", "d"}


def test_a_family_is_chosen_only_when_every_rate_has_every_order():
    swept = {"LoRA": {"table": {1e-3: (0.5, 0.1, 3), 1e-2: (0.6, 0.1, 3)}},
             "JACTUS": {"table": {1e-3: (0.9, 0.0, 2), 1e-2: (0.1, 0.1, 3)}}}
    chosen, short = sweep.split_by_orders(swept, 3)
    assert list(chosen) == ["LoRA"] and short == {"JACTUS": [1e-3]}


def test_sweep_merges_the_records_of_sweeps_run_side_by_side(tmp_path):
    for name, records in (("a", {"JACTUS x": {"score": 1.0}, "both": {"score": 2.0}}),
                          ("b", {"LoRA y": {"score": 3.0}, "both": {"score": 2.0}}),
                          ("c", {"both": {"score": 9.0}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps(records))
    done = {"DoRA z": {"score": 4.0}}
    assert sweep.merge_records(done, [tmp_path / "a", tmp_path / "b"]) == 3
    assert done == {"DoRA z": {"score": 4.0}, "JACTUS x": {"score": 1.0}, "both": {"score": 2.0},
                    "LoRA y": {"score": 3.0}}
    with pytest.raises(SystemExit, match=re.escape("'both' has score 9.0")):
        sweep.merge_records(done, [tmp_path / "c"])
    with pytest.raises(SystemExit, match=r"--merge-from: .*does not exist"):
        sweep.merge_records(done, [tmp_path / "missing"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sweep.json").write_text(json.dumps({"x": {"score": 1.0, "preset": "default"}}))
    with pytest.raises(SystemExit, match="made with --preset default, not full"):
        sweep.merge_records(done, [tmp_path / "d"], "full")
    assert sweep.merge_records(done, [tmp_path / "d"], "default") == 1


def test_sweep_end_to_end_on_the_smoke_preset(tmp_path, monkeypatch):
    # no --settings, no --page: a sweep of the smoke preset (a check of the machinery) reads tau
    # from the default preset's file and writes its settings and page into its own folder only
    default_file = tmp_path / "tuned_settings.json"
    monkeypatch.setattr(run_paper, "SETTINGS_FILE", default_file)
    default_file.write_text(json.dumps({"vision": {"lr": {"LoRA": 3.0}, "task_fraction": 0.25,
                                                   "task_fraction_source": "tau page"}}))
    (tmp_path / "out").mkdir()
    settings = tmp_path / "out" / "settings.json"
    settings.write_text(json.dumps({"language": {"lr": {"LoRA": 7.0}, "lr_head": 1.0}}))
    page = tmp_path / "out" / "sweep-vision-smoke.md"
    # a family swept earlier into the same --out (a rerun of some families keeps the others),
    # with the head at each rate the sweep may choose; and one with a head rate not swept
    steps = run_paper.presets()["smoke"].vision.steps
    bases = smoke_bases()
    earlier = {f"DoRA lr=0.5 head={h:g} steps={steps} order={o} vision/digits base={bases[o]}": {
        "family": "DoRA", "lr": 0.5, "lr_head": h, "steps": steps, "order": o,
        "target": "vision/digits", "base": bases[o], "score": 0.3}
        for o in SEEDS for h in (1e-3, 1e-2)}
    earlier |= {f"LoRA lr=9 head=5 steps={steps} order={o} vision/digits base={bases[o]}": {
        "family": "LoRA", "lr": 9.0, "lr_head": 5.0, "steps": steps, "order": o,
        "target": "vision/digits", "base": bases[o], "score": 1.0}
        for o in SEEDS}  # another head: not used
    earlier |= {f"{f} lr=7 head={h:g} steps={steps + 1} order={o} vision/digits base={bases[o]}": {
        "family": f, "lr": 7.0, "lr_head": h, "steps": steps + 1, "order": o,
        "target": "vision/digits", "base": bases[o], "score": 1.0}
        for o in SEEDS for h in (1e-3, 1e-2) for f in ("LoRA", "head")}  # other steps: not used
    earlier |= {f"{f} lr=8 head={h:g} steps={steps} order={o} vision/digits base=0123456789abcdef": {
        "family": f, "lr": 8.0, "lr_head": h, "steps": steps, "order": o,
        "target": "vision/digits", "base": "0123456789abcdef", "score": 1.0}
        for o in SEEDS for h in (1e-3, 1e-2) for f in ("LoRA", "head", "DoRA")}  # another ViT
    earlier |= {f"DoRA lr=6 head={h:g} steps={steps} order={o} vision/digits": {
        "family": "DoRA", "lr": 6.0, "lr_head": h, "steps": steps, "order": o,
        "target": "vision/digits", "score": 1.0}
        for o in SEEDS for h in (1e-3, 1e-2)}  # no ViT recorded: not used
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(earlier))
    # every model's tuning loop checkpoints (here after every step) where the record's label
    # says, and the checkpoint is gone once the model is scored
    monkeypatch.setattr(run_paper, "tune", functools.partial(tune, checkpoint_every_s=0.0))
    checkpoints: list[tuple[Path, bool]] = []
    run_method = run_paper.run_method

    def spy(*a, checkpoint=None, **k):
        rec = run_method(*a, checkpoint=checkpoint, **k)
        checkpoints.append((checkpoint, checkpoint.is_file()))
        return rec

    monkeypatch.setattr(run_paper, "run_method", spy)
    chosen = sweep.main(["--part", "vision", "--preset", "smoke", "--lrs", "1e-3", "1e-2",
                         "--families", "LoRA", "--out", str(tmp_path / "out"), "--no-progress"])
    assert chosen["lr"]["LoRA"] in (1e-3, 1e-2) and chosen["lr_head"] in (1e-3, 1e-2)
    assert json.loads(default_file.read_text())["vision"]["lr"] == {"LoRA": 3.0}  # untouched
    assert run_paper.settings_for("smoke", "vision") == default_file  # runs never read the sweep's
    assert not list((sweep.ROOT / "docs" / "results").glob("*smoke*"))
    written = json.loads(settings.read_text())
    assert written["language"]["lr"] == {"LoRA": 7.0}  # other parts kept
    assert written["vision"]["chosen_by_sweep"] is True
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert {v["order"] for v in done.values()} == SEEDS
    assert {v["target"] for v in done.values()} == {"vision/digits", "vision/digits-shifted"}
    text = page.read_text()
    assert "dev items" in text and "test items are never scored" in text and "| LoRA |" in text
    assert page.with_suffix(".png").stat().st_size > 0 and f"]({page.stem}.png)" in text
    assert "| DoRA |" in text and written["vision"]["lr"]["DoRA"] == 0.5
    # sweep_tau's choice, read from the default preset's file, travels with the rates chosen at it
    assert written["vision"]["task_fraction"] == 0.25
    assert written["vision"]["task_fraction_source"] == "tau page"
    assert {v["lr_head"] for k, v in done.items() if k.startswith("LoRA lr=0.01")} == {
        written["vision"]["lr_head"]}
    assert written["vision"]["lr"]["LoRA"] != 7.0 and written["vision"]["lr_head"] != 7.0
    assert {v["steps"] for k, v in done.items() if k.startswith("LoRA lr=0.01")} == {steps}
    # records made from another pretrained ViT (or none recorded) are kept, not used
    assert 8.0 not in (written["vision"]["lr"]["LoRA"], written["vision"]["lr_head"])
    assert written["vision"]["lr"]["DoRA"] == 0.5 and "| 8 |" not in text and "| 6 |" not in text
    assert {(v["order"], v["base"]) for k, v in done.items() if k.startswith("LoRA lr=0.01")} == set(
        bases.items())
    new_labels = set(done) - set(earlier)
    assert {path for path, _ in checkpoints} == {
        sweep.checkpoint_path(tmp_path / "out", label) for label in new_labels
        if not label.startswith("head")}  # the head alone trains outside run_method
    assert all(saved for _, saved in checkpoints) and len(checkpoints) == len(new_labels) - len(
        [label for label in new_labels if label.startswith("head")])
    assert not any((tmp_path / "out" / "checkpoints").glob("*"))
    assert "--lrs 0.001 0.01`" in text  # the page names the command that wrote it
    assert f"`{settings}` (not a file the runner reads)" in text  # and where its choice went
    assert "Pretrained ViT per order" in text and all(f"`{f}`" in text for f in bases.values())


def test_sweep_tunes_jactus_again_after_the_task_fraction_changed(tmp_path):
    # JACTUS records (and checkpoints) are named by their tau: a rerun at a new tau tunes
    # again instead of skipping the labels made at the old one, and chooses from the new only
    out = tmp_path / "out"
    out.mkdir()
    settings = out / "settings.json"
    argv = ["--part", "language", "--preset", "smoke", "--lrs", "1e-3", "--families", "JACTUS",
            "--out", str(out), "--settings", str(settings), "--no-progress"]
    for tau in (0.0, 0.5):
        settings.write_text(json.dumps({"language": {"lr": {}, "task_fraction": tau}}))
        sweep.main(argv)
        assert json.loads(settings.read_text())["language"]["task_fraction"] == tau
    done = json.loads((out / "sweep.json").read_text())
    assert len(done) == 2 * len(SEEDS)
    for tau in (0.0, 0.5):
        at_tau = [k for k, v in done.items() if v["task_fraction"] == tau]
        assert len(at_tau) == len(SEEDS) and all(f" tau={tau:g} " in k for k in at_tau)
    page = (out / "sweep-language-smoke.md").read_text()
    assert "| JACTUS |" in page


def test_sweep_plot_draws_means_in_the_page_units_and_leaves_out_diverged_rates(tmp_path):
    curves = {"LoRA": {1e-3: (-3.5, 0.1, 3), 1e-2: (-3.2, 0.2, 3), 3e-2: (-math.inf, 0.0, 3)},
              "DoRA": {1e-3: (-math.inf, 0.0, 3)}}  # every rate diverged: no line
    drawn = plot_dev_sweep(curves, {"LoRA": 1e-2}, tmp_path / "s.png", xlabel="rate",
                           ylabel="NLL", title="t", scale=-1.0)
    assert drawn == {"LoRA": [(1e-3, 3.5), (1e-2, 3.2)]}
    assert (tmp_path / "s.png").stat().st_size > 0


def test_family_groups_are_contiguous_and_balanced():
    from validation.sweep_lanes import family_groups

    families = list(sweep.FAMILY_METHODS)
    assert family_groups(families, 2) == [["JACTUS", "SVD-LLM+LoRA"], ["LoRA", "DoRA"]]
    assert family_groups(families, 3) == [["JACTUS", "SVD-LLM+LoRA"], ["LoRA"], ["DoRA"]]
    assert family_groups(families[:1], 4) == [["JACTUS"]]
    with pytest.raises(SystemExit, match="--jobs"):
        family_groups(families, 0)


def test_lane_records_are_gathered_into_one_file_as_they_land(tmp_path):
    from validation.sweep_lanes import gather_records, models_recorded

    lanes = [tmp_path / "lane0", tmp_path / "lane1", tmp_path / "lane2"]  # lane2: not started
    rec = {"family": "LoRA", "lr": 1e-3, "preset": "full", "score": -3.0, "steps": 300}
    lanes[0].mkdir()
    (lanes[0] / "sweep.json").write_text(json.dumps({"a": rec}))
    lanes[1].mkdir()
    (lanes[1] / "sweep.json").write_text(json.dumps({"b": {**rec, "family": "DoRA"}}))
    done = {"saved": {**rec, "lr": 3e-2}}  # from --merge-from
    gather_records(done, lanes, tmp_path, "full")
    assert json.loads((tmp_path / "sweep.json").read_text()) == done
    assert set(done) == {"saved", "a", "b"}
    assert models_recorded(done, ["LoRA", "DoRA"], {1e-3, 3e-2}, 300, 0.0) == 3
    assert models_recorded(done, ["LoRA"], {1e-3}, 300, 0.0) == 1
    # records --out keeps from another sweep (other steps, JACTUS at another tau) are not counted
    jactus = {**rec, "family": "JACTUS", "task_fraction": 0.0}
    others = {"short": {**rec, "steps": 30}, "j0": jactus, "j5": {**jactus, "task_fraction": 0.5}}
    assert models_recorded({**done, **others}, ["LoRA", "DoRA", "JACTUS"], {1e-3, 3e-2},
                           300, 0.0) == 4
    (lanes[1] / "sweep.json").write_text(json.dumps({"a": {**rec, "score": -2.0}}))
    with pytest.raises(SystemExit, match="score"):  # one label, two scores: never silently
        gather_records(done, lanes, tmp_path, "full")


def test_sweep_in_lanes_joins_their_records_and_resumes_from_saved_ones(tmp_path, capsys):
    out, again = tmp_path / "out", tmp_path / "again"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"language": {"lr": {}, "task_fraction": 0.0}}))
    argv = ["--part", "language", "--preset", "smoke", "--lrs", "1e-3", "--families",
            "LoRA,DoRA", "--settings", str(settings), "--no-progress", "--jobs", "2"]
    chosen = sweep.main([*argv, "--out", str(out)])
    assert chosen["lr"] == {"LoRA": 1e-3, "DoRA": 1e-3}
    printed = capsys.readouterr().out
    assert "0 records from --merge-from, 6 from the lanes" in printed
    counts = [line for line in printed.splitlines() if line.startswith("sweep lanes:")]
    assert counts[-1] == "sweep lanes: 6 of 6 models recorded"  # the progress, in lines
    done = json.loads((out / "sweep.json").read_text())
    assert len(done) == 6 and {v["family"] for v in done.values()} == {"LoRA", "DoRA"}
    for i, family in enumerate(("LoRA", "DoRA")):  # one lane per family, its log beside
        lane = json.loads((out / f"lane{i}" / "sweep.json").read_text())
        assert {v["family"] for v in lane.values()} == {family}
        assert (out / f"lane{i}" / "log.txt").is_file()
    assert "| LoRA |" in (out / "sweep-language-smoke.md").read_text()
    # another folder (another machine) resumes from the saved records: nothing is tuned again
    chosen_again = sweep.main([*argv, "--out", str(again), "--merge-from", str(out)])
    printed = capsys.readouterr().out
    assert "6 records from --merge-from, 0 from the lanes" in printed
    assert "sweep lanes: 6 of 6 models recorded" in printed
    assert json.loads((again / "sweep.json").read_text()) == done
    assert chosen_again["lr"] == chosen["lr"]
    assert not any((again / "lane0").glob("checkpoints/*"))


@pytest.fixture
def parent_on_two_threads():
    """The sweep's parent on two threads, as under ``make test`` on two cores, its lanes on one.

    The parent of ``--jobs`` must still build the lanes' pretrained model
    (on two threads the smoke ViT once pretrained to other weights).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("parent_on_two_threads")
def test_vision_lanes_start_after_one_head_sweep(tmp_path, capsys):
    out = tmp_path / "out"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"vision": {"lr": {}, "task_fraction": 0.0}}))
    chosen = sweep.main(["--part", "vision", "--preset", "smoke", "--lrs", "1e-2", "--families",
                         "LoRA,DoRA", "--settings", str(settings), "--no-progress", "--jobs", "2",
                         "--out", str(out)])
    assert chosen["lr"] == {"LoRA": 1e-2, "DoRA": 1e-2} and chosen["lr_head"] == 1e-2
    printed = capsys.readouterr().out
    heads = [line for line in printed.splitlines() if line.startswith("head lr=")]
    assert len(heads) == len(SEEDS) * 2  # orders x targets, tuned in the parent
    for i in (0, 1):  # and in no lane: each started from the parent's head records
        log = (out / f"lane{i}" / "log.txt").read_text()
        assert "head lr=" not in log and "dev score" in log
    done = json.loads((out / "sweep.json").read_text())
    assert sum(v["family"] == sweep.HEAD for v in done.values()) == len(SEEDS) * 2
    assert {v["lr_head"] for v in done.values() if v["family"] != sweep.HEAD} == {1e-2}
    assert "sweep lanes: 12 of 12 models recorded" in printed
    # resumed elsewhere from the saved records: counted once, and nothing is tuned again
    again = sweep.main(["--part", "vision", "--preset", "smoke", "--lrs", "1e-2", "--families",
                        "LoRA,DoRA", "--settings", str(settings), "--no-progress", "--jobs", "2",
                        "--out", str(tmp_path / "again"), "--merge-from", str(out)])
    printed = capsys.readouterr().out
    assert (again["lr"], again["lr_head"]) == (chosen["lr"], chosen["lr_head"])
    assert "dev score" not in printed
    assert "--jobs 2: 18 records from --merge-from, 0 from the lanes" in printed


@pytest.mark.usefixtures("parent_on_two_threads")
def test_vision_tau_lanes_leave_the_parent_nothing_to_tune(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"vision": {"lr": {f: 1e-2 for f in run_paper.FAMILIES},
                                               "lr_head": 1e-2}}))
    entry = sweep_tau.main(["--part", "vision", "--preset", "smoke", "--task-fractions", "0", "0.5",
                            "--settings", str(settings), "--no-progress", "--jobs", "2",
                            "--out", str(tmp_path / "out"), "--page", str(tmp_path / "tau.md")])
    assert entry["task_fraction"] in (0.0, 0.5)
    printed = capsys.readouterr().out
    assert "0 records from --merge-from, 12 from the lanes" in printed
    assert "dev score" not in printed  # the parent chose from the lanes' records, tuning none


# ----------------------------------------------------------------------------- end to end


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), "--preset", "smoke", "--out", str(out), "--no-progress", *extra],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    done = _run(out, "--save-models", str(out / "models"), "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def _payload(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_smoke_writes_every_output(smoke):
    out, _ = smoke
    for name in ("results.json", "results.csv", "results.md", "summary.md",
                 "accuracy_vs_retain_language.png", "accuracy_vs_retain_vision.png",
                 "ranks_language.png", "predicted_loss_vision.png",
                 "predicted_vs_measured_language.png", "predicted_vs_measured_vision.png"):
        assert (out / name).stat().st_size > 0, name
    for lane in (0, 1):  # --jobs 2: two processes, each with its log
        assert (out / f"log-job{lane}.txt").stat().st_size > 0
    # the language calibration ran in exactly one lane, and its log says how long it took
    logs = [(out / f"log-job{lane}.txt").read_text() for lane in (0, 1)]
    timed = [re.findall(r"\[language seed \d\] calibration: (\d+) s in this process", t) for t in logs]
    assert sorted(len(t) for t in timed) == [0, 1], timed
    # the first lane pretrained the ViTs; the vision part of the second built the same bytes
    vits = [dict(re.findall(r"\[vision\] seed (\d): pretrained ViT fingerprint (\w+)", t))
            for t in logs]
    assert set(vits[0]) == {str(s) for s in SEEDS} and vits[0] == vits[1], vits
    # and the final pass, which reads the lanes' records, built them too (else it reran vision)
    assert _payload(out)["pretrained_fingerprints"]["vision"] == vits[0]
    payload = _payload(out)
    lang = {r["method"] for r in payload["rows"] if r["part"] == "language"}
    vis = {r["method"] for r in payload["rows"] if r["part"] == "vision"}
    for expected in ("JACTUS@0.8", "JACTUS@0.9", "SVD-LLM+LoRA@0.9", "LoRA@1.0", "DoRA@1.0"):
        assert expected in lang
    for expected in ("JACTUS@0.8", "SVD+LoRA@0.8", "JACTUS tau=0@0.8", "JACTUS gradient-directions@0.8",
                     "JACTUS no-Cg@0.8", "JACTUS uniform@0.8"):
        assert expected in vis
    tasks = {r["task"] for r in payload["rows"] if r["part"] == "language"}
    assert tasks == {"boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "average"}
    assert {r["task"] for r in payload["rows"] if r["part"] == "vision"} == {"digits", "digits-shifted",
                                                                             "average"}
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(payload["rows"])
    assert {int(r["seed"]) for r in rows} == SEEDS


def test_tables_show_mean_and_sd_over_seeds(smoke):
    out, _ = smoke
    payload = _payload(out)
    for part in ("language", "vision"):
        for name, entry in payload["summary"][part].items():
            assert entry["n_seeds"] == 3, (part, name)
            assert entry["mean"] == pytest.approx(np.mean(entry["per_seed"]))
    lang = payload["summary"]["language"]["LoRA@1.0"]
    assert set(lang["metrics"]) == {"acc", "correct", "answer_nll", "margin"}
    assert "without_boolq" in lang
    text = (out / "results.md").read_text()
    assert "avg ± sd (seeds)" in text and "avg w/o boolq" in text and "answer NLL" in text


def test_learning_rates_and_head_rate_are_the_files(smoke):
    out, _ = smoke
    chosen = run_paper.tuned_settings()
    for r in _payload(out)["rows"]:
        family = {"jactus": "JACTUS", "ctf": "SVD-LLM+LoRA", "lora": "LoRA", "dora": "DoRA"}.get(
            r["settings"]["kind"])
        if family is None or r["trainable_params"] == 0:
            continue
        assert r["settings"]["lr"] == chosen[r["part"]]["lr"][family]
        if r["part"] == "vision":
            assert r["settings"]["lr_head"] == chosen["vision"]["lr_head"]


def test_seeds_change_order_and_initialisation_and_vit_fingerprints_are_recorded(smoke):
    out, _ = smoke
    payload = _payload(out)
    prints = payload["pretrained_fingerprints"]["vision"]
    assert set(map(int, prints)) == SEEDS and len(set(prints.values())) == 3
    losses = {}
    for path in (out / "methods").glob("language__seed*__LoRA_1.0__*.json"):
        rec = json.loads(path.read_text())
        losses[rec["seed"]] = tuple(rec["train_losses"])
    assert set(losses) == SEEDS and len(set(losses.values())) == 3


def test_untuned_rows_are_evaluated_before_any_step(smoke):
    out, _ = smoke
    payload = _payload(out)
    untuned = {r["method"] for r in payload["rows"] if r["method"].endswith(" untuned")
               and r["part"] == "language"}
    assert untuned == {"JACTUS@0.8 untuned", "SVD-LLM+LoRA@0.8 untuned", "JACTUS@0.9 untuned",
                       "SVD-LLM+LoRA@0.9 untuned"}
    assert all(r["trainable_params"] == 0 for r in payload["rows"] if r["method"].endswith(" untuned"))
    for path in (out / "methods").glob("*untuned*.json"):
        assert json.loads(path.read_text())["train_losses"] == []
    # language: one base model and one calibration for every seed, so seeds 1 and 2
    # reuse seed 0's untuned evaluation (and say so) instead of recomputing it
    for path in (out / "methods").glob("language__seed[12]__*untuned*.json"):
        rec = json.loads(path.read_text())
        assert rec["copied_from_seed"] == 0 and rec["wall_time_s"] < 5
    pairs = {(c["a"], c["b"]) for c in payload["paired_comparisons"]["vision"]}
    assert ("JACTUS@0.8 untuned", "SVD-LLM+LoRA@0.8 untuned") in pairs
    assert ("JACTUS@0.8", "JACTUS@0.8 untuned") in pairs
    assert ("JACTUS@0.8", "SVD-LLM+LoRA@0.8 untuned") not in pairs


def test_predicted_and_measured_loss_rise_are_recorded(smoke):
    out, _ = smoke
    for path in (out / "methods").glob("language__seed0__*JACTUS_0.8*.json"):
        rec = json.loads(path.read_text())
        assert rec["predicted_loss_increase"] >= 0
        assert rec["measured_loss_increase"] == pytest.approx(
            rec["calibration_loss_compressed"] - rec["calibration_loss_base"])


def test_splits_are_recorded_and_disjoint(smoke):
    out, _ = smoke
    splits = _payload(out)["splits"]
    per_task = [*splits["language"]["language"]["tasks"].values(),
                splits["vision"]["vision/digits"]["digits"],
                splits["vision"]["vision/digits-shifted"]["digits-shifted"]]
    assert len(per_task) == 10
    for ids in per_task:
        tune, test = set(ids["tune"]), set(ids["test"])
        assert tune and test and not tune & test


def test_budgets_and_intervals(smoke):
    out, _ = smoke
    rows = _payload(out)["rows"]
    for r in rows:
        if r["settings"]["kind"] in ("jactus", "ctf"):
            assert r["retain_achieved"] <= r["retain_target"] + 1e-9
            assert r["retain_achieved"] > r["retain_target"] - 0.02
        if r["task"] == "average":
            assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    comps = _payload(out)["paired_comparisons"]
    pooled = [c for c in comps["language"] if c["a"] == "JACTUS@0.8" and c["b"] == "SVD-LLM+LoRA@0.8"]
    assert pooled and pooled[0]["n_items"] == 3 * 8 * 3  # items x tasks x seeds


def test_method_time_sums_every_record_including_those_read_back(smoke):
    """--jobs 2: the final pass reads every record the lanes wrote; its method time is theirs."""
    out, _ = smoke
    payload = _payload(out)
    records = [json.loads(p.read_text()) for p in (out / "methods").glob("*.json")]
    assert len(records) > 20
    total = sum(r["wall_time_s"] for r in records)
    assert total > 0
    # every record says where it was made (language keys do not hold the CPU type)
    from validation.bench_machine import cpu_model, cpu_vector_flags
    for r in records:
        assert r["machine"]["torch"] and r["machine"]["device"] == "cpu", r["machine"]
        assert r["machine"]["vector_flags"] == list(cpu_vector_flags())
    # and the results page counts the records per machine
    machines = payload["record_machines"]
    [(machine, count)] = machines.items()
    assert count == len(records) and machine.startswith(cpu_model()), machines
    assert f"Records made on: {machine}: {count}" in (out / "results.md").read_text()
    assert payload["recorded_time_s"] == pytest.approx(total, rel=1e-9)
    assert "h of method time" in (out / "summary.md").read_text()


def test_summary_says_the_smoke_presets_rates_were_chosen_for_the_default_preset(smoke):
    out, _ = smoke
    head = (out / "summary.md").read_text().split("**language.**")[0]
    assert head.startswith("Preset `smoke`") and "Command: `" in head
    for part in ("language", "vision"):
        assert f"the {part} rates were chosen in the default preset's configuration, not this one's" in head
        assert _payload(out)["learning_rates"][part]["tuned_for"] == "default"
    assert "NOT this preset's" in (out / "results.md").read_text()
    assert _payload(out)["devices"] == {"language": "cpu", "vision": "cpu"}


def test_verdict_is_written_from_the_results(smoke):
    out, _ = smoke
    text = (out / "summary.md").read_text()
    for part in ("language", "vision"):
        assert f"**{part}.**" in text
    assert "Retain 0.8: the paper's ordering" in text and "Retain 0.9: the paper's ordering" in text


def test_saved_models_evaluate_again_without_tuning(smoke):
    from transformers import ViTForImageClassification

    from jactus_linalg.torch import load_compressed
    from validation import vision

    out, _ = smoke
    models = out / "models"
    folder = models / "vision-digits" / "seed1" / "JACTUS_0.8"
    assert (folder / "jactus.json").is_file()
    task = vision.digits_task(0, 64, 64)
    recorded = {}
    for path in (out / "methods").glob("vision-digits__seed1__*.json"):
        rec = json.loads(path.read_text())
        recorded[rec["method"]["name"]] = rec["correct"]["digits"]
    for name, loader in (("JACTUS_0.8", load_compressed),
                         ("LoRA_1.0", ViTForImageClassification.from_pretrained)):
        model = loader(models / "vision-digits" / "seed1" / name).eval()
        with torch.no_grad():
            pred = model(pixel_values=task.test_x).logits.argmax(-1)
        again = (pred == task.test_y).int().tolist()
        assert again == recorded[name.replace("_", "@")], name
    lang = models / "language" / "seed0" / "JACTUS_0.9"
    assert (lang / "jactus.json").is_file() and (lang / "tokenizer_config.json").is_file()


def test_jobs_lanes_run_every_method_exactly_once():
    """--jobs 2: the language methods split by kind between two lanes, vision in the second;
    each lane has half the tuned language models of the full preset."""
    config = run_paper.run_config(["--preset", "default", "--jobs", "2"])
    lanes = run_paper.job_lanes(config)
    assert len(lanes) == 2 and lanes[1][-1] == ["--parts", "vision"]
    # the first lane builds the ViTs the second lane's vision part then reads
    assert lanes[0][0] == ["--parts", "vision", "--pretrain-only"]
    language = [next(job for job in lane if "language" in job) for lane in lanes]
    kinds = [job[job.index("--method-kinds") + 1].split(",") for job in language]
    for method in run_paper.methods_for(config.preset.language):
        assert sum(method.kind in k for k in kinds) == 1, method.name
    assert config.jobs == 2
    full = run_paper.run_config(["--preset", "full"]).preset.language
    tuned = [m for m in run_paper.methods_for(full) if m.kind != "none" and m.opts.get("tune", True)]
    per_lane = [sum(m.kind in k for m in tuned) for k in kinds]
    assert per_lane[0] == per_lane[1] == len(tuned) // 2, per_lane
    # --methods runs in one process; so does a run of one part without language
    assert run_paper.job_lanes(run_paper.run_config(["--methods", "LoRA"])) == [[[]]]
    assert run_paper.job_lanes(run_paper.run_config(["--parts", "vision"])) == [[[]]]


def test_statistics_key_follows_the_calibration_settings_only():
    """A change of calibration batches calibrates again (runner and sweeps); a change of
    rates or steps reuses the statistics."""
    from types import SimpleNamespace

    base = torch.nn.Linear(1, 1)  # on the CPU: the keys carry no device
    part = SimpleNamespace(name="language", seed=1, base_fingerprint="abc", base=base)
    cfg = run_paper.PartConfig(calibration_batches=8)
    key = run_paper.statistics_key(cfg, 0, part)
    assert run_paper.statistics_key(replace(cfg, steps=300, lrs={"LoRA": 1.0}), 0, part) == key
    assert run_paper.statistics_key(replace(cfg, calibration_batches=16), 0, part) != key
    assert run_paper.statistics_key(cfg, 1, part) != key  # another split
    other = SimpleNamespace(name="language", seed=2, base_fingerprint="abc", base=base)
    assert run_paper.statistics_key(cfg, 0, other) != key  # another calibration order
    name = f"dev-language-{key}"  # the sweeps key their statistics by it too
    assert sweep.dev_statistics(part, cfg, 0, Path("unused"), {name: "kept"}, False) == ("kept", name)


def test_calibration_lock_lets_one_process_calibrate_at_a_time(tmp_path):
    """Two --jobs lanes reaching the same calibration: the second waits, then reads the file."""
    import threading
    import time

    path = tmp_path / "stats.safetensors"
    inside, order = threading.Event(), []

    def first():
        with run_paper.calibration_lock(path):
            inside.set()
            time.sleep(0.3)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with run_paper.calibration_lock(path):
        order.append("second in")
    thread.join()
    assert order == ["first out", "second in"]
    assert (tmp_path / "stats.safetensors.lock").is_file()


def test_default_jobs_uses_both_cores_on_cpu_only(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(run_paper.os, "cpu_count", lambda: 2)
    assert run_paper.default_jobs(None, "default", None) == 2
    assert run_paper.default_jobs(None, "default", "cuda") == 1
    assert run_paper.default_jobs(None, "paper", None) == 1
    assert run_paper.default_jobs(1, "default", None) == 1
    monkeypatch.setattr(run_paper.os, "cpu_count", lambda: 1)
    assert run_paper.default_jobs(None, "default", None) == 1
    monkeypatch.setattr(run_paper.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_paper.default_jobs(None, "default", None) == 1


def test_rerun_elsewhere_resumes_from_the_published_records(smoke, tmp_path):
    from validation.publish_results import publish  # noqa: PLC0415

    out, _ = smoke
    publish(out, tmp_path / "docs", readme=None)
    published = tmp_path / "docs" / "records" / out.name
    assert len(list((published / "methods").glob("*.json"))) == len(list((out / "methods").glob("*.json")))
    again = tmp_path / "again"  # a fresh machine: an empty results folder and the committed records
    done = _run(again, "--records-from", str(published))
    assert done.returncode == 0, done.stderr[-3000:]
    # language: 11 methods, vision: 12 methods x 2 targets; 3 seeds each: nothing tuned again
    assert done.stdout.count("already done") == 3 * (11 + 24)
    assert (again / "results.csv").read_text() == (out / "results.csv").read_text()


def test_records_from_copies_only_what_the_results_folder_lacks(tmp_path):
    source, out = tmp_path / "records", tmp_path / "out"
    (source / "methods").mkdir(parents=True)
    (out / "methods").mkdir(parents=True)
    (source / "methods" / "language__seed0__LoRA_1.0__abc.json").write_text('{"new": 1}')
    (source / "methods" / "language__seed1__LoRA_1.0__abc.json").write_text('{"theirs": 1}')
    (out / "methods" / "language__seed1__LoRA_1.0__abc.json").write_text('{"ours": 1}')
    assert run_paper.copy_method_records((source,), out) == 1
    assert (out / "methods" / "language__seed1__LoRA_1.0__abc.json").read_text() == '{"ours": 1}'
    assert run_paper.copy_method_records((source / "methods",), out) == 0  # the folder itself too
    assert not list((out / "methods").glob(".*partial"))
    with pytest.raises(SystemExit, match=r"--records-from: .*missing is not a folder"):
        run_paper.copy_method_records((tmp_path / "missing",), out)


def test_publish_fills_the_marked_blocks_from_the_run(tmp_path):
    from validation.publish_results import publish, replace_block

    assert replace_block("no markers", "default", "x") is None
    run = tmp_path / "default"
    run.mkdir()
    (run / "results.md").write_text("table ![p](plot.png)")
    (run / "results.csv").write_text("a,b\n")
    (run / "plot.png").write_bytes(b"png")
    (run / "summary.md").write_text("- Retain 0.8: the paper's ordering HOLDS on vision.")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:default:start -->\nold\n<!-- results:default:end -->\ntail\n")
    dest = tmp_path / "docs"
    dest.mkdir()
    (dest / "index.md").write_text("<!-- results:full:start -->\nkeep\n<!-- results:full:end -->\n")
    (run / "methods").mkdir()
    (run / "methods" / "language__seed0__LoRA_1.0__abc.json").write_text("{}")
    page = publish(run, dest, readme)
    assert page.read_text() == "table ![p](default-plot.png)"
    assert (dest / "records" / "default" / "methods" / "language__seed0__LoRA_1.0__abc.json").is_file()
    text = readme.read_text()
    assert "old" not in text and "HOLDS on vision" in text and text.endswith("tail\n")
    assert "keep" in (dest / "index.md").read_text()  # another preset's block is left alone


def test_publish_records_only_saves_an_unfinished_runs_records(tmp_path):
    from validation.publish_results import publish, publish_records

    run = tmp_path / "full"
    (run / "methods").mkdir(parents=True)
    (run / "methods" / "language__seed0__LoRA_1.0__abc.json").write_text('{"done": 1}')
    with pytest.raises(SystemExit, match=r"no results\.md"):
        publish(run, tmp_path / "docs", readme=None)  # not finished: no page to publish
    assert publish_records(run, tmp_path / "docs") == 1
    saved = tmp_path / "docs" / "records" / "full" / "methods"
    assert [p.name for p in saved.iterdir()] == ["language__seed0__LoRA_1.0__abc.json"]
    assert not (tmp_path / "docs" / "full.md").exists()
    # a rerun elsewhere starts from them
    assert run_paper.copy_method_records((saved.parent,), tmp_path / "again") == 1
    with pytest.raises(SystemExit, match="no methods/ folder"):
        publish_records(tmp_path / "empty", tmp_path / "docs")


def test_sweep_scores_language_by_answer_nll_and_vision_by_accuracy():
    rec = {"correct": {"a": [1, 0], "b": [1, 1]},
           "metrics": {"answer_nll": {"a": [2.0, 4.0], "b": [1.0, 1.0]}}}
    score, acc = sweep.dev_score("language", rec)
    assert score == pytest.approx(-(3.0 + 1.0) / 2) and acc == pytest.approx(0.75)
    score, acc = sweep.dev_score("vision", rec)
    assert score == acc == pytest.approx(0.75)


def test_loss_terms_give_calibrate_the_per_example_and_per_token_scale():
    """Vision losses average over images (not the 197 patch rows each layer sees); a causal
    LM's over the shifted labels that are not -100 (DESIGN: Cg on the per-term scale)."""
    import torch  # noqa: PLC0415

    from validation.parts import Part  # noqa: PLC0415

    images = {"pixel_values": torch.zeros(5, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 3, 4])}
    assert Part.loss_terms(None, images) == 5.0
    labels = torch.tensor([[1, 2, 3, -100], [-100, 5, -100, -100]])
    text = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    assert Part.loss_terms(None, text) == 3.0  # shifted: [2, 3, -100] and [5, -100, -100]


def test_runner_calibrates_with_the_parts_loss_terms(monkeypatch, tmp_path):
    import validation.run_paper as rp  # noqa: PLC0415

    seen = {}

    class FakeStats:
        def save(self, path):
            seen["saved"] = path

    def fake_calibrate(model, batches, loss, **kw):
        seen.update(kw)
        return FakeStats()

    class FakePart:
        name = "p"
        base = None
        calibration_batches = ({"labels": None},)

        def loss(self, model, batch):
            return 0.0

        def loss_terms(self, batch):
            return 7.0

    part = FakePart()
    monkeypatch.setattr(rp, "calibrate", fake_calibrate)
    rp.statistics_for(part, tmp_path, "k", progress=False)
    assert seen["grad_scale"] == part.loss_terms


def test_record_key_depends_on_what_the_method_uses_only():
    """A method's saved record survives other families' new rates or tau (a later sweep),
    and not a change of its own rate, of its own options or of the shared tuning settings."""
    from validation.methods import Method

    cfg = run_paper.PartConfig(lrs={f: 1e-3 for f in run_paper.FAMILIES}, lr_head=1e-2,
                               task_fraction=0.25)
    lora = Method("LoRA@1.0", "LoRA", "lora")
    jactus = Method("JACTUS@0.8", "JACTUS", "jactus", 0.8, (("task_fraction", 0.25),))

    def key(c, m, seed=0):
        return run_paper.record_key(c, m, 0, seed, "language", None)

    other_family = replace(cfg, lrs={**cfg.lrs, "JACTUS": 3e-4}, task_fraction=0.0,
                           retains=(0.8, 0.9), untuned_rows=True)
    assert key(other_family, lora) == key(cfg, lora)
    assert key(replace(cfg, lrs={**cfg.lrs, "LoRA": 3e-4}), lora) != key(cfg, lora)
    assert key(replace(cfg, steps=cfg.steps + 1), lora) != key(cfg, lora)
    assert key(cfg, lora, seed=1) != key(cfg, lora)
    assert key(other_family, jactus) != key(cfg, jactus)  # its own rate changed
    retau = Method("JACTUS@0.8", "JACTUS", "jactus", 0.8, (("task_fraction", 0.0),))
    assert key(cfg, retau) != key(cfg, jactus)  # tau travels in the method's options
    untuned = Method("JACTUS@0.8 untuned", "untuned: JACTUS", "jactus", 0.8,
                     (("task_fraction", 0.25), ("tune", False)))
    assert key(other_family, untuned) == key(cfg, untuned)  # no rate enters an untuned row


def test_accuracy_plot_styles_tell_every_family_apart():
    """12 families (the full preset's vision plot): no two tuned ones share a colour; an untuned
    row takes its family's colour, dashed and hollow, so the legend pairs them."""
    families = ["DoRA", "JACTUS", "LoRA", "SVD+LoRA", "SVD-LLM+LoRA", "base",
                "ablation: gradient directions", "ablation: tau=0", "ablation: uniform ranks",
                "ablation: no grad whitening", "untuned: JACTUS", "untuned: SVD-LLM+LoRA"]
    palette = [f"C{i}" for i in range(20)]
    styles = family_styles(families, palette)
    tuned = [f for f in families if not f.startswith("untuned: ")]
    assert len({styles[f]["color"] for f in tuned}) == len(tuned)
    for base in ("JACTUS", "SVD-LLM+LoRA"):
        assert styles[f"untuned: {base}"]["color"] == styles[base]["color"]
        assert styles[f"untuned: {base}"]["linestyle"] == "--" != styles[base]["linestyle"]
        assert styles[f"untuned: {base}"]["markerfacecolor"] == "none"


def test_a_rate_whose_training_diverges_scores_below_every_rate_and_the_sweep_goes_on(
        tmp_path, monkeypatch):
    run_method = run_paper.run_method

    def diverging_at_high_rates(part, method, cfg, *a, **k):
        if cfg.lrs["LoRA"] >= 1e-2 and part.seed == 1:
            msg = "non-finite training loss at step 1 (test); lower the learning rate"
            raise FloatingPointError(msg)
        return run_method(part, method, cfg, *a, **k)

    monkeypatch.setattr(run_paper, "run_method", diverging_at_high_rates)
    settings, page = tmp_path / "settings.json", tmp_path / "page.md"
    settings.write_text(json.dumps({"language": {"task_fraction": 0.0}}))
    chosen = sweep.main(["--part", "language", "--preset", "smoke", "--lrs", "1e-3", "1e-2",
                         "--families", "LoRA", "--out", str(tmp_path / "out"), "--page", str(page),
                         "--settings", str(settings), "--no-progress"])
    assert chosen["lr"]["LoRA"] == 1e-3  # one diverged order sinks the rate
    done = json.loads((tmp_path / "out" / "sweep.json").read_text())
    diverged = [v for v in done.values() if v["score"] == -float("inf")]
    assert len(diverged) == 1 and diverged[0]["lr"] == 1e-2 and diverged[0]["order"] == 1
    assert all(np.isfinite(v["score"]) for v in done.values() if v not in diverged)
    text = page.read_text()
    assert "| diverged |" in text and "next 0.01, whose training diverged" in text
    assert sweep.mean_sd_n([-1.0, -float("inf")]) == (-float("inf"), 0.0, 2)
    assert sweep.mean_sd_n([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)


def test_tau_sweep_reads_a_rate_sweeps_jactus_records_as_its_own(tmp_path, capsys, monkeypatch):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"language": {"lr": {f: 1e-3 for f in run_paper.FAMILIES},
                                                 "task_fraction": 0.25}}))
    common = ["--part", "language", "--preset", "smoke", "--settings", str(settings), "--no-progress"]
    rates = tmp_path / "rates"
    sweep.main([*common, "--lrs", "1e-3", "--families", "JACTUS,LoRA", "--out", str(rates),
                "--page", str(tmp_path / "rates.md")])
    rate_records = json.loads((rates / "sweep.json").read_text())
    # the same model tuned by the tau sweep itself, in a folder of its own
    own = tmp_path / "own"
    sweep_tau.main([*common, "--task-fractions", "0.25", "--lrs", "1e-3", "--out", str(own),
                    "--page", str(tmp_path / "own.md")])
    tuned = json.loads((own / "sweep.json").read_text())
    capsys.readouterr()

    def no_tuning(*_args, **_kwargs):
        raise AssertionError("tuned a model the learning-rate sweep had recorded")

    monkeypatch.setattr(sweep_tau, "dev_run", no_tuning)
    read = tmp_path / "read"
    entry = sweep_tau.main([*common, "--task-fractions", "0.25", "--lrs", "1e-3", "--out", str(read),
                            "--page", str(tmp_path / "read.md"), "--merge-from", str(rates)])
    assert "--merge-from: 3 records added" in capsys.readouterr().out
    done = json.loads((read / "sweep.json").read_text())
    assert set(done) == set(tuned)  # JACTUS's three orders under the tau sweep's labels; no LoRA
    assert {k: v["score"] for k, v in done.items()} == {k: v["score"] for k, v in tuned.items()}
    assert all("family" not in v for v in done.values())
    jactus = sorted(v["score"] for v in rate_records.values() if v["family"] == "JACTUS")
    assert sorted(v["score"] for v in done.values()) == jactus
    assert entry["task_fraction"] == 0.25 and entry["lr"]["JACTUS"] == 1e-3
    assert "not tuned again here" in (tmp_path / "read.md").read_text()
    assert "not tuned again here" not in (tmp_path / "own.md").read_text()
    assert sweep_tau.tau_record("x", {"family": "LoRA", "lr": 1e-3}) is None
    assert sweep_tau.tau_record("x", {"family": "JACTUS", "lr": 1e-3}) is None  # no tau said
    with pytest.raises(SystemExit, match="steps=5"):
        sweep_tau.tau_record("JACTUS lr=0.001", {"family": "JACTUS", "lr": 1e-3, "steps": 5,
                                                  "task_fraction": 0.0})
