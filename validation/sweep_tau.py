"""Choose JACTUS's task fraction tau (with its learning rate) on dev items (never a test item).

Protocol
--------
The same as :mod:`validation.sweep` (dev items in neither the tune nor the
test part, the preset's tune items and steps, at least three data orders),
for one family: JACTUS@0.8 in its final configuration (covariance task
directions, mergeable cores on the layers kept dense, the preset's
calibration), tuned at every pair of a task fraction :math:`\\tau` from
``--task-fractions`` and a rate from ``--lrs`` (default: the rate the
learning-rate sweep chose, read from ``--settings``). Selection: the pair
with the best mean over orders of the dev score (accuracy for vision, macro
over targets; minus the answer NLL per token for language, macro over
tasks). :math:`\\tau` sets how much of each layer's rank goes to the
covariances' principal directions, which exist for tuning, so it is chosen
on tuned models, not on the untuned loss.

Outputs: ``--out`` (default ``results/sweep-<part>-tau``) keeps
``sweep.json`` (one entry per tau, rate and order; a rerun resumes, and
the choice is made over every pair in it, so a second command can add
rates at the chosen tau); the
page ``--page`` (default ``docs/results/sweep-<part>-tau.md``); and
``--settings`` gains the part's ``task_fraction`` and JACTUS's rate, read
by the runner.

Usage: ``python -m validation.sweep_tau --part language --task-fractions 0 0.1 0.25 0.5``;
``--preset smoke`` exercises it in seconds. On several cores, ``--jobs N``
sweeps the task fractions in N processes side by side
(:mod:`validation.sweep_lanes`) and makes the choice over all of them;
``--merge-from DIR ...`` first copies the records of other tau sweep folders
into ``--out``, so that nothing they hold is tuned again; a learning-rate
sweep's folder (:mod:`validation.sweep`, such as
``docs/results/records/sweep-language-full``) gives its JACTUS records, each
a tau sweep record at the tau and rate it was tuned with
(:func:`tau_record`): the same model, so it is not tuned twice.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from validation import run_paper
from validation.methods import Method
from validation.report import write_text_atomic
from validation.sweep import (
    ORDERS,
    add_device_argument,
    add_lane_arguments,
    add_statistics_argument,
    at_run_settings,
    default_page,
    dev_metric,
    dev_protocol,
    dev_run,
    dev_score,
    dev_sweep,
    device_argv,
    head_label,
    head_rate,
    markdown_header,
    markdown_row,
    mean_sd_n,
    merge_into_out,
    part_fields,
    part_tag,
    repo_path_text,
    runner_reads,
    score_cells,
    score_scale,
    sweep_name,
    sweep_out,
    sweep_plot,
    threads_of_the_lanes,
    write_sweep_page,
    written_by,
)

TAUS = (0.0, 0.1, 0.25, 0.5)
FAMILY = "JACTUS"


def jactus_method(tau: float) -> Method:
    """JACTUS@0.8 in its final configuration at task fraction ``tau``."""
    return Method("JACTUS@0.8", FAMILY, "jactus", 0.8, (("task_fraction", float(tau)),))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.sweep_tau", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("vision", "language"), default="language")
    p.add_argument("--preset", choices=("default", "full", "smoke"), default="default",
                   help="the runner preset whose tune items, steps and calibration are swept")
    p.add_argument("--task-fractions", type=float, nargs="+", default=list(TAUS))
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="JACTUS rates (default: the rate in --settings)")
    p.add_argument("--orders", type=int, nargs="+", default=list(ORDERS),
                   help="data orders (and initialisation seeds), at least 3")
    p.add_argument("--n-dev", type=int, default=None,
                   help="dev items per task (language) or per target (vision); default: the preset's")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None,
                   help="default docs/results/sweep-<part>-tau.md")
    p.add_argument("--settings", type=Path, default=None,
                   help="where JACTUS's rate is read and the choice written; default: the "
                        "preset's own file (run_paper.preset_settings_file), which must hold the "
                        "part's rates (validation/sweep.py writes them)")
    add_device_argument(p)
    add_statistics_argument(p)
    add_lane_arguments(p, "--task-fractions; each lane calibrates once",
                       "such as docs/results/records/sweep-language-tau-full")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if len(set(args.orders)) < 3:
        msg = f"--orders: the protocol needs at least 3 data orders, got {args.orders}"
        raise SystemExit(msg)
    bad = [t for t in args.task_fractions if not 0.0 <= t <= 1.0]
    if bad:
        msg = f"--task-fractions: every tau must lie in [0, 1]; got {bad}"
        raise SystemExit(msg)
    if args.lrs is not None and any(lr <= 0 for lr in args.lrs):
        msg = f"--lrs: every rate must be positive; got {args.lrs}"
        raise SystemExit(msg)


def table_of(done: dict) -> dict[tuple[float, float], tuple[float, float, int]]:
    """``(tau, lr) -> (mean, sd, orders)`` of the dev score, averaged over targets per order first."""
    pooled: dict[tuple[float, float, int], list[float]] = {}
    for v in done.values():
        pooled.setdefault((v["task_fraction"], v["lr"], v["order"]), []).append(v["score"])
    by_pair: dict[tuple[float, float], list[float]] = {}
    for (tau, lr, _), scores in pooled.items():
        by_pair.setdefault((tau, lr), []).append(float(np.mean(scores)))
    return {pair: mean_sd_n(s)
            for pair, s in sorted(by_pair.items())}


def choose(table: dict) -> tuple[float, float]:
    """The ``(tau, lr)`` with the best mean dev score (ties: the smaller tau, then rate)."""
    return max(table, key=lambda pair: (table[pair][0], -pair[0], -pair[1]))


def tau_settings_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the tau sweep reads JACTUS's rate and where it writes its choice.

    ``--settings`` is both when given. A preset of
    :data:`validation.run_paper.SWEPT_PRESETS` reads and writes its own file
    (:func:`validation.run_paper.preset_settings_file`), which must already
    hold the part's rates: tau is chosen at the rates chosen for the same
    preset, so ``--preset full`` before ``validation.sweep --preset full``
    stops here, naming the command. Another preset (smoke) reads the
    default preset's file and writes ``settings.json`` in its ``--out``.
    """
    if args.settings is not None:
        return args.settings, args.settings
    own = run_paper.preset_settings_file(args.preset)
    if own is None:
        out = sweep_out(args, sweep_name(args, "tau"))
        return run_paper.settings_for(args.preset, args.part), out / "settings.json"
    if not (own.is_file() and args.part in run_paper.tuned_settings(own)):
        msg = (f"--preset {args.preset}: {own.name} has no {args.part} rates of its own; run "
               f"python -m validation.sweep --part {args.part} --preset {args.preset} first, "
               "or pass --settings")
        raise SystemExit(msg)
    return own, own


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep; returns the part's settings as written."""
    args = _parser().parse_args(argv)
    _check_args(args)
    with threads_of_the_lanes(args.jobs):
        return sweep(args)


