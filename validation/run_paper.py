"""Reproduce the JACTUS paper's comparison: JACTUS vs compress-then-finetune vs LoRA/DoRA.

Usage
-----
``python validation/run_paper.py``                     the default (offline, CPU, 3 seeds, 31 min on 2 cores)
``python -m validation.run_paper``                      the same, as a module
``python validation/run_paper.py --preset full``       language: 300 steps, 2,283 tune items, 100 test items per task
``python validation/run_paper.py --preset smoke``      every option on tiny models, minutes (CI)
``torchrun --nproc_per_node 8 validation/run_paper.py --preset paper --vit-checkpoint ... ``
                                                         paper scale (see ``--help`` and docs)

Each method starts from the same base model and is tuned for the same steps
on the same data in the same order; only the learning rate differs between
method families, each chosen on dev items (never test items) by
``validation/sweep.py`` and read from ``validation/tuned_settings.json``
(``validation/tuned_settings-<preset>.json`` for a preset swept in its own
configuration: :func:`settings_for`); a new head trains at one rate for
every method. Every preset runs several seeds (``--seeds``): each seed sets
the data order and the initialisation
(LoRA adapters, the new head, and the pretrained ViT, whose seed is the
run's seed and whose weights' fingerprint is recorded). Tables show the mean
and sd over seeds; paired comparisons pool the items of every seed. Results
go to ``--out`` (default ``results/<preset>``): ``results.json``,
``results.csv``, ``results.md``, ``summary.md`` (the verdict on the paper's
ordering, for the README) and PNG plots. Finished methods are kept in
``methods/`` and skipped on a rerun with the same settings, so an
interrupted run resumes; a method killed while tuning resumes from its last
checkpoint in ``checkpoints/`` (saved every 5 minutes, removed once its
record is written), bit-identical to an uninterrupted run. ``--records-from
DIR`` first copies the method records another machine made (such as the
ones ``validation/publish_results.py`` commits in
``docs/results/records/<run>``): a record's file name holds the key of
every setting its result depends on, so only the methods whose settings
changed run again. Each record also says where it was made (``machine``:
the CPU model and vector extensions, torch, threads, device), which its
key does not hold. ``--save-models DIR`` writes every tuned model
(merged, safetensors, with its tokenizer and config).

On a CPU with two or more cores the default, full and smoke presets run as
two processes side by side (``--jobs 2``, the default there; :func:`run_jobs`):
one runs the language rows of JACTUS and DoRA, the other the base row, LoRA,
SVD-LLM+LoRA and then the vision part, each on one thread (:func:`job_lanes`);
this process then reads their records and writes the tables.
``--jobs 1`` runs everything in this process.

The command line is read once, by :func:`run_config`, into a
:class:`RunConfig` (the preset with its overrides applied, the output
folder, the method filter, the paper preset's local inputs); everything
after that takes the fields it needs, never the argparse namespace. Every
model and data set is read from a local folder (``local_files_only``), so
no run touches the network.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from jactus_linalg import DEFAULT_DAMPING, DEFAULT_TASK_FRACTION
from jactus_linalg.torch import CalibrationStats, calibrate
from validation.bench_machine import cpu_model, cpu_vector_flags
from validation.methods import (
    Method,
    build_method,
    lr_family,
    method_grid,
    prepare_method,
    reseed_adapters,
    save_tuned,
)
from validation.report import (
    ResultRow,
    bootstrap_macro_ci,
    claim_lines,
    macro_average,
    metrics_table,
    paired_comparison,
    plot_accuracy_vs_retain,
    plot_layer_profile,
    plot_predicted_vs_measured,
    seed_table,
    summarize,
    write_results,
    write_text_atomic,
)
from validation.train import is_main_process, tune

PAPER_REPORTED = {
    "vision": {"JACTUS@0.8": 89.2, "DoRA@1.0": 87.9},
    "language": {"JACTUS@0.8": 80.9, "DoRA@1.0": 79.7},
}

#: Learning rates chosen by ``validation/sweep.py`` on dev items, per part, for the default
#: preset; another preset's own choices go to :func:`preset_settings_file`.
SETTINGS_FILE = Path(__file__).resolve().with_name("tuned_settings.json")


@dataclass
class PartConfig:
    """Settings of one part (everything that changes a result is in here)."""

    enabled: bool = True
    model: str = "default"  # "smollm2" | "tiny" | "fmnist-vit" | "tiny-vit" | "paper"
    n_tune: int = 32
    n_test: int = 40
    n_dev: int = 0  # dev items (neither tune nor test), scored by the sweep only
    batch_size: int = 8
    max_length: int = 96
    eval_batch_size: int = 32
    calibration_batches: int = 16
    steps: int = 30
    lrs: dict = field(default_factory=dict)  # family -> lr; empty: from SETTINGS_FILE
    lr_head: float | None = None  # the new head's rate, every method (None: SETTINGS_FILE)
    lora_rank: int = 8
    task_fraction: float | None = None  # None: the sweep's choice (SETTINGS_FILE), else the package default
    damping: float = DEFAULT_DAMPING
    retains: tuple = (0.8,)
    targets: tuple = ("digits",)  # vision targets (validation.vision.TARGETS)
    ablations: bool = False
    svd_ctf: bool = False
    base_row: bool = True
    probe_steps: int = 0
    probe_lr: float = 1e-2
    compress_dtype: str | None = None  # decomposition dtype; statistics stay float64
    threads: int | None = None  # torch CPU threads for this part (None: leave as is)
    untuned_rows: bool = False  # also evaluate JACTUS and SVD-LLM+LoRA right after compression


@dataclass
class Preset:
    name: str
    language: PartConfig
    vision: PartConfig
    seeds: tuple = (0, 1, 2)  # data order and initialisation, one run each
    split_seed: int = 0  # which items are tune / test / dev (the same for every seed)
    notes: list[str] = field(default_factory=list)


def presets() -> dict[str, Preset]:
    # sizes: docs/results/index.md ("Reproducing under the protocol") gives the timings
    # behind them; n_dev items (neither tune nor test) are reserved here so that the
    # sweep (validation/sweep.py) tunes on exactly these tune items, and only it scores them
    default = Preset(
        "default",
        language=PartConfig(model="smollm2", n_tune=32, n_test=16, n_dev=16, steps=10,
                            calibration_batches=16, compress_dtype="float32",
                            retains=(0.8, 0.9), untuned_rows=True),
        vision=PartConfig(model="fmnist-vit", n_tune=500, n_test=500, n_dev=200, batch_size=32,
                          # steps: chosen on dev items in rounds (docs/results/index.md): at the
                          # rates chosen at 600 steps, 600 is the best mean dev accuracy over
                          # families of 300/600/1200 (docs/results/sweep-vision-steps.md)
                          steps=600, calibration_batches=8, retains=(0.8, 0.9),
                          targets=("digits", "fmnist-tops"), base_row=True, probe_steps=100,
                          untuned_rows=True),
    )
    full = replace(
        default, name="full",
        language=replace(default.language, n_tune=300, n_test=100, steps=300,
                         calibration_batches=16),
        vision=replace(default.vision, retains=(0.6, 0.7, 0.8, 0.9), ablations=True,
                       svd_ctf=True),
    )
    smoke = Preset(
        "smoke",
        # every option of the default and full presets, on tiny models, in a few minutes:
        # language covers retain 0.9 and the lm-eval metrics, vision two targets and the ablations
        language=PartConfig(model="tiny", n_tune=4, n_test=3, n_dev=2, batch_size=8, max_length=48,
                            eval_batch_size=16, calibration_batches=2, steps=2, lora_rank=2,
                            retains=(0.8, 0.9), untuned_rows=True),
        vision=PartConfig(model="tiny-vit", n_tune=64, n_test=64, n_dev=16, batch_size=32,
                          calibration_batches=1, steps=2, lora_rank=2, retains=(0.8,),
                          targets=("digits", "digits-shifted"), ablations=True, svd_ctf=True,
                          probe_steps=2, untuned_rows=True),
    )
    paper = Preset(
        "paper",
        language=PartConfig(model="paper", n_tune=0, n_test=0, batch_size=16, max_length=256,
                            eval_batch_size=32, calibration_batches=64, steps=3 * 170_000 // 16,
                            lrs={f: 2e-4 for f in FAMILIES}, lora_rank=32,
                            task_fraction=DEFAULT_TASK_FRACTION),
        vision=PartConfig(model="paper", n_tune=0, n_test=0, batch_size=64,
                          calibration_batches=32, steps=5000, lrs={f: 1e-3 for f in FAMILIES},
                          lr_head=1e-3, lora_rank=16, probe_steps=500,
                          task_fraction=DEFAULT_TASK_FRACTION),
    )
    return {p.name: p for p in (default, full, smoke, paper)}


FAMILIES = ("JACTUS", "SVD-LLM+LoRA", "LoRA", "DoRA")


def tuned_settings(path: Path = SETTINGS_FILE) -> dict:
    """The learning rates the sweep chose (``{part: {"lr": {family: lr}, "lr_head": ..., ...}}``)."""
    if not path.is_file():
        msg = f"{path} is missing: run validation/sweep.py to choose the learning rates"
        raise SystemExit(msg)
    return json.loads(path.read_text())


#: The presets whose sweeps' choices the runner reads (:func:`preset_settings_file`); a sweep of
#: another preset (smoke: a check of the machinery) writes into its own folder only.
SWEPT_PRESETS = ("default", "full")


def preset_settings_file(preset: str) -> Path | None:
    """The file the sweeps write ``preset``'s tuned settings to, and the runner reads.

    ``validation/tuned_settings.json`` for the default preset,
    ``validation/tuned_settings-<preset>.json`` for the other presets of
    :data:`SWEPT_PRESETS` (the full preset, tuned in its own configuration,
    keeps its own rates beside the default preset's); None for the rest.
    """
    if preset == "default":
        return SETTINGS_FILE
    return SETTINGS_FILE.with_name(f"tuned_settings-{preset}.json") if preset in SWEPT_PRESETS \
        else None


def settings_for(preset: str, part: str) -> Path:
    """The file ``preset``'s ``part`` reads its tuned settings from.

    The preset's own file (:func:`preset_settings_file`) when its entry for
    ``part`` is complete (a rate for every family and the head's,
    :func:`complete_entry`: a sweep of some families only does not make
    one); else the default preset's file, whose rates were chosen in the
    default preset's configuration: the tables say which
    (:func:`settings_source`).
    """
    own = preset_settings_file(preset)
    if own is not None and own.is_file() and complete_entry(tuned_settings(own).get(part)):
        return own
    return SETTINGS_FILE


def complete_entry(entry: dict | None) -> bool:
    """Whether a settings entry has a rate for every family (:data:`FAMILIES`) and the head's."""
    return (entry is not None and set(FAMILIES) <= set(entry.get("lr", {}))
            and entry.get("lr_head") is not None)


def sweep_settings_files(settings: Path | None, preset: str, part: str,
                         out: Path) -> tuple[Path, Path]:
    """Where a sweep of ``preset``'s ``part`` reads its settings and where it writes its choice.

    ``settings`` (a sweep's ``--settings``) is both when given. Otherwise
    the sweep reads what the runner would read (:func:`settings_for`: the
    preset's own entry, or the default preset's until it has one) and
    writes to the preset's own file (:func:`preset_settings_file`), or, for
    a preset outside :data:`SWEPT_PRESETS`, to ``settings.json`` in its
    folder ``out`` (which no run reads).
    """
    if settings is not None:
        return settings, settings
    own = preset_settings_file(preset)
    return settings_for(preset, part), own if own is not None else out / "settings.json"


def with_learning_rates(part: str, cfg: PartConfig, path: Path = SETTINGS_FILE) -> PartConfig:
    """``cfg`` with every family's rate, the head's rate and tau filled in from the sweep's file.

    Rates set in ``cfg`` (``lrs``, ``lr_head``) and a set ``task_fraction``
    win; the file fills the rest (``task_fraction``: the part's entry written
    by ``validation/sweep_tau.py``, else the package default).
    """
    entry = tuned_settings(path).get(part) if path.is_file() else None
    if cfg.task_fraction is None:
        tau = (entry or {}).get("task_fraction", DEFAULT_TASK_FRACTION)
        cfg = replace(cfg, task_fraction=float(tau))
    if complete_entry({"lr": cfg.lrs, "lr_head": cfg.lr_head}):
        return cfg
    chosen = entry if entry is not None else tuned_settings(path).get(part)
    if chosen is None:
        msg = f"{path} has no learning rates for part {part!r}: run validation/sweep.py --part {part}"
        raise SystemExit(msg)
    lrs = {**chosen["lr"], **cfg.lrs}
    missing = set(FAMILIES) - set(lrs)
    if missing:
        msg = f"{path}: part {part!r} lacks a learning rate for {sorted(missing)}"
        raise SystemExit(msg)
    head = cfg.lr_head if cfg.lr_head is not None else chosen["lr_head"]
    return replace(cfg, lrs=lrs, lr_head=head)


@dataclass(frozen=True)
class PaperInputs:
    """Local checkpoints and data of ``--preset paper`` (unused by the other presets)."""

    vit_checkpoint: Path | None = None
    vision_data: Path | None = None
    vision_datasets: tuple[str, ...] = ()  # empty: every dataset of paper_data.VISION_DATASETS
    llama_checkpoint: Path | None = None
    commonsense_train: Path | None = None
    commonsense_test: Path | None = None
    device: str | None = None  # None: cuda when available
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class RunConfig:
    """One run of the runner, built once from the command line by :func:`run_config`."""

    preset: Preset  # with the command-line overrides applied
    out: Path
    save_models: Path | None = None  # write every tuned model here
    records_from: tuple[Path, ...] = ()  # copy the method records of these folders first
    method_filter: tuple[str, ...] = ()  # run methods whose name contains one of these (empty: all)
    method_kinds: tuple[str, ...] = ()  # run methods of these kinds only (empty: all); --jobs lanes
    jobs: int = 1  # processes side by side (run_jobs); 1: this process runs everything
    pretrain_only: bool = False  # build the vision part's pretrained ViTs, then stop; --jobs lanes
    threads: int | None = None  # torch CPU threads (None: each part's own setting)
    progress: bool = True
    paper: PaperInputs = field(default_factory=PaperInputs)
    command: str = "python validation/run_paper.py"


# ----------------------------------------------------------------------------- parts


def build_language(cfg: PartConfig, preset: Preset, config: RunConfig,
                   evaluate_on: str = "test") -> dict[str, list]:
    """``{"language": [one part per seed]}``; the parts share one base model."""
    from validation.parts import LanguagePart  # noqa: PLC0415

    if cfg.model == "paper":
        from validation.paper_data import paper_language  # noqa: PLC0415

        parts = []
        for seed in preset.seeds:
            part = paper_language(cfg, seed, config.paper)
            part.seed = seed
            parts.append(part)
        return {"language": parts}
    if cfg.model == "smollm2":
        from validation.assets import load_smollm2  # noqa: PLC0415

        model, tokenizer = load_smollm2()
    elif cfg.model == "tiny":
        from validation.assets import tiny_llama  # noqa: PLC0415

        model, tokenizer = tiny_llama(seed=preset.split_seed)
    else:
        msg = f"unknown language model {cfg.model!r}"
        raise ValueError(msg)
    device = local_device(config)
    if device is not None:
        model = model.to(device)
    parts = [LanguagePart(
        model, tokenizer, n_tune=cfg.n_tune, n_test=cfg.n_test, seed=seed,
        batch_size=cfg.batch_size, max_length=cfg.max_length,
        calibration_batches=cfg.calibration_batches, eval_batch_size=cfg.eval_batch_size,
        settings=asdict(cfg), n_dev=cfg.n_dev, split_seed=preset.split_seed,
        evaluate_on=evaluate_on,
    ) for seed in preset.seeds]
    for part in parts:
        part.base_shared = True  # one base model, one calibration: seeds share compressions
    return {"language": parts}


def local_device(config: RunConfig) -> torch.device | None:
    """The device ``--device`` puts the default, full and smoke presets' language part on.

    None (the part stays on the CPU) unless ``--device`` names another
    device. The records, statistics and sweep records made there carry the
    device in their keys, so they never mix with the CPU's; the vision
    part of these presets stays on the CPU (its ViTs are pretrained there,
    checked by their fingerprints).
    """
    name = config.paper.device
    if name is None or torch.device(name).type == "cpu":
        return None
    return torch.device(name)


def pretrained_vision_model(cfg: PartConfig, seed: int, progress: bool):
    """The pretrained ViT of ``seed`` (its seed is the run's seed) and its weights' fingerprint.

    Logs the fingerprint and the seconds it took (pretraining, or reading the cache).
    """
    from validation import vision  # noqa: PLC0415

    start = time.perf_counter()
    if cfg.model == "fmnist-vit":
        model = vision.pretrained_vit(seed=seed, progress=progress,
                                      classes=vision.PRETRAIN_CLASSES)
    elif cfg.model == "tiny-vit":
        model = vision.tiny_pretrained_vit(seed=seed, epochs=1)
    else:
        msg = f"unknown vision model {cfg.model!r}"
        raise ValueError(msg)
    fingerprint = vision.weights_fingerprint(model)
    log(f"[vision] seed {seed}: pretrained ViT fingerprint {fingerprint} "
        f"({time.perf_counter() - start:.0f} s)")
    return model, fingerprint


def build_vision(cfg: PartConfig, preset: Preset, config: RunConfig,
                 evaluate_on: str = "test") -> dict[str, list]:
    """``{"vision/<target>": [one part per seed]}``: each seed pretrains its own ViT."""
    from validation.parts import VisionPart  # noqa: PLC0415

    if cfg.model == "paper":
        from validation.paper_data import paper_vision_parts  # noqa: PLC0415

        grouped: dict[str, list] = {}
        for seed in preset.seeds:
            for part in paper_vision_parts(cfg, seed, config.paper, progress=config.progress):
                grouped.setdefault(part.name, []).append(part)
        return grouped
    from validation import vision  # noqa: PLC0415

    if local_device(config) is not None:
        log(f"--device {config.paper.device}: the vision part of the {preset.name} preset stays "
            "on the CPU (only its language part moves)")
    tasks = {t: vision.vision_task(t, preset.split_seed, cfg.n_tune, cfg.n_test, cfg.n_dev)
             for t in cfg.targets}
    if evaluate_on == "dev":
        tasks = {t: task.with_dev_as_test() for t, task in tasks.items()}
    grouped = {f"vision/{t}": [] for t in cfg.targets}
    for seed in preset.seeds:
        pretrained, print_ = pretrained_vision_model(cfg, seed, config.progress)
        for target, task in tasks.items():
            model = vision.replace_head(copy.deepcopy(pretrained), num_labels=task.num_labels,
                                        seed=seed)
            part = VisionPart(
                model, task, task_name=target, seed=seed, batch_size=cfg.batch_size,
                calibration_batches=cfg.calibration_batches, probe_steps=cfg.probe_steps,
                probe_lr=cfg.probe_lr, settings=asdict(cfg), progress=config.progress,
                name=f"vision/{target}",
            )
            part.base_fingerprint = print_
            grouped[f"vision/{target}"].append(part)
    return grouped


# ----------------------------------------------------------------------------- running


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_json(path: Path, payload) -> None:
    """Create or replace the JSON file ``path`` atomically."""
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))


