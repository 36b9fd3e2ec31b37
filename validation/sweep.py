"""Choose each method family's learning rate on dev items (never a test item).

Protocol
--------
* **Where.** Dev items are in neither the tune part nor the test part:
  vision, the images after the tune images in the split permutation of
  every target (``--n-dev`` per target); language, the validation items
  after the tune items of every task (``--n-dev`` per task). Models train on
  the same tune items, for the same steps, as the runner's preset (which
  reserves the same dev items, ``n_dev``); only the scored items differ,
  and test items are never scored.
* **What.** Each family in its final configuration, the one the runner
  uses: JACTUS@0.8 (covariance task directions, mergeable cores on the
  layers kept dense), SVD-LLM+LoRA@0.8, LoRA@1.0 and DoRA@1.0. The ablations
  and SVD+LoRA train at their family's rate.
* **Grid.** A log grid, by default ``3e-5 ... 3e-2`` in half decades
  (:data:`LRS`), with every rate run on at least three data orders
  (``--orders``, also the initialisation seeds).
* **Head first (vision).** The new head's rate, the same for every method,
  is chosen first: the head alone is tuned from the linear probe on the
  grid. The families are then swept with that head rate (with ``--jobs``,
  the head sweep runs once, before the lanes start).
* **Selection.** The rate with the best mean over orders of the dev score:
  accuracy for vision (macro over targets), the answer's negative
  log-likelihood per token for language (macro over tasks; lower is
  better). A choice at an edge of the grid is flagged on the page.

Outputs: ``--out`` (default ``results/sweep-<part>``, ``results/sweep-<part>-<preset>``
for a preset other than the default) keeps ``sweep.json``, one entry per
(family, rate, order, pretrained model: vision's ViT is named by its
weights' fingerprint; device, off the CPU), so a rerun resumes, and a rerun
on another pretrained model tunes again instead of reusing records made on
the first; each model's tuning checkpoints to ``--out``/checkpoints, so a
sweep killed mid-model resumes it; a model whose training diverges gets the
worst score. At the end the page ``--page`` says what was chosen and why,
and ``--settings`` records the chosen rates with a pointer to the page.
By default both go where the runner reads them for a preset of
:data:`validation.run_paper.SWEPT_PRESETS`: the page to
``docs/results/sweep-<part>[-<preset>].md``, the rates to the preset's own
file (``validation/tuned_settings.json`` for the default preset,
``validation/tuned_settings-full.json`` for the full one, which the runner
reads for that preset once it holds every family's rate); a sweep of the
smoke preset writes both into ``--out`` only.

Usage: ``python -m validation.sweep --part vision`` (or ``--part
language``); ``--preset smoke`` exercises the protocol in seconds. On
several cores, ``--jobs N`` tunes the families in N processes side by side
(:mod:`validation.sweep_lanes`) and makes the choice over all of them;
like each lane, the parent then runs on one thread.
``--merge-from DIR ...`` first copies the records of other sweep folders
into ``--out`` (sweeps run elsewhere, or records saved from an earlier
machine), so that nothing they hold is tuned again.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jactus_linalg import DEFAULT_TASK_FRACTION
from validation import run_paper
from validation.methods import Method
from validation.parts import hf_loss
from validation.report import write_text_atomic
from validation.train import tune

ROOT = Path(__file__).resolve().parents[1]
LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
ORDERS = (0, 1, 2)

#: The method each family is swept with (its final configuration).
FAMILY_METHODS = {
    "JACTUS": Method("JACTUS@0.8", "JACTUS", "jactus", 0.8),
    "SVD-LLM+LoRA": Method("SVD-LLM+LoRA@0.8", "SVD-LLM+LoRA", "ctf", 0.8,
                           (("compression", "svd-llm"),)),
    "LoRA": Method("LoRA@1.0", "LoRA", "lora"),
    "DoRA": Method("DoRA@1.0", "DoRA", "dora"),
}
HEAD = "head"


def dev_score(part_name: str, rec: dict) -> tuple[float, float]:
    """(score to maximise, dev accuracy): vision accuracy, language minus the answer NLL.

    A model whose training diverged (:func:`diverged_record`) scores
    ``-inf``, below every model that trained, with no accuracy (NaN).
    """
    if rec.get("diverged"):
        return -math.inf, math.nan
    acc = float(np.mean([np.mean(v) for v in rec["correct"].values()]))
    if part_name == "language":
        nll = float(np.mean([np.mean(v) for v in rec["metrics"]["answer_nll"].values()]))
        return -nll, acc
    return acc, acc


def mean_sd_n(scores: list[float]) -> tuple[float, float, int]:
    """Mean, sample sd (0 for one score) and count of dev scores over orders.

    A diverged order (``-inf``, :func:`dev_score`) makes the mean ``-inf``
    and the sd 0: the cell is shown as diverged and never chosen.
    """
    n = len(scores)
    if any(score == -math.inf for score in scores):
        return -math.inf, 0.0, n
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if n > 1 else 0.0, n


def select(done: dict, family: str) -> dict | None:
    """The family's rate with the best mean dev score over orders, with the table behind it."""
    by_lr: dict[float, list[float]] = {}
    for v in done.values():
        if v["family"] == family:
            by_lr.setdefault(v["lr"], []).append(v["score"])
    if not by_lr:
        return None
    table = {lr: mean_sd_n(s) for lr, s in sorted(by_lr.items())}
    best = max(table, key=lambda lr: (table[lr][0], -lr))
    lrs = sorted(table)
    return {"lr": best, "table": table, "edge": best in (lrs[0], lrs[-1]) and len(lrs) > 2}