def sweep(args: argparse.Namespace) -> dict:
    """:func:`main` after parsing and checking ``args``."""
    preset = run_paper.presets()[args.preset]
    read_from, settings = tau_settings_files(args)
    cfg = run_paper.with_learning_rates(args.part, getattr(preset, args.part), read_from)
    lrs = sorted(args.lrs) if args.lrs is not None else [cfg.lrs[FAMILY]]
    merged_from = list(args.merge_from)  # the page names them
    merged = merge_tau_records(args)
    if args.jobs > 1:
        sweep_in_lanes(args, lrs, cfg.steps, read_from, merged)
    cfg, sweep_dir = dev_sweep(args, cfg, preset, sweep_name(args, "tau"))
    _, _, parts_by_name, done_path, done = sweep_dir
    stats_cache: dict = {}
    head = head_rate(args.part, cfg)  # the rate records are made with (None: no head)
    for parts in parts_by_name.values():
        shared = run_paper.SeedShare()
        for tau in args.task_fractions:
            for lr in lrs:
                local = replace(cfg, lrs={**cfg.lrs, FAMILY: lr}, task_fraction=tau)
                for part in parts:
                    label = tau_label(tau, lr, head, cfg.steps, part_tag(part))
                    if label in done:
                        continue
                    rec = dev_run(part, jactus_method(tau), local, preset.split_seed,
                                  sweep_dir, stats_cache, shared, label)
                    score, acc = dev_score(args.part, rec)
                    done[label] = {"task_fraction": tau, "lr": lr, **part_fields(part),
                                   "preset": args.preset,
                                   "steps": cfg.steps, "lr_head": head, "score": score, "dev_accuracy": acc,
                                   "trainable_params": rec["trainable_params"],
                                   "retain_achieved": rec["retain_achieved"],
                                   "seconds": rec["wall_time_s"]}
                    run_paper.atomic_json(done_path, done)
                    print(f"{label}: dev score {score:.4f} (accuracy {100 * acc:.1f}%)",
                          flush=True)
    # every (tau, rate) in --out at the preset's steps and head rate: a rerun adds rates or taus
    table = table_of(at_run_settings(done, parts_by_name, cfg.steps, head))
    tau, lr = choose(table)
    page = args.page or default_page(args, sweep_dir.out, "tau")
    write_page(page, args, cfg, table, (tau, lr), parts_by_name, settings, merged_from)
    return write_settings(settings, args.part, tau, lr, page, args,
                          sorted({t for t, _ in table}))