def _hard_link(source: Path, target: Path) -> bool:
    """Hard-link ``target`` to ``source``; False where the file system cannot (then copy)."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def add_missing_files(sources: list[Path], into: Path, *, link: bool = False) -> list[Path]:
    """Put into ``into`` each of ``sources`` whose name it lacks; return the files added.

    Each is hard-linked (``link``; a copy across file systems) or copied to
    a temporary name, then renamed: a process that starts at the same time
    (a ``--jobs`` lane) never reads half a file.
    """
    added = []
    for source in sources:
        target = into / source.name
        if target.exists():
            continue
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        if not (link and _hard_link(source, partial)):
            shutil.copyfile(source, partial)
        partial.replace(target)
        added.append(target)
    return added


def log(message: str) -> None:
    """Print once per run: on the main process only under torchrun."""
    if is_main_process():
        print(message, flush=True)


def this_process_batches(batches: list) -> list:
    """Under torchrun, every N-th whole batch for this process (all of them otherwise).

    ``calibrate`` all-reduces its sums, so N processes over disjoint whole
    batches give the statistics of one process over all of them. With fewer
    batches than processes every process takes them all (the means agree).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(batches)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return list(batches[rank::world]) if len(batches) >= world else list(batches)


def calibration_seed(part) -> int:
    """The seed whose data order gave ``part``'s calibration batches."""
    return getattr(part, "calibration_seed", getattr(part, "seed", 0))