def _head_only(part, lr: float, cfg, seed: int) -> dict:
    """Tune only the new head of ``part.base`` (a copy) at ``lr``; score on the dev items."""
    model = copy.deepcopy(part.base)
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{h}." in f".{name}." for h in part.head))
    start = time.perf_counter()
    tune(model, part.tune_batches, hf_loss, steps=cfg.steps, lr=lr, seed=seed, progress=False,
         desc=f"{part.name}: head lr={lr:g}")
    metrics = part.evaluate_metrics(model)
    return {"correct": {t: v.astype(int).tolist() for t, v in metrics["correct"].items()},
            "metrics": {}, "trainable_params": sum(p.numel() for p in model.parameters()
                                                   if p.requires_grad),
            "retain_achieved": 1.0, "wall_time_s": time.perf_counter() - start}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("vision", "language"), default="vision")
    p.add_argument("--preset", choices=("default", "full", "smoke"), default="default",
                   help="the runner preset whose configuration is tuned")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--orders", type=int, nargs="+", default=list(ORDERS),
                   help="data orders (and initialisation seeds); at least 3")
    p.add_argument("--families", default=",".join(FAMILY_METHODS),
                   help="comma-separated families to sweep")
    p.add_argument("--n-dev", type=int, default=None,
                   help="dev items per target (vision) or per task (language); default: the "
                        "preset's n_dev (default preset: 200 and 16)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None, help="default docs/results/sweep-<part>.md")
    p.add_argument("--settings", type=Path, default=None,
                   help="where the chosen rates are written and tau is read; default: the "
                        "preset's own file (validation/tuned_settings.json for the default preset, "
                        "validation/tuned_settings-<preset>.json otherwise), tau read from the "
                        "default preset's file until the preset's own has it")
    add_device_argument(p)
    add_statistics_argument(p)
    add_lane_arguments(p, "--families: JACTUS and SVD-LLM+LoRA share one calibration",
                       "such as docs/results/records/sweep-language-full")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_lane_arguments(p: argparse.ArgumentParser, groups: str, example: str) -> None:
    """``--merge-from`` and ``--jobs`` (:mod:`validation.sweep_lanes`): what the lanes are cut from."""
    p.add_argument("--merge-from", type=Path, nargs="+", default=[], metavar="DIR",
                   help="first copy into --out the records of these sweep folders (sweeps run "
                        f"elsewhere, or records saved from an earlier machine, {example}): "
                        "nothing they hold is tuned again")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the sweep in this many processes side by side, one thread each "
                        f"(contiguous groups of {groups}), each in <out>/lane<i>; then choose "
                        "over all their records")


def add_statistics_argument(p: argparse.ArgumentParser) -> None:
    """``--stats-from``: folders whose calibration statistics a sweep reads instead of calibrating."""
    p.add_argument("--stats-from", type=Path, nargs="+", default=[], metavar="DIR",
                   help="before calibrating, link into --out the calibration statistics files "
                        "(stats-*.safetensors) these folders hold, such as another sweep's "
                        "results/sweep-language-full/lane0: a file's name is its key (the part, "
                        "its calibration settings and pretrained model), so only one made with "
                        "the same settings is read")