def tau_label(tau: float, lr: float, lr_head: float | None, steps: int, part: str) -> str:
    """A tau sweep record's label: ``tau=<tau> lr=<rate>[ head=<rate>] steps=<n> <part tag>``."""
    return f"tau={tau:g} lr={lr:g}{head_label(lr_head)} steps={steps} {part}"


def tau_record(label: str, rec: dict) -> tuple[str, dict] | None:
    """``(label, rec)`` as a tau sweep record, or ``None`` when it is not one.

    A tau sweep's own record (it names no family) is kept as it is. A
    learning-rate sweep's JACTUS record that says its task fraction is the
    model this sweep would tune at that tau and rate (the same method,
    preset, data order and calibration), so it becomes the record this
    sweep would have written, under this sweep's label, without its
    ``family``; the other families' records are left out.
    """
    if "family" not in rec:
        return label, rec
    if rec["family"] != FAMILY or "task_fraction" not in rec:
        return None
    steps = f" steps={rec['steps']} "
    if steps not in label:
        msg = f"--merge-from: {label!r} does not end in {steps.strip()!r} and a part"
        raise SystemExit(msg)
    tail = label.split(steps, 1)[1]
    return (tau_label(rec["task_fraction"], rec["lr"], rec.get("lr_head"), rec["steps"], tail),
            {k: v for k, v in rec.items() if k != "family"})


def merge_tau_records(args: argparse.Namespace) -> int:
    """``--merge-from``: the folders' tau records (:func:`tau_record`) into ``--out``'s ``sweep.json``.

    Before the lanes start, so that they (and this process) find them
    there; ``args.merge_from`` is then emptied. Returns how many were added.
    """
    if not args.merge_from:
        return 0
    out = sweep_out(args, sweep_name(args, "tau"))
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "sweep.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    added = merge_into_out(done, done_path, args.merge_from, args.preset, tau_record)
    args.merge_from = []
    return added


def models_recorded(done: dict, taus, lrs, steps: int) -> int:
    """How many of the tau sweep's models (``taus`` x ``lrs`` at ``steps`` steps) ``done`` holds."""
    return sum(v.get("task_fraction") in taus and v.get("lr") in lrs and v.get("steps") == steps
               for v in done.values())


def sweep_in_lanes(args: argparse.Namespace, lrs: list[float], steps: int, read_from: Path,
                   merged: int = 0) -> None:
    """``--jobs N``: the task fractions in N processes (:mod:`validation.sweep_lanes`).

    Each lane sweeps a contiguous group of ``--task-fractions`` at ``lrs``
    (every lane calibrates once, in its own folder). Their records, with
    those of ``--merge-from`` (``merged`` of them already in ``--out``:
    :func:`merge_tau_records`), end in ``--out``'s ``sweep.json``; the
    caller then finds nothing left to tune and chooses.
    """
    from validation import sweep_lanes  # noqa: PLC0415

    out = sweep_out(args, sweep_name(args, "tau"))
    out.mkdir(parents=True, exist_ok=True)
    groups = sweep_lanes.contiguous_groups(list(args.task_fractions), args.jobs)
    folders = sweep_lanes.lane_folders(out, len(groups), read_from)
    taus, rates = set(args.task_fractions), set(lrs)

    def count(done: dict) -> int:
        return models_recorded(done, taus, rates, steps)

    rate_argv = ["--lrs", *(f"{lr:g}" for lr in lrs)]
    argvs = [[*sweep_lanes.shared_lane_argv(args, folder, out), *rate_argv,
              "--task-fractions", *(f"{t:g}" for t in group)]
             for group, folder in zip(groups, folders, strict=True)]
    total = len(taus) * len(rates) * len(set(args.orders)) * sweep_lanes.dev_parts_per_order(args)
    lanes = sweep_lanes.Lanes("validation.sweep_tau", folders, argvs,
                              ["tau " + ",".join(f"{t:g}" for t in g) for g in groups], count, total)
    sweep_lanes.sweep_with_lanes(args, out, lanes, merged)