#: PartConfig fields the calibration statistics depend on (with the split, part and base)
STATISTICS_FIELDS = ("model", "n_tune", "n_test", "batch_size", "max_length",
                     "calibration_batches", "probe_steps", "probe_lr", "targets")


def statistics_key(cfg: PartConfig, split_seed: int, part) -> str:
    """The key of a part's calibration statistics: everything they depend on."""
    return fingerprint({"cfg": {k: v for k, v in asdict(cfg).items() if k in STATISTICS_FIELDS},
                        "split": split_seed, "part": part.name,
                        "calibration_seed": calibration_seed(part),
                        "base": getattr(part, "base_fingerprint", None),
                        **device_field(part)})


def part_device(part) -> str:
    """The device type the part's base model is on (``"cpu"``, ``"cuda"``)."""
    return next(part.base.parameters()).device.type


def off_cpu_device(part) -> str | None:
    """The device type of a part whose base model is off the CPU (``"cuda"``), else None."""
    device = part_device(part)
    return None if device == "cpu" else device


def device_field(part) -> dict:
    """``{"device": <type>}`` for a part off the CPU (:func:`off_cpu_device`), else empty.

    Empty on the CPU, so that the keys of CPU records and statistics are the
    ones they had before parts could move.
    """
    device = off_cpu_device(part)
    return {} if device is None else {"device": device}


def statistics_dtype(cfg: PartConfig) -> str | None:
    """The dtype calibration accumulates in: float64 (calibrate's CPU default) on every device,
    but the paper preset's (calibrate's CUDA default, float32, for a 7B model's memory)."""
    return None if cfg.model == "paper" else "float64"


def statistics_for(part, out: Path, key: str, progress: bool,
                   dtype: str | None = None) -> tuple[CalibrationStats, float]:
    """Calibrate the part's base model once; the file lets a rerun skip it."""
    path = out / f"stats-{part.name.replace('/', '-')}-{key}.safetensors"
    with calibration_lock(path):  # --jobs lanes: one calibrates, the other then reads the file
        if path.exists():
            return CalibrationStats.load(path), 0.0
        start = time.perf_counter()
        batches = this_process_batches(part.calibration_batches)
        stats = calibrate(part.base, batches, part.loss, progress=progress, total=len(batches),
                          grad_scale=part.loss_terms, dtype=dtype)
        elapsed = time.perf_counter() - start
        if is_main_process():
            stats.save(path)
    return stats, elapsed