def link_statistics(folders: list[Path], out: Path) -> list[Path]:
    """Hard-link (or, across file systems, copy) into ``out`` the statistics files of ``folders`` it lacks.

    Returns the files added. A calibration of the full preset's language
    part takes about ten minutes of one core and its file is 3 GB, so a link
    is what a sweep reusing another sweep's calibration wants.
    """
    added = []
    for folder in folders:
        if not folder.is_dir():
            msg = f"--stats-from: {folder} is not a folder"
            raise SystemExit(msg)
        for target in run_paper.add_missing_files(sorted(folder.glob("stats-*.safetensors")), out,
                                                  link=True):
            added.append(target)
            print(f"--stats-from: {target} from {folder}", flush=True)
    return added


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``: where the language part tunes (the runner's ``--device``; default the CPU)."""
    p.add_argument("--device", default=None,
                   help="cpu or cuda: where the language part's models tune and are scored "
                        "(default cpu); records made off the CPU say so in their labels")


def merge_records(done: dict, folders: list[Path], preset: str | None = None,
                  relabel: Callable[[str, dict], tuple[str, dict] | None] | None = None) -> int:
    """Add to ``done`` the records of the ``sweep.json`` in each of ``folders``; return how many.

    A sweep can run as several processes, each with its own ``--out`` and
    ``--families``; this brings their records into one folder, where the
    choice is made. A label already in ``done`` must carry the same score,
    and a record that names its preset must name ``preset`` (records
    written before records named it are taken as they are). ``relabel``
    maps each ``(label, record)`` read to the pair to add, or to ``None``
    to leave it out (the tau sweep reads a learning-rate sweep's JACTUS
    records this way: :func:`validation.sweep_tau.tau_record`).
    """
    added = 0
    for folder in folders:
        path = folder / "sweep.json"
        if not path.is_file():
            msg = f"--merge-from: {path} does not exist"
            raise SystemExit(msg)
        for pair in json.loads(path.read_text()).items():
            kept = pair if relabel is None else relabel(*pair)
            if kept is None:
                continue
            label, rec = kept
            if preset is not None and rec.get("preset", preset) != preset:
                msg = (f"--merge-from: {label!r} in {path} was made with --preset "
                       f"{rec['preset']}, not {preset}")
                raise SystemExit(msg)
            if label in done and done[label]["score"] != rec["score"]:
                msg = (f"--merge-from: {label!r} has score {rec['score']} in {path} but "
                       f"{done[label]['score']} in --out")
                raise SystemExit(msg)
            added += label not in done
            done[label] = rec
    return added


def merge_into_out(done: dict, done_path: Path, folders: list[Path], preset: str,
                   relabel: Callable[[str, dict], tuple[str, dict] | None] | None = None) -> int:
    """``--merge-from``: :func:`merge_records` of ``folders`` into ``done``, saved to ``done_path``.

    Returns how many records it added.
    """
    if not folders:
        return 0
    added = merge_records(done, folders, preset, relabel)
    run_paper.atomic_json(done_path, done)
    print(f"--merge-from: {added} records added to {done_path}", flush=True)
    return added


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep; returns the chosen settings of the part."""
    args = _parser().parse_args(argv)
    with threads_of_the_lanes(args.jobs):
        return sweep(args)


def sweep(args: argparse.Namespace) -> dict:
    """:func:`main` after parsing ``args``."""
    if len(set(args.orders)) < 3:
        msg = f"--orders: the protocol needs at least 3 data orders, got {args.orders}"
        raise SystemExit(msg)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILY_METHODS)
    if unknown:
        msg = f"--families: unknown {sorted(unknown)}; choose from {list(FAMILY_METHODS)}"
        raise SystemExit(msg)
    if args.jobs > 1 and args.part != "vision":  # vision's lanes start after the head sweep
        sweep_in_lanes(args, families)
    preset = run_paper.presets()[args.preset]
    cfg = getattr(preset, args.part)
    cfg = replace(cfg, lrs={f: 1.0 for f in FAMILY_METHODS}, lr_head=1.0)
    cfg, sweep_dir = dev_sweep(args, cfg, preset, sweep_name(args))
    _, _, parts_by_name, done_path, done = sweep_dir
    merged = merge_into_out(done, done_path, args.merge_from, args.preset)
    args.merge_from = []  # in done now: the vision lanes below start from it

    def record(label: str, family: str, lr: float, part, rec: dict) -> None:
        score, acc = dev_score(args.part, rec)
        done[label] = {"family": family, "lr": lr, **part_fields(part), "preset": args.preset,
                       **({"task_fraction": jactus_tau} if family == "JACTUS" else {}),
                       "lr_head": cfg.lr_head if family != HEAD else None, "steps": cfg.steps,
                       "score": score, "dev_accuracy": acc,
                       "dev_items": int(sum(len(v) for v in rec["correct"].values())),
                       "trainable_params": rec["trainable_params"],
                       "retain_achieved": rec["retain_achieved"],
                       "seconds": rec["wall_time_s"]}
        run_paper.atomic_json(done_path, done)
        print(f"{label}: dev score {score:.4f} (accuracy {100 * acc:.1f}%)", flush=True)

    lr_head = None
    if args.part == "vision":
        for parts in parts_by_name.values():
            for lr in args.lrs:
                for part in parts:
                    label = f"{HEAD} lr={lr:g} steps={cfg.steps} {part_tag(part)}"
                    if label not in done:
                        record(label, HEAD, lr, part, _head_only(part, lr, cfg, part.seed))
        if args.jobs > 1:  # once here, not once per lane: the lanes find these records in --out
            sweep_in_lanes(args, families, merged)
            done.update(json.loads(done_path.read_text()))
        done_here = at_run_settings(done, parts_by_name, cfg.steps, None)
        lr_head = _merge_targets(done_here, HEAD)["lr"]
    cfg = replace(cfg, lr_head=lr_head)
    stats_cache: dict = {}
    read_from, write_to = run_paper.sweep_settings_files(args.settings, args.preset, args.part,
                                                         sweep_dir.out)
    inherited = tau_fields(read_from, args.part)
    jactus_tau = jactus_task_fraction(inherited)
    for family in families:
        method = final_method(family, jactus_tau)
        for parts in parts_by_name.values():
            shared = run_paper.SeedShare()
            for lr in args.lrs:
                local = replace(cfg, lrs={f: lr for f in FAMILY_METHODS})
                for part in parts:
                    label = (f"{family} lr={lr:g}{tau_label(method)}{head_label(lr_head)} "
                             f"steps={cfg.steps} {part_tag(part)}")
                    if label in done:
                        continue
                    rec = dev_run(part, method, local, preset.split_seed, sweep_dir,
                                  stats_cache, shared, label)
                    record(label, family, lr, part, rec)
    # every family with results in --out (a rerun of some families keeps the others' rows),
    # at the preset's steps and the head's chosen rate only, on the pretrained models the dev
    # parts hold now (records made with other steps, another head rate or another pretrained
    # ViT are kept, not used)
    done_now = at_task_fraction(at_run_settings(done, parts_by_name, cfg.steps, lr_head),
                                jactus_tau)
    swept = {f: _merge_targets(done_now, f) for f in FAMILY_METHODS
             if any(v["family"] == f for v in done_now.values())}
    chosen, short = split_by_orders(swept, len(set(args.orders)))
    for family, missing in short.items():
        print(f"{family}: not chosen, rates {missing} lack some of the {len(set(args.orders))} "
              f"orders (records merged or left by another run); sweep --families {family}",
              flush=True)
    page = args.page or default_page(args, sweep_dir.out)
    write_page(page, args, cfg, done_now, chosen, lr_head, parts_by_name, write_to, short)
    return write_settings(write_to, args.part, chosen, lr_head, page, args, inherited)


def final_method(family: str, task_fraction: float | None) -> Method:
    """The family's method in the runner's final configuration (JACTUS at ``task_fraction``).

    ``None`` leaves JACTUS at the package default (its label then has no tau).
    """
    method = FAMILY_METHODS[family]
    if family == "JACTUS" and task_fraction is not None:
        method = Method(method.name, method.family, method.kind, method.retain,
                        (("task_fraction", float(task_fraction)),))
    return method


def tau_label(method: Method) -> str:
    """`` tau=<t>`` for a method with a task fraction (JACTUS), else empty.

    In a record's label (and so in its checkpoint's name), so that a sweep
    rerun after the task fraction changed tunes JACTUS again instead of
    taking the records, or resuming the checkpoints, made at the old one.
    """
    tau = method.opts.get("task_fraction")
    return "" if tau is None else f" tau={tau:g}"


def threads_of_the_lanes(jobs: int) -> contextlib.AbstractContextManager:
    """With ``jobs > 1``, run this process on one thread, as every lane does; then as before.

    The parent of ``--jobs N`` tunes what the lanes build on (vision's head)
    and, after them, builds the dev parts again to choose: on one thread, as
    in a lane (:func:`run_paper.one_thread_env`), its records are the ones a
    lane would make. (The smoke ViT's pretraining gave other weights on two
    threads before it ran on one, :func:`validation.vision.one_thread`, and
    the lanes then tuned the head again.)
    """
    from validation.vision import one_thread  # noqa: PLC0415

    return one_thread() if jobs > 1 else contextlib.nullcontext()


def sweep_in_lanes(args: argparse.Namespace, families: list[str], merged: int = 0) -> None:
    """``--jobs N``: tune ``families`` in N processes (:mod:`validation.sweep_lanes`).

    ``merged``: the records ``--merge-from`` already brought into ``--out``
    (vision merges them before its head sweep), for the count it prints.

    Their records, with those of ``--merge-from``, end in ``--out``'s
    ``sweep.json``; the caller then finds nothing left to tune and chooses.
    """
    from validation import sweep_lanes  # noqa: PLC0415  (it imports this module)

    out = sweep_out(args, sweep_name(args))
    out.mkdir(parents=True, exist_ok=True)
    read_from, _ = run_paper.sweep_settings_files(args.settings, args.preset, args.part, out)
    groups = sweep_lanes.family_groups(families, args.jobs)
    folders = sweep_lanes.lane_folders(out, len(groups), read_from)
    steps = getattr(run_paper.presets()[args.preset], args.part).steps
    tau = jactus_task_fraction(tau_fields(read_from, args.part))
    lrs = set(args.lrs)

    def count(done: dict) -> int:
        return sweep_lanes.models_recorded(done, families, lrs, steps, tau)

    total = (len(families) * len(lrs) * len(set(args.orders))
             * sweep_lanes.dev_parts_per_order(args))
    lanes = sweep_lanes.Lanes(
        "validation.sweep", folders,
        [sweep_lanes.lane_argv(args, g, f, out) for g, f in zip(groups, folders, strict=True)],
        [",".join(g) for g in groups], count, total)
    sweep_lanes.sweep_with_lanes(args, out, lanes, merged)


def split_by_orders(swept: dict, orders: int) -> tuple[dict, dict]:
    """The families whose every rate has ``orders`` orders, and the others with their short rates.

    A family is chosen only on complete orders: a folder can hold a
    family's records that this invocation did not sweep (``--merge-from``,
    an earlier ``--families`` run stopped midway).
    """
    short = {f: [lr for lr, (_, _, n) in c["table"].items() if n < orders]
             for f, c in swept.items()}
    return ({f: c for f, c in swept.items() if not short[f]},
            {f: lrs for f, lrs in short.items() if lrs})


def tau_fields(path: Path, part: str) -> dict:
    """The task fraction ``validation/sweep_tau.py`` chose for ``part`` in ``path``, with its source.

    Empty when the file or its entry has none (JACTUS then sweeps at the
    package's default tau).
    """
    entry = run_paper.tuned_settings(path).get(part, {}) if path.is_file() else {}
    return {k: entry[k] for k in ("task_fraction", "task_fraction_source") if k in entry}


def jactus_task_fraction(inherited: dict) -> float:
    """The tau JACTUS trains at: the one :func:`tau_fields` found, else the package default."""
    tau = inherited.get("task_fraction")
    return float(tau) if tau is not None else DEFAULT_TASK_FRACTION


def sweep_name(args: argparse.Namespace, kind: str = "") -> str:
    """``sweep-<part>[-<kind>][-<preset>]``: the default name of a sweep's folder and page.

    The default preset's sweeps keep the short names; another preset's
    (``--preset full``) get their own, so that neither overwrites the other.
    """
    name = f"sweep-{args.part}" + (f"-{kind}" if kind else "")
    return name if args.preset == "default" else f"{name}-{args.preset}"


def runner_reads(args: argparse.Namespace, settings: Path) -> str:
    """The end of a page's first line: whether the runner reads the sweep's settings file."""
    if settings == run_paper.preset_settings_file(args.preset):
        return f", which the runner reads for the {args.preset} preset."
    return " (not a file the runner reads)."


def sweep_out(args: argparse.Namespace, default_out: str) -> Path:
    """A sweep's folder: ``--out``, else ``results/<default_out>``."""
    return args.out or Path("results") / default_out


def default_page(args: argparse.Namespace, out: Path, kind: str = "") -> Path:
    """Where a sweep's page goes without ``--page``: ``docs/results/<sweep_name>.md``.

    For a preset outside :data:`validation.run_paper.SWEPT_PRESETS` (the
    smoke preset) the page goes into the sweep's folder ``out`` instead,
    so that a check of the machinery never writes into the docs.
    """
    name = f"{sweep_name(args, kind)}.md"
    return ROOT / "docs" / "results" / name if args.preset in run_paper.SWEPT_PRESETS \
        else out / name


def head_label(lr_head: float | None) -> str:
    """`` head=<rate>`` in a family's label when a new head trains with it (vision), else empty."""
    return "" if lr_head is None else f" head={lr_head:g}"


def head_rate(part_name: str, cfg) -> float | None:
    """The head's rate a record of ``part_name`` trains with: vision's, None for language (no head)."""
    return cfg.lr_head if part_name == "vision" else None


def at_run_settings(done: dict, parts_by_name: dict, steps: int, lr_head: float | None) -> dict:
    """The records made on the current dev parts at ``steps`` steps with the head at ``lr_head``.

    Head-alone records need only the steps. A sweep's folder keeps the
    records of earlier settings (another step count, another head rate,
    another pretrained model: :func:`on_current_bases`); they stay there,
    but no choice is made on them. Records written before records carried
    their steps are not used.
    """
    return {k: v for k, v in on_current_bases(done, parts_by_name).items()
            if v.get("steps") == steps
            and (v.get("family") == HEAD or v.get("lr_head") == lr_head)}


def at_task_fraction(done: dict, tau: float) -> dict:
    """``done`` without the JACTUS records made at another task fraction than ``tau``.

    A JACTUS record says the tau it trained at, and so does its label
    (:func:`tau_label`); a record made before records carried it is used as
    it is.
    """
    return {k: v for k, v in done.items()
            if v.get("family") != "JACTUS" or v.get("task_fraction", tau) == tau}


def base_of(part) -> str | None:
    """The fingerprint of the pretrained model ``part`` starts from (vision's ViT), or None."""
    return getattr(part, "base_fingerprint", None)


def base_label(part) -> str:
    """`` base=<fingerprint>`` in a record's label when the part's pretrained model has one, else empty.

    A vision part's ViT is pretrained per seed on the machine that runs the
    sweep; two machines can build different bytes, so a record says which
    model it was tuned from and a rerun on another model tunes again.
    """
    fingerprint = base_of(part)
    return "" if fingerprint is None else f" base={fingerprint}"


def part_tag(part) -> str:
    """The end of a sweep record's label: ``order=<seed> <part>``, its :func:`base_label` and device.

    `` device=<type>`` only off the CPU, so CPU labels stay as they were.
    """
    device = run_paper.off_cpu_device(part)
    return (f"order={part.seed} {part.name}{base_label(part)}"
            + ("" if device is None else f" device={device}"))


def part_fields(part) -> dict:
    """The fields that say which dev part a sweep record was made on: order, target, base, device.

    :func:`on_current_bases` selects records by these; ``device`` is
    written only off the CPU.
    """
    device = run_paper.off_cpu_device(part)
    return {"order": part.seed, "target": part.name, "base": base_of(part),
            **({} if device is None else {"device": device})}


def on_current_bases(done: dict, parts_by_name: dict) -> dict:
    """The records made on the pretrained model and device the dev part of their target and order has now.

    Records of a target or order the sweep did not build this time, made
    from another pretrained model (another fingerprint, or none recorded
    where the part has one) or on another device (``--device``) are kept in
    the folder but not used.
    """
    current = {(p.name, p.seed): (base_of(p), run_paper.off_cpu_device(p))
               for parts in parts_by_name.values() for p in parts}
    return {k: v for k, v in done.items()
            if (v.get("target"), v.get("order")) in current
            and (v.get("base"), v.get("device")) == current[(v["target"], v["order"])]}


class SweepDir(NamedTuple):
    """Where a sweep works: its folder, run config, dev parts and finished records."""

    out: Path
    config: object
    parts_by_name: dict
    done_path: Path
    done: dict


def dev_sweep(args: argparse.Namespace, cfg, preset, default_out: str) -> tuple[object, SweepDir]:
    """The part's preset with its dev items scored (``--n-dev``, ``--orders``), and its sweep folder.

    The preset reserves its dev items, so a sweep tunes on the run's exact
    tune items; ``sweep.json`` in ``--out`` (default ``results/<default_out>``)
    holds the records already made, so a rerun resumes.
    """
    n_dev = args.n_dev if args.n_dev is not None else cfg.n_dev
    if n_dev < 1:
        msg = f"--n-dev: the {args.preset} preset reserves no dev items; pass --n-dev N"
        raise SystemExit(msg)
    cfg = replace(cfg, n_dev=n_dev)
    preset = replace(preset, seeds=tuple(args.orders))
    out = sweep_out(args, default_out)
    out.mkdir(parents=True, exist_ok=True)
    link_statistics(args.stats_from, out)
    config = run_paper.RunConfig(preset=preset, out=out, progress=not args.no_progress,
                                 paper=run_paper.PaperInputs(device=args.device))
    builder = run_paper.build_vision if args.part == "vision" else run_paper.build_language
    parts_by_name = builder(cfg, preset, config, evaluate_on="dev")
    done_path = out / "sweep.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    return cfg, SweepDir(out, config, parts_by_name, done_path, done)


def dev_statistics(part, cfg, split_seed: int, out: Path, cache: dict,
                   progress: bool) -> tuple[object, str]:
    """The part's calibration statistics (calibrated once per key, file in ``out``).

    The key is :func:`validation.run_paper.statistics_key`'s: a sweep rerun
    after the calibration settings changed calibrates again instead of
    reading a stale file.
    """
    key = f"dev-{part.name.replace('/', '-')}-{run_paper.statistics_key(cfg, split_seed, part)}"
    if key not in cache:
        cache[key] = run_paper.statistics_for(part, out, key, progress,
                                              run_paper.statistics_dtype(cfg))[0]
    return cache[key], key


def score_scale(part_name: str) -> tuple[float, int]:
    """How a dev score is shown: (factor, digits); accuracy in %, the answer NLL in nats."""
    return (100.0, 1) if part_name == "vision" else (-1.0, 3)


def mean_sd_text(part_name: str, mean: float, sd: float) -> str:
    """A dev score's mean ± sd over orders as the pages show it (:func:`score_scale`)."""
    if mean == -math.inf:
        return "diverged"  # at least one order's training diverged (dev_score)
    scale, digits = score_scale(part_name)
    return f"{scale * mean:.{digits}f} ± {abs(scale) * sd:.{digits}f}"


def dev_metric(part_name: str) -> str:
    """The dev score the sweeps select on, in words, as the pages name it."""
    return ("dev accuracy (%), macro over targets" if part_name == "vision"
            else "dev answer NLL (nats per token of the right answer), macro over tasks")


def dev_protocol(parts_by_name: dict, orders) -> str:
    """The pages' sentence on what is scored: the dev items per target or task, the orders."""
    dev_items = {name: len(parts[0].test_items) if hasattr(parts[0], "test_items")
                 else len(parts[0].test_y) for name, parts in parts_by_name.items()}
    bases = {p.seed: base_of(p) for parts in parts_by_name.values() for p in parts
             if base_of(p) is not None}
    pretrained = ("Pretrained ViT per order (SHA-256 of its weights, first 16 hex digits): "
                  + ", ".join(f"{s}: `{f}`" for s, f in sorted(bases.items())) + ". "
                  if bases else "")
    return ("scored on dev items that are in neither the tune nor the test part (test items are "
            "never scored here): " + ", ".join(f"{n}: {k} dev items" for n, k in dev_items.items())
            + f". Data orders (and initialisation seeds): {', '.join(map(str, orders))}. "
            + pretrained)


def device_argv(args: argparse.Namespace) -> str:
    """`` --device <name>`` as the command passed it, or empty (the CPU, the default)."""
    return f" --device {args.device}" if args.device else ""


def written_by(module: str, argv: str) -> str:
    """The pages' first line: the command that wrote the page, and when (UTC)."""
    return (f"Written by `python -m validation.{module} {argv}` on "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")


def markdown_row(*cells: str) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def markdown_header(*titles: str) -> list[str]:
    """A markdown table's title row and rule."""
    return [markdown_row(*titles), "|" + "---|" * len(titles)]


def score_cells(part_name: str, columns, scores: dict, bold) -> list[str]:
    """One row's cells: the mean ± sd at each column, ``-`` where not run, bold where chosen."""
    cells = []
    for column in columns:
        if column not in scores:
            cells.append("-")
            continue
        text = mean_sd_text(part_name, *scores[column][:2])
        cells.append(f"**{text}**" if column == bold else text)
    return cells


def sweep_plot(page: Path, part_name: str, curves: dict, chosen: dict, xlabel: str,
               title: str, log_x: bool = True) -> str:
    """Draw a sweep's scores beside its page (``<page>.png``); return the page's line showing it.

    ``curves[name][x] = (mean, sd, orders)``; the chosen ``x`` of each curve
    is ringed (:func:`validation.report.plot_dev_sweep`).
    """
    from validation.report import plot_dev_sweep  # noqa: PLC0415

    path = page.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    scale, _ = score_scale(part_name)
    ylabel = "dev accuracy (%)" if part_name == "vision" else "dev answer NLL (nats/token)"
    plot_dev_sweep(curves, chosen, path, xlabel=xlabel, ylabel=ylabel,
                   title=title, scale=scale, log_x=log_x)
    return (f"![{title}; mean ± sd over orders, the chosen value ringed]({path.name})  \n"
            f"*{title}: mean ± sd over orders; the chosen value is ringed"
            + (" (lower is better)*" if scale < 0 else " (higher is better)*"))


def write_sweep_page(page: Path, lines: list[str]) -> None:
    """Write a sweep's page atomically and say where."""
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(page, "\n".join(lines) + "\n")
    print(f"sweep page: {page}", flush=True)


def dev_run(part, method: Method, cfg, split_seed: int, sweep_dir: SweepDir, stats_cache: dict,
            shared, label: str) -> dict:
    """Tune ``method`` on ``part`` with ``cfg`` and score it on the dev items (the runner's engine).

    The methods that compress get the part's calibration statistics
    (:func:`dev_statistics`, calibrated once per key). The tuning loop
    checkpoints to :func:`checkpoint_path` of the record's ``label`` every
    few minutes, so a sweep killed mid-model resumes that model where it
    stopped (a full-preset language model is half an hour of one core); the
    checkpoint is removed once the model is scored.
    """
    stats, key = None, ""
    if method.kind in ("jactus", "ctf"):
        stats, key = dev_statistics(part, cfg, split_seed, sweep_dir.out, stats_cache,
                                    sweep_dir.config.progress)
    checkpoint = checkpoint_path(sweep_dir.out, label)
    start = time.perf_counter()
    try:
        rec = run_paper.run_method(part, method, cfg, stats, part.seed, sweep_dir.config.progress,
                                   shared, key, checkpoint=checkpoint)
    except FloatingPointError as err:  # a rate too high for the steps: the worst score, not a crash
        print(f"{label}: training diverged ({err}); scored below every rate that trained",
              flush=True)
        checkpoint.unlink(missing_ok=True)
        return diverged_record(str(err), time.perf_counter() - start)
    if rec.get("resumed_from_step") is not None:
        print(f"{label}: resumed from its checkpoint at step {rec['resumed_from_step']}", flush=True)
    checkpoint.unlink(missing_ok=True)
    return rec


def diverged_record(reason: str, seconds: float) -> dict:
    """The record of a model whose training loss became non-finite (:func:`dev_score`: ``-inf``)."""
    return {"diverged": reason, "correct": {}, "metrics": {}, "trainable_params": None,
            "retain_achieved": None, "wall_time_s": seconds}


def checkpoint_path(out: Path, label: str) -> Path:
    """Where the tuning loop of the sweep record ``label`` checkpoints, in ``out/checkpoints``."""
    return out / "checkpoints" / f"{run_paper.fingerprint(label)}.safetensors"


def _merge_targets(done: dict, family: str) -> dict:
    """Scores averaged over targets (vision) for each (rate, order), then :func:`select`."""
    pooled: dict[tuple, list[float]] = {}
    for v in done.values():
        if v["family"] == family:
            pooled.setdefault((v["lr"], v["order"]), []).append(v["score"])
    merged = {f"{lr} {order}": {"family": family, "lr": lr, "score": float(np.mean(s))}
              for (lr, order), s in pooled.items()}
    chosen = select(merged, family)
    if chosen is None:
        msg = f"no sweep result for {family!r}"
        raise SystemExit(msg)
    return chosen


def lrs_argv(lrs) -> str:
    """`` --lrs ...`` as the command passed it, or empty for the default grid (:data:`LRS`)."""
    return "" if sorted(lrs) == sorted(LRS) else " --lrs " + " ".join(f"{lr:g}" for lr in lrs)


def write_page(page: Path, args, cfg, done: dict, chosen: dict, lr_head, parts_by_name,
               settings: Path, short: dict | None = None) -> None:
    """The sweep's page: protocol, the dev score of every rate, what was chosen and why."""
    scale = 100.0 if args.part == "vision" else -1.0
    lines = [
        f"# Learning rates of the {args.part} part, chosen on dev items",
        "",
        written_by("sweep", f"--part {args.part} --preset {args.preset}{lrs_argv(args.lrs)}"
                   f"{device_argv(args)}")
        + f"; the chosen rates are in `{repo_path_text(settings)}`" + runner_reads(args, settings),
        "",
        "Protocol: every family in its final configuration (JACTUS@0.8 with covariance task "
        "directions and mergeable cores, SVD-LLM+LoRA@0.8, LoRA@1.0, DoRA@1.0), tuned on the "
        f"preset's tune items for {cfg.steps} steps, "
        + dev_protocol(parts_by_name, args.orders)
        + f"Selection: the best mean over orders of the {dev_metric(args.part)}.",
        "",
    ]
    tables = ([(HEAD, {"lr": lr_head, **_merge_targets(done, HEAD)})] if lr_head is not None
              else []) + list(chosen.items())
    lrs = sorted({v["lr"] for v in done.values()})
    lines += markdown_header("family", *(f"{lr:g}" for lr in lrs), "chosen")
    lines += [markdown_row(family, *score_cells(args.part, lrs, c["table"], c["lr"]),
                           f"{c['lr']:g}") for family, c in tables]
    lines += ["", sweep_plot(page, args.part, {f: c["table"] for f, c in tables},
                             {f: c["lr"] for f, c in tables}, "learning rate",
                             f"{args.part}: dev score against learning rate "
                             f"({cfg.steps} steps, preset {args.preset})"),
              "", "Why:", ""]
    for family, c in tables:
        ranked = sorted(c["table"].items(), key=lambda kv: -kv[1][0])
        best, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else None
        why = (f"- {family}: {c['lr']:g}, the best mean over {best[1][2]} orders "
               f"({scale * best[1][0]:.3g} ± {abs(scale) * best[1][1]:.2g})")
        if runner_up is not None and runner_up[1][0] == -math.inf:
            why += f"; next {runner_up[0]:g}, whose training diverged"
        elif runner_up is not None:
            why += (f"; next {runner_up[0]:g} at {scale * runner_up[1][0]:.3g} "
                    f"± {abs(scale) * runner_up[1][1]:.2g}")
        if c["edge"]:
            why += "; AT THE EDGE of the grid: extend it (--lrs) before trusting this choice"
        lines.append(why + ".")
    for family, lrs in (short or {}).items():
        lines.append(f"- {family}: NOT chosen; the rates {', '.join(f'{lr:g}' for lr in lrs)} "
                     f"lack some of the {len(set(args.orders))} orders.")
    if lr_head is not None:
        lines += ["", "The head's rate was chosen first (head alone, from the linear probe) and "
                  "is the same for every family."]
    write_sweep_page(page, lines)


def repo_path_text(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_settings(path: Path, part: str, chosen: dict, lr_head, page: Path, args,
                   inherited: dict | None = None) -> dict:
    """Record the chosen rates for the runner (other parts' entries are kept).

    ``inherited`` (the task fraction the families were swept with, read
    from another preset's file) fills the fields the part's entry in
    ``path`` lacks, so that the runner trains at the tau the rates were
    chosen at.
    """
    settings = json.loads(path.read_text()) if path.is_file() else {}
    previous = {**(inherited or {}), **settings.get(part, {})}
    lrs = {**previous.get("lr", {}), **{f: c["lr"] for f, c in chosen.items()}}
    where = repo_path_text(page)
    settings[part] = {
        **previous,  # the task fraction (sweep_tau) and its source are kept
        "lr": lrs,
        "lr_head": lr_head if lr_head is not None else previous.get("lr_head", 1e-3),
        "chosen_by_sweep": True,
        "source": f"{where} (python -m validation.sweep --part {part} --preset {args.preset}"
                  f"{device_argv(args)}, "
                  f"{datetime.now(timezone.utc).date()})",
        "selected_by": ("mean dev accuracy" if part == "vision" else "mean dev answer NLL")
                       + f" over orders {list(args.orders)}, grid {sorted(args.lrs)}",
    }
    write_text_atomic(path, json.dumps(settings, indent=1) + "\n")
    return settings[part]


if __name__ == "__main__":
    main()