def write_page(page: Path, args, cfg, table: dict, chosen: tuple[float, float],
               parts_by_name: dict, settings: Path, merged_from: list[Path]) -> None:
    """The sweep's page: the protocol, the dev score of every (tau, rate), what was chosen.

    ``merged_from``: the ``--merge-from`` folders whose records it read.
    """
    scale, digits = score_scale(args.part)
    lrs = sorted({lr for _, lr in table})
    taus = sorted({t for t, _ in table})
    argv = " ".join(["--part", args.part, "--preset", args.preset, "--task-fractions",
                     *[f"{t:g}" for t in args.task_fractions]]
                    + (["--lrs", *[f"{lr:g}" for lr in args.lrs]] if args.lrs else []))
    lines = [
        f"# Task fraction of the {args.part} part, chosen on dev items",
        "",
        written_by("sweep_tau", argv + device_argv(args)) + "; the chosen task fraction and JACTUS's rate are in "
        f"`{repo_path_text(settings)}`" + runner_reads(args, settings),
        "",
        "Protocol: JACTUS@0.8 in its final configuration (covariance task directions, mergeable "
        f"cores on the layers kept dense, {cfg.calibration_batches} calibration batches), tuned "
        f"on the preset's tune items for {cfg.steps} steps at every task fraction and rate "
        "below, " + dev_protocol(parts_by_name, args.orders)
        + f"Selection: the best mean over orders of the {dev_metric(args.part)}, over every "
        "(tau, rate) pair swept into the same folder; cells are mean ± sd over orders (-: not "
        "run).",
        "",
        *markdown_header("tau", *(f"lr {lr:g}" for lr in lrs)),
    ]
    for t in taus:
        row = {lr: table[(t, lr)] for lr in lrs if (t, lr) in table}
        bold = chosen[1] if chosen[0] == t else None
        lines.append(markdown_row(f"{t:g}", *score_cells(args.part, lrs, row, bold)))
    curves = {f"lr {lr:g}": {t: table[(t, lr)] for t in taus if (t, lr) in table} for lr in lrs}
    if merged_from:
        lines += ["", "Records read from earlier sweeps (`--merge-from`, not tuned again here): "
                  + ", ".join(f"`{repo_path_text(f)}`" for f in merged_from)
                  + "; a learning-rate sweep's JACTUS models count at the tau and rate they were "
                  "tuned with (the same model)."]
    lines += ["", sweep_plot(page, args.part, curves, {f"lr {chosen[1]:g}": chosen[0]},
                             "task fraction tau",
                             f"{args.part}: dev score against tau ({cfg.steps} steps, "
                             f"preset {args.preset})", log_x=False)]
    ranked = sorted(table.items(), key=lambda kv: -kv[1][0])
    (best, (mean, sd, n)) = ranked[0]
    why = (f"Chosen: tau = {best[0]:g} at rate {best[1]:g}, the best mean over {n} orders "
           f"({scale * mean:.{digits}f} ± {abs(scale) * sd:.{digits}f})")
    if len(ranked) > 1:
        (nxt, (m2, s2, _)) = ranked[1]
        why += (f"; next tau = {nxt[0]:g} at {nxt[1]:g} "
                f"({scale * m2:.{digits}f} ± {abs(scale) * s2:.{digits}f})")
    # 0 and 1 bound tau itself: a choice there is not at the edge of a grid that could grow
    edge = len(taus) > 2 and best[0] in (taus[0], taus[-1]) and best[0] not in (0.0, 1.0)
    lines += ["", why + "." + (" AT THE EDGE of the tau grid: extend it before trusting this "
                               "choice." if edge else "")]
    write_sweep_page(page, lines)


def write_settings(path: Path, part: str, tau: float, lr: float, page: Path, args,
                   taus: list[float] | None = None) -> dict:
    """Record the chosen task fraction and JACTUS rate for the runner (other entries kept)."""
    settings = json.loads(path.read_text()) if path.is_file() else {}
    entry = settings.setdefault(part, {})
    entry.setdefault("lr", {})[FAMILY] = lr
    entry["task_fraction"] = tau
    where = repo_path_text(page)
    entry["task_fraction_source"] = (
        f"{where} (python -m validation.sweep_tau --part {part} --preset {args.preset}"
        f"{device_argv(args)}, "
        f"{datetime.now(timezone.utc).date()}; mean dev "
        + ("accuracy" if part == "vision" else "answer NLL")
        + f" over orders {list(args.orders)}, tau grid "
        f"{taus if taus is not None else sorted(args.task_fractions)})"
    )
    write_text_atomic(path, json.dumps(settings, indent=1) + "\n")
    return entry


if __name__ == "__main__":
    main()