@contextlib.contextmanager
def calibration_lock(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` (one process of a machine at a time).

    Under torchrun every rank calibrates its share of the batches together
    (the reductions need them all), so there no lock is taken.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _mean_loss(model, batches, loss_fn) -> float:
    """Mean per-token (language) or per-example (vision) loss on ``batches``."""
    from jactus_linalg.torch.measure import mean_token_loss  # noqa: PLC0415

    return mean_token_loss(model, batches, loss_fn)[0]


class SeedShare:
    """What seeds of one part can share: statistics, one compressed model, base losses, evaluations."""

    def __init__(self):
        self.stats: dict[str, CalibrationStats] = {}
        # (base, statistics, build signature) -> (BuiltMethod, measured dict), untrained; only
        # the current signature is kept (one compressed model per seed's base)
        self.built: dict[tuple, tuple] = {}
        self.base_loss: dict[int, float] = {}
        self.untuned: dict[tuple, dict] = {}
        # (base, statistics, plan signature) -> PreparedCompression: one decomposition per
        # seed's base serves every retain of a family; kept only for the plan signatures in
        # keep_plans (run_part: those of the methods still to run)
        self.prepared: dict[tuple, object] = {}
        self.keep_plans: set = set()

    def release_plans(self) -> None:
        """Drop the decompositions that no method still to run shares."""
        self.prepared = {k: v for k, v in self.prepared.items() if k[2] in self.keep_plans}


def run_method(part, method: Method, cfg: PartConfig, stats, seed: int, progress: bool,
               shared: SeedShare | None = None, stats_key: str = "",
               save_to: Path | None = None, checkpoint: Path | None = None) -> dict:
    """Build, tune (unless untuned) and evaluate one method on one seed's part.

    With ``checkpoint`` the tuning loop saves its state there every few
    minutes and resumes from it (:func:`validation.train.tune`); the
    record's ``wall_time_s`` then adds the tuning seconds of the killed
    earlier processes, and ``resumed_from_step`` says where it resumed.
    """
    shared = shared or SeedShare()
    start = time.perf_counter()
    tuned = method.kind != "none" and method.opts.get("tune", True)
    invariant = getattr(part, "base_shared", False)
    share_key = (id(part.base), stats_key, method.name)
    if not tuned and invariant and share_key in shared.untuned:
        # the same base, statistics and test items, no training: the same record
        rec = copy.deepcopy(shared.untuned[share_key])
        rec["copied_from_seed"] = rec.pop("seed")
        rec["seed"] = seed
        rec["wall_time_s"] = time.perf_counter() - start
        rec.pop("saved", None)
        return rec
    measured: dict = {}
    build_key = (id(part.base), stats_key, method.build_signature())
    reusable = method.kind in ("jactus", "ctf")
    if reusable and build_key in shared.built:
        cached, measured = shared.built[build_key]
        built = copy.copy(cached)
        built.model = copy.deepcopy(cached.model)
    else:
        signature = method.plan_signature()
        plan_key = (id(part.base), stats_key, signature)
        prepared = shared.prepared.get(plan_key)
        if prepared is None and signature is not None and signature in shared.keep_plans:
            # a later method (this family at another retain) decomposes the same base
            prepared = shared.prepared[plan_key] = prepare_method(
                method, part.base, stats, damping=cfg.damping, dtype=cfg.compress_dtype,
                progress=progress)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA / DoRA initialisation
            built = build_method(method, part.base, stats, head=part.head,
                                 lora_rank=cfg.lora_rank, damping=cfg.damping,
                                 dtype=cfg.compress_dtype, progress=progress, prepared=prepared)
        if built.report is not None:
            measured = _measured_rise(part, built, shared)
        if reusable:
            # an untuned row follows its tuned row: keep this compression for it (and,
            # with one base for every seed, for the other seeds)
            signature = method.build_signature()
            shared.built = {k: v for k, v in shared.built.items() if k[2] == signature}
            shared.built[build_key] = (built, measured)
            built = copy.copy(built)
            built.model = copy.deepcopy(shared.built[build_key][0].model)
    if method.kind == "ctf":
        reseed_adapters(built.model, seed)
    losses: list[float] = []
    resumed: dict = {}
    if tuned:
        lr = cfg.lrs[lr_family(method.kind)]
        result = tune(built.model, part.tune_batches, part.loss, steps=cfg.steps, lr=lr,
                      seed=seed, progress=progress, desc=f"{part.name}: {method.name}",
                      head=part.head, head_lr=cfg.lr_head, checkpoint=checkpoint)
        losses = result.losses
        if result.resumed_from_step is not None:
            resumed = {"resumed_from_step": result.resumed_from_step,
                       "earlier_wall_time_s": result.earlier_wall_time_s}
    metrics = part.evaluate_metrics(built.model, progress=progress)
    record = {
        "method": method.to_dict(),
        "seed": seed,
        "correct": {t: v.astype(int).tolist() for t, v in metrics["correct"].items()},
        "metrics": {m: {t: np.asarray(v).tolist() for t, v in per.items()}
                    for m, per in metrics.items() if m != "correct"},
        "lr": cfg.lrs.get(lr_family(method.kind)) if tuned else None,
        "lr_head": cfg.lr_head if tuned and part.head else None,
        "trainable_params": built.trainable_params if tuned else 0,
        "total_params": built.total_params,
        "retain_achieved": built.retain_achieved,
        "train_losses": losses,
        "wall_time_s": time.perf_counter() - start + resumed.get("earlier_wall_time_s", 0.0),
        "notes": built.notes,
        **measured,
        **resumed,
    }
    if built.report is not None:
        record["layers"] = [
            {"name": r.name, "shape": list(r.shape), "rank": r.rank,
             "predicted_loss_increase": r.predicted_loss_increase}
            for r in built.report.layers
        ]
    if save_to is not None and method.kind != "none":
        record["saved"] = {"path": str(save_to),
                           "format": save_tuned(built.model, method.kind, save_to,
                                                getattr(part, "tokenizer", None))}
    if not tuned and invariant:
        shared.untuned[share_key] = record
    del built
    return record


def record_machine(part) -> dict:
    """Where one method record was made: CPU model and vector extensions, torch, threads, device."""
    return {"cpu": cpu_model(), "vector_flags": list(cpu_vector_flags()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": part_device(part)}


def _measured_rise(part, built, shared: SeedShare) -> dict:
    """Predicted (report, nats) and measured rise of the mean loss on the calibration batches."""
    key = id(part.base)
    if key not in shared.base_loss:
        shared.base_loss[key] = _mean_loss(part.base, part.calibration_batches, part.loss)
    after = _mean_loss(built.model, part.calibration_batches, part.loss)
    return {"predicted_loss_increase": built.report.total_predicted_loss_increase,
            "calibration_loss_base": shared.base_loss[key],
            "calibration_loss_compressed": after,
            "measured_loss_increase": after - shared.base_loss[key]}


def _pooled(records_by_seed: dict, name: str, metric: str = "correct") -> dict | None:
    """Per task, the items of every seed one after another (None if a seed lacks ``name``)."""
    pooled: dict[str, list] = {}
    for recs in records_by_seed.values():
        rec = recs.get(name)
        if rec is None:
            return None
        values = rec["correct"] if metric == "correct" else rec.get("metrics", {}).get(metric)
        if values is None:
            return None
        for t, v in values.items():
            pooled.setdefault(t, []).extend(v)
    return {t: np.asarray(v) for t, v in pooled.items()}


def comparisons(records_by_seed: dict, seed: int = 0) -> list[dict]:
    """Paired comparisons of JACTUS against each other method, items pooled over seeds.

    Tuned JACTUS at a retain against every other tuned method at that
    retain, against LoRA/DoRA at 100%, and against itself untuned; the two
    untuned compressions against each other.
    """
    first = next(iter(records_by_seed.values()), {})
    methods = {name: rec["method"] for name, rec in first.items()}
    out = []
    for name, m in methods.items():
        family = m["family"]
        if family not in ("JACTUS", "untuned: JACTUS"):
            continue
        for other_name, o in methods.items():
            fam, same = o["family"], o["retain"] == m["retain"]
            if family == "untuned: JACTUS":
                if not (same and fam.startswith("untuned: ") and fam != family):
                    continue
            else:
                untuned_other = fam.startswith("untuned: ") and fam != "untuned: JACTUS"
                same_budget = same and fam != "JACTUS" and not untuned_other
                full = fam in ("LoRA", "DoRA")
                if not (same_budget or full):
                    continue
            a, b = _pooled(records_by_seed, name), _pooled(records_by_seed, other_name)
            if a is None or b is None:
                continue
            out.append({"a": name, "b": other_name, "seeds": len(records_by_seed),
                        **paired_comparison(a, b, seed=seed)})
    return out


def rows_from(part_name: str, records_by_seed: dict) -> list[ResultRow]:
    """One row per method, seed and task, plus each seed's macro average."""
    rows = []
    for seed, records in records_by_seed.items():
        for rec in records.values():
            m = rec["method"]
            correct = {t: np.asarray(v, bool) for t, v in rec["correct"].items()}
            settings = {"family": m["family"], "kind": m["kind"], **m["options"],
                        "lr": rec.get("lr"), "lr_head": rec.get("lr_head")}
            common = dict(
                part=part_name, method=m["name"], retain_target=m["retain"],
                retain_achieved=rec["retain_achieved"], trainable_params=rec["trainable_params"],
                total_params=rec["total_params"], seed=int(seed), wall_time_s=rec["wall_time_s"],
                settings=settings,
            )
            for task, v in correct.items():
                rows.append(ResultRow(task=task, accuracy=float(v.mean()), n_items=int(v.size),
                                      **common))
            lo, hi = bootstrap_macro_ci(correct, seed=int(seed))
            rows.append(ResultRow(task="average", accuracy=macro_average(correct),
                                  n_items=int(sum(v.size for v in correct.values())),
                                  ci_low=lo, ci_high=hi, **common))
    return rows


def combine_targets(group: str, records: dict[str, dict]) -> dict:
    """``{target part: {seed: {method: rec}}}`` -> ``{seed: {method: rec}}`` with one task per target.

    Per method the targets' ``correct`` and ``metrics`` are joined; trainable
    parameters and retain are averaged over targets; the predicted and
    measured loss rises stay per target in ``per_target``.
    """
    merged: dict = {}
    for part_name, by_seed in records.items():
        target = part_name.split("/", 1)[1] if "/" in part_name else part_name
        for seed, recs in by_seed.items():
            for name, rec in recs.items():
                m = merged.setdefault(seed, {}).setdefault(name, {
                    **{k: v for k, v in rec.items()
                       if k not in ("correct", "metrics", "layers", "machine")},
                    "correct": {}, "metrics": {}, "wall_time_s": 0.0, "per_target": {},
                    "machines": [],
                    "_n": 0, "_train": 0, "_retain": 0.0})
                m["correct"].update(rec["correct"])
                for metric, per in rec.get("metrics", {}).items():
                    m["metrics"].setdefault(metric, {}).update(per)
                m["wall_time_s"] += rec["wall_time_s"]
                m["machines"].append(rec.get("machine"))
                m["_n"] += 1
                m["_train"] += rec["trainable_params"]
                m["_retain"] += rec["retain_achieved"]
                m["per_target"][target] = {k: rec.get(k) for k in (
                    "predicted_loss_increase", "measured_loss_increase", "layers")}
    for recs in merged.values():
        for m in recs.values():
            n = m.pop("_n")
            m["trainable_params"] = m.pop("_train") // n
            m["retain_achieved"] = m.pop("_retain") / n
    return merged


def write_outputs(out: Path, preset: Preset, groups: dict, parts_info: dict,
                  command: str, timings: dict, wall_s: float | None = None) -> None:
    """``results.json/.csv/.md``, ``summary.md`` and the plots, from every finished group."""
    rows: list[ResultRow] = []
    comps: dict[str, list] = {}
    for part_name, by_seed in groups.items():
        rows.extend(rows_from(part_name, by_seed))
        comps[part_name] = comparisons(by_seed, preset.split_seed)
    extra = {
        "preset": preset.name,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available()},
        "settings": {k: asdict(getattr(preset, k)) for k in ("language", "vision")},
        "learning_rates": {k: settings_source(preset.name, k, getattr(preset, k))
                           for k in ("language", "vision")},
        "devices": {k: v.get("device", "cpu") for k, v in parts_info.items()},
        "seeds": list(preset.seeds),
        "split_seed": preset.split_seed,
        "splits": {k: v["splits"] for k, v in parts_info.items()},
        "pretrained_fingerprints": {k: v.get("fingerprints") for k, v in parts_info.items()
                                    if v.get("fingerprints")},
        "paired_comparisons": comps,
        "summary": {k: summarize(by_seed) for k, by_seed in groups.items()},
        "timings_s": timings,
        "wall_time_s": sum(timings.values()) if wall_s is None else wall_s,
        "recorded_time_s": recorded_seconds(groups),
        "record_machines": record_machines(groups),
        "paper_reported": PAPER_REPORTED,
    }
    write_results(out, rows, extra)
    md = [f"# JACTUS reproduction: preset `{preset.name}`", "",
          f"Command: `{command}`  ", f"Date: {extra['date']}  ",
          f"Machine: {extra['machine']['platform']}, {extra['machine']['cpus']} CPUs, "
          f"torch {extra['machine']['torch']}  ",
          f"Seeds: {', '.join(map(str, preset.seeds))} (data order and initialisation; "
          f"items split with seed {preset.split_seed})  ",
          f"Wall time: {extra['wall_time_s'] / 60:.1f} min (this invocation)  ",
          f"Method time: {extra['recorded_time_s'] / 3600:.2f} h (the sum of every method "
          "record's own tuning and evaluation time, records of earlier invocations included)  ",
          "Records made on: " + "; ".join(f"{name}: {n}" for name, n in
                                          extra["record_machines"].items()),
          ""]
    verdict: list[str] = []
    for part_name, by_seed in groups.items():
        info = parts_info[part_name]
        summary = extra["summary"][part_name]
        md += [f"## {part_name}", "", _rates_line(part_name, extra["learning_rates"], preset.name,
                                              getattr(preset, part_name.split("/")[0])), ""]
        md += [seed_table(summary, info["tasks"], without="boolq"), ""]
        if any(s.get("metrics") for s in summary.values()):
            md += [metrics_table(summary), ""]
        lines = claim_lines(part_name, summary, comps[part_name])
        verdict += [f"**{part_name}.**", "", *lines, ""]
        md += [*lines, ""]
        md += _comparison_lines(comps[part_name])
        md += _paper_lines(part_name, summary)
        _plots(out, part_name, rows, by_seed)
        md += [f"![accuracy vs retain](accuracy_vs_retain_{part_name}.png)", ""]
        if (out / f"predicted_vs_measured_{part_name}.png").exists():
            md += [f"![predicted vs measured loss rise](predicted_vs_measured_{part_name}.png)", ""]
        if (out / f"ranks_{part_name}.png").exists():
            md += [f"![ranks](ranks_{part_name}.png)",
                   f"![predicted loss](predicted_loss_{part_name}.png)", ""]
        if info.get("fingerprints"):
            md += ["Pretrained ViT per seed (SHA-256 of its weights, first 16 hex digits): "
                   + ", ".join(f"seed {s}: `{f}`" for s, f in info["fingerprints"].items()), ""]
    md += ["Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    write_text_atomic(out / "results.md", "\n".join(md))
    summary_md = [*summary_header(preset, extra, groups), *verdict]
    for part_name in groups:
        summary_md += [f"{part_name} (accuracy %, mean ± sd over seeds):", "",
                       seed_table(extra["summary"][part_name], parts_info[part_name]["tasks"],
                                  without="boolq"), ""]
    write_text_atomic(out / "summary.md", "\n".join(summary_md))


def summary_header(preset: Preset, extra: dict, groups: dict) -> list[str]:
    """The paragraphs above ``summary.md``'s verdict: the run, its times, where rates came from.

    The rates' paragraph is there only when a part read rates chosen in
    another preset's configuration, one that tunes differently
    (:func:`settings_source`).
    """
    machine = extra["machine"]
    moved = {part: d for part, d in extra.get("devices", {}).items() if d != "cpu"}
    where = "".join(f", {part} on {d}" for part, d in sorted(moved.items()))
    lines = [f"Preset `{preset.name}`, seeds {', '.join(map(str, preset.seeds))}, "
             f"{extra['date']}, on {machine['cpus']} CPUs ({machine['cpu']}){where}. "
             f"Command: `{extra['command']}`.", "",
             f"Time: {extra['wall_time_s'] / 60:.0f} min of wall time in this invocation; "
             f"{extra['recorded_time_s'] / 3600:.1f} h of method time, the sum of every "
             "record's own tuning and evaluation time (records read back from earlier "
             "invocations included).", ""]
    borrowed = [part for part in groups if part in extra["learning_rates"]
                and not extra["learning_rates"][part].get("same_configuration", True)]
    if borrowed:
        lines += ["Learning rates: " + "; ".join(
            f"the {part} rates were chosen in the {extra['learning_rates'][part]['tuned_for']} preset's "
            "configuration, not this one's" for part in borrowed)
            + f" ({no_own_entry(preset.name)}).", ""]
    return lines


def no_own_entry(preset: str) -> str:
    """Why a part of ``preset`` borrowed another preset's rates: its own file has no entry."""
    return f"no entry in validation/tuned_settings-{preset}.json"


def record_machines(groups: dict) -> dict[str, int]:
    """How many method records each machine made: ``{"<cpu> [<vector flags>]": n}``.

    A run resumed across sessions gathers records from several machines,
    and the results page's ``Machine`` line names only the last; records
    made before they said where (no ``machine`` field) count as
    ``"not recorded"``.
    """
    counts: dict[str, int] = {}
    for by_seed in groups.values():
        for records in by_seed.values():
            for rec in records.values():
                # a vision group's record joins its targets' (combine_targets)
                for machine in rec.get("machines", [rec.get("machine")]):
                    name = machine_label(machine)
                    counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def machine_label(machine: dict | None) -> str:
    """``"<cpu> [<vector flags>]"`` (and the device, off the CPU) of a record's ``machine``."""
    if not machine:
        return "not recorded"
    flags = ", ".join(machine["vector_flags"]) or "no flags read"
    device = machine.get("device", "cpu")
    return f"{machine['cpu']} [{flags}]" + ("" if device == "cpu" else f" {device}")


def recorded_seconds(groups: dict) -> float:
    """The sum of every method record's own ``wall_time_s`` (tuning and evaluation), in seconds.

    A run resumed from the records of earlier invocations reports its own
    wall time, which leaves their work out; this is the time of the models
    themselves, wherever and whenever they were made (a copied untuned row
    counts its few seconds only).
    """
    return float(sum(rec.get("wall_time_s", 0.0) for by_seed in groups.values()
                     for records in by_seed.values() for rec in records.values()))


def settings_source(preset: str, part: str, cfg: PartConfig | None = None) -> dict:
    """Where ``preset``'s ``part`` took its rates from: the entry's fields and the file's name.

    ``tuned_for`` is the preset whose configuration the rates were chosen
    in: ``preset`` itself, or ``"default"`` when ``preset`` has no entry of
    its own for the part (:func:`settings_for`). ``same_configuration``
    says whether the run's ``cfg`` tunes exactly as that preset's part does
    (:func:`tuning_configuration`): the full preset's vision part does, its
    language part (300 steps) does not.
    """
    known = presets().get(preset)
    if known is not None and sets_its_own_rates(getattr(known, part), part):
        return {}  # the paper preset: "set in the preset"
    path = settings_for(preset, part)
    try:
        chosen = tuned_settings(path).get(part, {})
    except SystemExit:
        return {}
    fields = {k: chosen.get(k) for k in ("lr", "lr_head", "source", "selected_by", "chosen_by_sweep")}
    tuned_for = preset if path == preset_settings_file(preset) else "default"
    same = tuned_for == preset or (cfg is not None and tuning_configuration(cfg) == (
        tuning_configuration(getattr(presets()[tuned_for], part))))
    return {**fields, "file": f"validation/{path.name}", "tuned_for": tuned_for,
            "same_configuration": same}


def sets_its_own_rates(cfg: PartConfig, part: str) -> bool:
    """Whether ``cfg`` sets every family's rate and, for vision (a new head), the head's.

    Such a part (the paper preset's) trains at none of the settings file's
    rates.
    """
    return set(FAMILIES) <= set(cfg.lrs) and (part == "language" or cfg.lr_head is not None)


def tuning_configuration(cfg: PartConfig) -> dict:
    """The settings a learning rate is chosen for: ``cfg`` without its rates and method selection.

    Two parts with the same tuning configuration train on the same items,
    for the same steps, at the same sizes, so a rate chosen for one is
    chosen for the other.
    """
    left_out = {*METHOD_SELECTION_FIELDS, "lrs", "lr_head", "enabled"}
    return {k: v for k, v in asdict(cfg).items() if k not in left_out}


def _rates_line(part: str, sources: dict, preset: str, cfg: PartConfig | None = None) -> str:
    """Where the part's rates came from, and the rates the run trained with (``cfg``'s).

    Without ``cfg``, the rates of the settings entry.
    """
    src = sources.get(part.split("/")[0], {})
    rates = dict(cfg.lrs) if cfg is not None else dict(src.get("lr") or {})
    head = cfg.lr_head if cfg is not None else src.get("lr_head")
    head = None if part.startswith("language") else head  # no new head there
    if not src:
        return ("Learning rates (set in the preset): "
                + ", ".join(f"{k} {v:g}" for k, v in rates.items())
                + (f", head {head:g}" if head else "") + ".")
    how = ("chosen by validation/sweep.py on dev items" if src.get("chosen_by_sweep")
           else "NOT yet chosen by the dev-item sweep protocol (pre-protocol defaults)")
    tuned_for = src.get("tuned_for", preset)
    if tuned_for != preset and src.get("same_configuration"):
        how += f" in the {tuned_for} preset's configuration, the same as this preset's"
    elif tuned_for != preset:
        how += f" in the {tuned_for} preset's configuration, NOT this preset's ({no_own_entry(preset)})"
    return (f"Learning rates ({how}; {src.get('source', '')}): "
            + ", ".join(f"{k} {v:g}" for k, v in rates.items())
            + (f", head {head:g}" if head else "") + ".")


def _comparison_lines(comps: list[dict]) -> list[str]:
    if not comps:
        return []
    lines = ["Paired comparisons on the same test items, pooled over seeds (difference of "
             "macro averages, 95% paired-bootstrap CI, exact McNemar p):", ""]
    for c in comps:
        lines.append(
            f"- {c['a']} - {c['b']}: {100 * c['difference']:+.1f} points "
            f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], p = {c['mcnemar_p']:.3g} "
            f"({c['only_a_right']} vs {c['only_b_right']} items right for one only, of "
            f"{c['n_items']} = items x {c.get('seeds', 1)} seeds)"
        )
    return [*lines, ""]


def _paper_lines(part: str, summary: dict) -> list[str]:
    reported = PAPER_REPORTED.get(part, {})
    lines = ["Paper (ViT-Base / Llama2-7B) vs this run (different model and data):", ""]
    for name, value in reported.items():
        mine = summary.get(name)
        here = "-" if mine is None else f"{100 * mine['mean']:.1f} ± {100 * mine['sd']:.1f}"
        lines.append(f"- {name}: paper {value:.1f}, here {here}")
    return [*lines, ""]


def _plots(out: Path, part: str, rows: list[ResultRow], by_seed: dict) -> None:
    plot_accuracy_vs_retain(rows, part, out / f"accuracy_vs_retain_{part}.png")
    points = predicted_measured_points(by_seed)
    if points:
        plot_predicted_vs_measured(points, part, out / f"predicted_vs_measured_{part}.png")
    records = next(iter(by_seed.values()), {})
    main = [r for r in records.values() if r["method"]["family"] == "JACTUS"]
    layered = [(r, lay) for r in main for lay in ([r.get("layers")] if r.get("layers") else
               [v.get("layers") for v in r.get("per_target", {}).values() if v.get("layers")][:1])]
    if not layered:
        return
    rec, layers = min(layered, key=lambda p: abs(p[0]["method"]["retain"] - 0.8))
    names = [lay["name"] for lay in layers]
    dense = [lay["rank"] is None for lay in layers]
    ranks = [min(lay["shape"]) if lay["rank"] is None else lay["rank"] for lay in layers]
    plot_layer_profile(names, ranks, dense, "rank (dense: min(m, n))",
                       f"{part}: ranks chosen by global allocation, {rec['method']['name']}",
                       out / f"ranks_{part}.png")
    plot_layer_profile(names, [lay["predicted_loss_increase"] for lay in layers], dense,
                       "predicted loss increase (nats)", f"{part}: 1/2 ||S_g^T dW S_x||^2 per "
                       f"layer, {rec['method']['name']}", out / f"predicted_loss_{part}.png",
                       log=True)


def predicted_measured_points(by_seed: dict) -> list[dict]:
    """(method, retain, target, seed, predicted, measured) for every compressed record."""
    points = []
    for seed, recs in by_seed.items():
        for rec in recs.values():
            if rec.get("copied_from_seed") is not None:
                continue
            per = rec.get("per_target") or {"": rec}
            for target, v in per.items():
                if v.get("predicted_loss_increase") is None or v.get("measured_loss_increase") is None:
                    continue
                points.append({"method": rec["method"]["family"].removeprefix("untuned: "),
                               "retain": rec["method"]["retain"], "target": target,
                               "seed": seed, "predicted": v["predicted_loss_increase"],
                               "measured": v["measured_loss_increase"]})
    unique = {(p["method"], p["retain"], p["target"], p["seed"]): p for p in points}
    return list(unique.values())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python validation/run_paper.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets()), default="default")
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/<preset>)")
    p.add_argument("--parts", default="language,vision", help="comma-separated parts to run")
    p.add_argument("--methods", default=None, help="only methods whose name contains one of these (comma-separated)")
    p.add_argument("--retain", type=float, nargs="+", default=None, help="override the retain sweep")
    p.add_argument("--steps", type=int, default=None, help="override tuning steps (all parts)")
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--n-tune", type=int, default=None)
    p.add_argument("--calibration-batches", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None, help="override the LoRA/DoRA rank")
    p.add_argument("--probe-steps", type=int, default=None, help="override the vision linear-probe steps")
    p.add_argument("--targets", nargs="+", default=None,
                   help="override the vision targets (validation.vision.TARGETS)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of data order and initialisation (default: the preset's, 3)")
    p.add_argument("--save-models", type=Path, default=None, metavar="DIR",
                   help="write every tuned model (merged, safetensors, tokenizer, config) to DIR")
    p.add_argument("--records-from", type=Path, nargs="+", default=[], metavar="DIR",
                   help="first copy into <out>/methods the method records of these folders "
                        "(a results folder, its methods/ folder, or docs/results/records/<run>) "
                        "that <out> lacks: a record is reused only where every setting its "
                        "result depends on is unchanged (its file name holds their key)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                   help="processes side by side: 2 runs the language methods that need "
                        "calibration in one and the others, then vision, in the other, each on "
                        "one thread (default: 2 on a CPU with 2 or more cores, for every preset "
                        "but paper; 1 otherwise)")
    p.add_argument("--method-kinds", default=None, help=argparse.SUPPRESS)  # --jobs lanes
    p.add_argument("--pretrain-only", action="store_true", help=argparse.SUPPRESS)  # --jobs lanes
    p.add_argument("--device", default=None,
                   help="cpu or cuda: the paper preset's parts (default cuda when available); the "
                        "language part of the other presets (default cpu)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("paper preset (local paths)")
    g.add_argument("--vit-checkpoint", type=Path)
    g.add_argument("--vision-data", type=Path, help="folder with one sub-folder per dataset")
    g.add_argument("--vision-datasets", default=None, help="comma-separated dataset folder names")
    g.add_argument("--llama-checkpoint", type=Path)
    g.add_argument("--commonsense-train", type=Path, help="commonsense_170k.json")
    g.add_argument("--commonsense-test", type=Path, help="folder with <task>/test.json")
    g.add_argument("--dtype", default="bfloat16", help="model dtype for the paper preset")
    return p


def run_config(argv: list[str] | None = None) -> RunConfig:
    """Read the command line (``sys.argv[1:]`` by default) once into a :class:`RunConfig`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    preset = configure(presets()[args.preset], args)
    paper = PaperInputs(
        vit_checkpoint=args.vit_checkpoint, vision_data=args.vision_data,
        vision_datasets=tuple(d.strip() for d in args.vision_datasets.split(",")) if args.vision_datasets else (),
        llama_checkpoint=args.llama_checkpoint, commonsense_train=args.commonsense_train,
        commonsense_test=args.commonsense_test, device=args.device, dtype=args.dtype,
    )
    return RunConfig(
        preset=preset,
        out=args.out or Path("results") / preset.name,
        save_models=args.save_models,
        records_from=tuple(args.records_from),
        method_filter=tuple(w.strip() for w in args.methods.split(",")) if args.methods else (),
        method_kinds=tuple(args.method_kinds.split(",")) if args.method_kinds else (),
        jobs=default_jobs(args.jobs, preset.name, args.device),
        pretrain_only=args.pretrain_only,
        threads=args.threads,
        progress=not args.no_progress,
        paper=paper,
        command=" ".join(["python validation/run_paper.py", *argv]),
    )


def configure(preset: Preset, args: argparse.Namespace) -> Preset:
    """The preset with the command-line overrides applied (called by :func:`run_config` only)."""
    # command-line override -> PartConfig field, applied to both parts when given
    fields = {"retain": "retains", "steps": "steps", "n_test": "n_test", "n_tune": "n_tune",
              "calibration_batches": "calibration_batches", "probe_steps": "probe_steps",
              "lora_rank": "lora_rank"}
    changes = {field_name: getattr(args, arg) for arg, field_name in fields.items()
               if getattr(args, arg) is not None}
    if "retains" in changes:
        changes["retains"] = tuple(changes["retains"])
    vision_changes = {} if args.targets is None else {"targets": tuple(args.targets)}

    def over(cfg: PartConfig) -> PartConfig:
        return replace(cfg, **changes)

    parts = set(args.parts.split(","))
    unknown = parts - {"language", "vision"}
    if unknown:
        msg = f"--parts: unknown part(s) {sorted(unknown)}; choose from language, vision"
        raise SystemExit(msg)
    lang = replace(over(preset.language), enabled="language" in parts)
    vis = replace(over(preset.vision), enabled="vision" in parts, **vision_changes)
    lang = with_learning_rates("language", lang, settings_for(preset.name, "language")) \
        if lang.enabled else lang
    vis = with_learning_rates("vision", vis, settings_for(preset.name, "vision")) \
        if vis.enabled else vis
    seeds = preset.seeds if args.seeds is None else tuple(args.seeds)
    return replace(preset, language=lang, vision=vis, seeds=seeds)


#: PartConfig fields that choose which methods run, not how one runs (left out of its record key).
METHOD_SELECTION_FIELDS = ("retains", "ablations", "svd_ctf", "base_row", "untuned_rows",
                           "task_fraction", "threads")


def record_key(cfg: PartConfig, method: Method, split_seed: int, seed: int, part_name: str,
               base_fingerprint: str | None, device: dict | None = None) -> str:
    """The key of one method's saved record: everything that method's result depends on.

    The part's settings without the fields that only select methods
    (:data:`METHOD_SELECTION_FIELDS`; JACTUS's task fraction travels in the
    method's own options) and with only this method's learning rate, so that
    a rerun after another family's rate or tau changed (a new sweep) still
    reuses the records it can: a long run survives the sweeps of the others.
    ``device`` is the part's :func:`device_field` (empty on the CPU).
    """
    settings = {k: v for k, v in asdict(cfg).items() if k not in METHOD_SELECTION_FIELDS}
    tuned = method.kind != "none" and method.opts.get("tune", True)
    settings["lrs"] = cfg.lrs.get(lr_family(method.kind)) if tuned else None
    part_key = fingerprint({"cfg": settings, "split": split_seed, "seed": seed, "part": part_name,
                            "base": base_fingerprint, **(device or {})})
    return fingerprint({"part": part_key, "method": method.to_dict()})


def methods_for(cfg: PartConfig, method_filter: tuple[str, ...] = (),
                method_kinds: tuple[str, ...] = ()) -> list[Method]:
    methods = method_grid(cfg.retains, ablations=cfg.ablations, base=cfg.base_row,
                          task_fraction=cfg.task_fraction, svd_ctf=cfg.svd_ctf,
                          untuned=cfg.untuned_rows)
    if method_filter:
        methods = [m for m in methods if any(w in m.name for w in method_filter)]
    if method_kinds:
        methods = [m for m in methods if m.kind in method_kinds]
    return methods


def run_part(parts: list, cfg: PartConfig, preset: Preset, config: RunConfig, progress: bool,
             timings: dict) -> dict[int, dict[str, dict]]:
    """Every method on every seed's part (method by method, so seeds share a compression).

    Finished (method, seed) pairs are read back instead of rerun.
    """
    shared = SeedShare()
    records: dict[int, dict[str, dict]] = {part.seed: {} for part in parts}
    out = config.out
    name = parts[0].name
    safe = name.replace("/", "-")
    methods = methods_for(cfg, config.method_filter, config.method_kinds)
    for index, method in enumerate(methods):
        # one decomposition per seed's base, kept while a later method shares it
        shared.keep_plans = {m.plan_signature() for m in methods[index + 1:]} - {None}
        for part in parts:
            seed = part.seed
            key = record_key(cfg, method, preset.split_seed, seed, part.name,
                             getattr(part, "base_fingerprint", None), device_field(part))
            path = out / "methods" / f"{safe}__seed{seed}__{method.key()}__{key}.json"
            if path.exists():
                records[seed][method.name] = json.loads(path.read_text())
                log(f"[{name} seed {seed}] {method.name}: already done, reusing {path.name}")
                continue
            stats, stats_key = None, ""
            if method.kind in ("jactus", "ctf"):
                stats_key = statistics_key(cfg, preset.split_seed, part)
                if stats_key not in shared.stats:
                    shared.stats[stats_key], secs = statistics_for(part, out, stats_key, progress,
                                                                   statistics_dtype(cfg))
                    timings[f"{name}: calibration (seed {seed})"] = secs
                    log(f"[{name} seed {seed}] calibration: " + (
                        f"{secs:.0f} s in this process" if secs else "read from the file"))
                stats = shared.stats[stats_key]
            save_to = None
            if config.save_models is not None:
                save_to = config.save_models / safe / f"seed{seed}" / method.key()
                if save_to.exists():
                    save_to = None  # written by an earlier run: kept as it is
            checkpoint = out / "checkpoints" / f"{path.stem}.safetensors"
            rec = run_method(part, method, cfg, stats, seed, progress, shared, stats_key, save_to,
                             checkpoint=checkpoint)
            rec["machine"] = record_machine(part)
            records[seed][method.name] = rec
            timings[f"{name}: {method.name} (seed {seed})"] = rec["wall_time_s"]
            acc = macro_average({t: np.asarray(v) for t, v in rec["correct"].items()})
            log(f"[{name} seed {seed}] {method.name}: avg acc {100 * acc:.1f}%, retain "
                f"{rec['retain_achieved']:.3f}, trainable {rec['trainable_params']:,}, "
                f"{rec['wall_time_s']:.0f} s")
            if is_main_process():
                atomic_json(path, rec)
                checkpoint.unlink(missing_ok=True)  # the record holds the result now
        shared.release_plans()
    return records


def main(argv: list[str] | None = None) -> Path:
    """The command-line entry point: :func:`run` of :func:`run_config` of ``argv``."""
    # tokenizers' thread pool and torch's forked workers do not mix; set for this process only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = run_config(argv)
    copy_method_records(config.records_from, config.out)
    if config.pretrain_only:
        pretrain_vision(config)
        return config.out
    if config.jobs > 1 and len(job_lanes(config)) > 1:
        return run_jobs(config, sys.argv[1:] if argv is None else list(argv))
    return run(config)


def records_folder(folder: Path) -> Path:
    """Where ``folder`` keeps its method records: its ``methods/`` if it has one, else itself."""
    return folder / "methods" if (folder / "methods").is_dir() else folder


def copy_method_records(folders: tuple[Path, ...], out: Path) -> int:
    """``--records-from``: copy into ``<out>/methods`` the method records of ``folders`` it lacks.

    Returns how many were copied. The records are the JSON files
    :func:`run_part` writes, named by :func:`record_key`; a copy is only
    read by a method whose settings give the same key
    (:func:`add_missing_files`: a ``--jobs`` lane never reads half a record).
    """
    if not folders:
        return 0
    methods = out / "methods"
    methods.mkdir(parents=True, exist_ok=True)
    copied = 0
    for folder in folders:
        if not folder.is_dir():
            msg = f"--records-from: {folder} is not a folder"
            raise SystemExit(msg)
        copied += len(add_missing_files(sorted(records_folder(folder).glob("*__seed*__*.json")),
                                        methods))
        log(f"--records-from: {copied} method records copied into {methods} so far "
            f"(from {folder})")
    return copied


#: the kinds of method of each --jobs lane's language rows (the second lane then runs vision)
LANE_KINDS = (("jactus", "dora"), ("none", "lora", "ctf"))


def default_jobs(requested: int | None, preset: str, device: str | None) -> int:
    """``--jobs``: as asked, else 2 on a CPU run with 2 or more cores (not the paper preset)."""
    if requested is not None:
        return requested
    if "LOCAL_RANK" in os.environ:  # torchrun: one process per rank already
        return 1
    cpu = preset != "paper" and device in (None, "cpu")
    return 2 if cpu and (os.cpu_count() or 1) >= 2 else 1


def job_lanes(config: RunConfig) -> list[list[list[str]]]:
    """The extra arguments of each job, by lane: lanes run side by side, a lane's jobs in turn.

    Two lanes, balanced on measured times (issue 13): the vision part's
    pretrained ViTs (:func:`pretrain_vision`, about 70 s a seed on one
    core for the default preset), JACTUS (the calibration, then its
    compressions, tuned and untuned rows) and DoRA; the base row, LoRA and
    SVD-LLM+LoRA (whose calibration is JACTUS's: by the time this lane
    reaches it the statistics file is written, or it waits on
    :func:`calibration_lock`), then the vision part, which reads the ViTs
    the first lane cached. The default preset's lanes took 24.1 and 29.7
    min with the pretraining in the second lane. A tuned model
    costs about the same in every family, so each lane has half the tuned
    language models: on the full preset (300 steps, about 30 min each on
    one core) about 5 h each, where JACTUS with SVD-LLM+LoRA beside the rest
    left one lane idle for the last 4 h. With one part enabled only, or
    ``--methods`` given, everything runs in one lane.
    """
    lang, vis = config.preset.language.enabled, config.preset.vision.enabled
    if not lang or config.method_filter:
        return [[[]]]
    lanes = [[["--parts", "language", "--method-kinds", ",".join(kinds)]] for kinds in LANE_KINDS]
    if vis:
        lanes[0].insert(0, ["--parts", "vision", "--pretrain-only"])
        lanes[1].append(["--parts", "vision"])
    return lanes


def pretrain_vision(config: RunConfig) -> dict[int, str]:
    """Build (or read from the cache) the vision part's pretrained ViT of every seed.

    The first job of the first ``--jobs`` lane: the ViTs are cached per
    seed, so the vision part of the other lane then reads them. Returns
    ``{seed: fingerprint}`` (:func:`pretrained_vision_model` logs each).
    """
    cfg = config.preset.vision
    if not cfg.enabled or cfg.model == "paper":  # the paper preset reads a local checkpoint
        return {}
    if config.threads:
        torch.set_num_threads(config.threads)
    return {seed: pretrained_vision_model(cfg, seed, config.progress)[1]
            for seed in config.preset.seeds}


def one_thread_env() -> dict[str, str]:
    """This process's environment with one BLAS / OpenMP thread: a job lane's (one core each)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_jobs(config: RunConfig, argv: list[str]) -> Path:
    """Run :func:`job_lanes` as subprocesses (one thread each), then combine their records here.

    Each job is this script with ``argv`` plus its lane's ``--parts`` and
    ``--method-kinds``, ``--jobs 1 --threads 1 --no-progress``, and its
    output in ``<out>/log-job<lane>.txt``. Every finished method is a record
    in ``<out>/methods``, so the last step, this process running the whole
    preset on one thread like the lanes, only reads them and writes the
    tables; its wall time counts from the start of the jobs.
    """
    started = time.perf_counter()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    env = one_thread_env()
    base = [sys.executable, str(Path(__file__).resolve()), *argv, "--jobs", "1", "--threads", "1",
            "--no-progress"]
    lanes = job_lanes(config)
    print(f"{len(lanes)} job lane(s), logs in {out}/log-job<lane>.txt", flush=True)

    def run_lane(i: int, jobs: list[list[str]]) -> int:
        with open(out / f"log-job{i}.txt", "w") as log:
            for extra in jobs:
                start = time.perf_counter()
                code = subprocess.run([*base, *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      check=False).returncode
                print(f"job lane {i} {' '.join(extra) or '(all)'}: exit {code} after "
                      f"{(time.perf_counter() - start) / 60:.1f} min", flush=True)
                if code != 0:
                    return code
        return 0

    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        codes = list(pool.map(lambda lane: run_lane(*lane), enumerate(lanes)))
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        msg = f"job lane(s) {failed} failed: see {out}/log-job<lane>.txt"
        raise SystemExit(msg)
    # one thread, as in the lanes: a model this process builds again (the smoke preset's
    # uncached tiny ViT) then has the lanes' bytes, so their records' keys match and are read
    return run(replace(config, jobs=1, threads=1), started=started)


def run(config: RunConfig, started: float | None = None) -> Path:
    """Every enabled part of ``config.preset``; returns the results folder.

    ``started``: the ``time.perf_counter()`` the run's wall time counts from
    (default: now).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    if "LOCAL_RANK" in os.environ and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    preset, out, command = config.preset, config.out, config.command
    out.mkdir(parents=True, exist_ok=True)
    progress = config.progress and is_main_process()
    started = time.perf_counter() if started is None else started
    groups: dict[str, dict] = {}
    parts_info: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for group, builder in (("language", build_language), ("vision", build_vision)):
        cfg: PartConfig = getattr(preset, group)
        if not cfg.enabled:
            continue
        if cfg.threads and not config.threads:
            torch.set_num_threads(cfg.threads)
        start = time.perf_counter()
        parts_by_name = builder(cfg, preset, config)
        timings[f"{group}: setup"] = time.perf_counter() - start
        by_part = {}
        for name, parts in parts_by_name.items():
            by_part[name] = run_part(parts, cfg, preset, config, progress, timings)
        fingerprints = {p.seed: p.base_fingerprint for ps in parts_by_name.values() for p in ps
                        if getattr(p, "base_fingerprint", None)}
        if list(by_part) == [group]:
            groups[group] = by_part[group]
            tasks = parts_by_name[group][0].tasks
        else:
            groups[group] = combine_targets(group, by_part)
            tasks = [n.split("/", 1)[1] for n in by_part]
        parts_info[group] = {
            "tasks": tasks,
            "splits": {n: ps[0].split_ids for n, ps in parts_by_name.items()},
            "fingerprints": fingerprints,
            "device": part_device(next(iter(parts_by_name.values()))[0]),
        }
        if is_main_process():
            write_outputs(out, preset, groups, parts_info, command, timings,
                          time.perf_counter() - started)
    if is_main_process():
        write_outputs(out, preset, groups, parts_info, command, timings,
                      time.perf_counter() - started)
        print(f"results in {out}/results.md", flush=True)
    return out


if __name__ == "__main__":
    main()
