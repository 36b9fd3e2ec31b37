"""Check the number of tuning steps on dev items (never a test item).

Protocol
--------
The same as :mod:`validation.sweep` (dev items in neither the tune nor the
test part, the preset's tune items, at least three data orders): every
family in its final configuration, at the rate (and, for JACTUS, the task
fraction) recorded in ``--settings``, is tuned for each step count in
``--steps`` and scored on the dev items (accuracy for vision, macro over
targets; minus the answer NLL per token for language, macro over tasks).

The page answers two questions: which step count has the best dev score,
mean over families (:func:`choose`; ties go to fewer steps), and whether
the ranking of the families depends on the step count. The rates were
chosen at the preset's own steps; the page says so, and flags a best step
count other than the preset's (the rates would then need a sweep at the new
step count, ``python -m validation.sweep``, before the preset changes).

Outputs: ``--out`` (default ``results/sweep-<part>-steps``) keeps
``sweep.json``, one entry per (family, rate, tau, steps, order, target), so
a rerun resumes, and a rerun after the rates changed tunes again (the page
uses the records at the current rates only); the page ``--page`` (default ``docs/results/sweep-<part>-steps.md``).
Nothing is written to the settings file.

Usage: ``python -m validation.sweep_steps --part vision --steps 75 150 300``;
``--preset smoke`` exercises it in seconds.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from validation import run_paper
from validation.sweep import (
    FAMILY_METHODS,
    ORDERS,
    add_device_argument,
    add_statistics_argument,
    default_page,
    dev_metric,
    dev_protocol,
    dev_run,
    dev_score,
    dev_sweep,
    device_argv,
    final_method,
    head_label,
    head_rate,
    markdown_header,
    markdown_row,
    mean_sd_n,
    on_current_bases,
    part_fields,
    part_tag,
    repo_path_text,
    score_cells,
    score_scale,
    sweep_name,
    tau_label,
    write_sweep_page,
    written_by,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.sweep_steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("vision", "language"), default="vision")
    p.add_argument("--preset", choices=("default", "full", "smoke"), default="default",
                   help="the runner preset whose tune items, rates and calibration are used")
    p.add_argument("--steps", type=int, nargs="+", required=True,
                   help="step counts to compare (include the preset's own)")
    p.add_argument("--orders", type=int, nargs="+", default=list(ORDERS),
                   help="data orders (and initialisation seeds), at least 3")
    p.add_argument("--families", default=",".join(FAMILY_METHODS),
                   help="comma-separated families")
    p.add_argument("--n-dev", type=int, default=None,
                   help="dev items per target (vision) or per task (language); default: the preset's")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None,
                   help="default docs/results/sweep-<part>-steps.md")
    p.add_argument("--settings", type=Path, default=None,
                   help="where the rates and tau are read (not written); default: what the "
                        "runner reads for --preset (run_paper.settings_for)")
    add_device_argument(p)
    add_statistics_argument(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> list[str]:
    """The families to run; ``SystemExit`` naming the argument on a bad value."""
    if len(set(args.orders)) < 3:
        msg = f"--orders: the protocol needs at least 3 data orders, got {args.orders}"
        raise SystemExit(msg)
    bad = [s for s in args.steps if s < 1]
    if bad:
        msg = f"--steps: every step count must be at least 1; got {bad}"
        raise SystemExit(msg)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILY_METHODS)
    if unknown or not families:
        msg = f"--families: unknown {sorted(unknown)}; choose from {list(FAMILY_METHODS)}"
        raise SystemExit(msg)
    return families


def at_settings(done: dict, parts_by_name: dict, current: dict[str, tuple]) -> dict:
    """The records made on the current dev parts at each family's ``(rate, task fraction, head rate)``.

    Records made from another pretrained model (:func:`validation.sweep.on_current_bases`)
    are kept in the folder but not used.
    """
    return {k: v for k, v in on_current_bases(done, parts_by_name).items()
            if v["family"] in current
            and (v["lr"], v.get("task_fraction"), v.get("lr_head")) == current[v["family"]]}


def table_of(done: dict) -> dict[tuple[str, int], tuple[float, float, int]]:
    """``(family, steps) -> (mean, sd, orders)`` of the dev score, averaged over targets per order first."""
    pooled: dict[tuple[str, int, int], list[float]] = {}
    for v in done.values():
        pooled.setdefault((v["family"], v["steps"], v["order"]), []).append(v["score"])
    by_cell: dict[tuple[str, int], list[float]] = {}
    for (family, steps, _), scores in pooled.items():
        by_cell.setdefault((family, steps), []).append(float(np.mean(scores)))
    return {cell: mean_sd_n(s)
            for cell, s in sorted(by_cell.items())}


def choose(table: dict) -> int:
    """The step count with the best dev score, mean over families (ties: fewer steps).

    Only step counts that every family in the table ran are compared.
    """
    families = {f for f, _ in table}
    common = [s for s in sorted({s for _, s in table})
              if all((f, s) in table for f in families)]
    if not common:
        msg = "no step count was run for every family"
        raise SystemExit(msg)
    return max(common, key=lambda s: (np.mean([table[(f, s)][0] for f in families]), -s))


def rankings(table: dict) -> dict[int, list[str]]:
    """Families from best to worst mean dev score, at each step count."""
    out: dict[int, list[str]] = {}
    for steps in sorted({s for _, s in table}):
        cells = [(f, table[(f, s)][0]) for f, s in table if s == steps]
        out[steps] = [f for f, _ in sorted(cells, key=lambda kv: -kv[1])]
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the check; returns ``{"steps": best, "table": ..., "rankings": ...}``."""
    args = _parser().parse_args(argv)
    families = _check_args(args)
    preset = run_paper.presets()[args.preset]
    read_from = args.settings or run_paper.settings_for(args.preset, args.part)
    cfg = run_paper.with_learning_rates(args.part, getattr(preset, args.part), read_from)
    preset_steps = cfg.steps
    cfg, sweep_dir = dev_sweep(args, cfg, preset, sweep_name(args, "steps"))
    _, _, parts_by_name, done_path, done = sweep_dir
    stats_cache: dict = {}
    head = head_rate(args.part, cfg)  # the rate records are made with (None: no head)
    for family in families:
        method = final_method(family, cfg.task_fraction)
        for parts in parts_by_name.values():
            shared = run_paper.SeedShare()
            for steps in sorted(set(args.steps)):
                local = replace(cfg, steps=steps)
                for part in parts:
                    label = (f"{family} lr={cfg.lrs[family]:g}{tau_label(method)}"
                             f"{head_label(head)} steps={steps} {part_tag(part)}")
                    if label in done:
                        continue
                    rec = dev_run(part, method, local, preset.split_seed, sweep_dir,
                                  stats_cache, shared, label)
                    score, acc = dev_score(args.part, rec)
                    done[label] = {"family": family, "steps": steps, "lr": cfg.lrs[family],
                                   "task_fraction": method.opts.get("task_fraction"),
                                   "lr_head": head,
                                   **part_fields(part),
                                   "score": score,
                                   "dev_accuracy": acc, "seconds": rec["wall_time_s"]}
                    run_paper.atomic_json(done_path, done)
                    print(f"{label}: dev score {score:.4f} (accuracy {100 * acc:.1f}%)", flush=True)
    current = {f: (cfg.lrs[f], final_method(f, cfg.task_fraction).opts.get("task_fraction"),
                   head) for f in FAMILY_METHODS}
    # records made at other rates or from another pretrained model are kept, not used
    table = table_of(at_settings(done, parts_by_name, current))
    best = choose(table)
    page = args.page or default_page(args, sweep_dir.out, "steps")
    write_page(page, args, cfg, preset_steps, table, best, parts_by_name)
    return {"steps": best, "table": table, "rankings": rankings(table)}


def write_page(page: Path, args, cfg, preset_steps: int, table: dict, best: int,
               parts_by_name: dict) -> None:
    """The check's page: the protocol, every family's dev score per step count, the verdict."""
    scale, digits = score_scale(args.part)
    read_from = args.settings or run_paper.settings_for(args.preset, args.part)
    steps_grid = sorted({s for _, s in table})
    families = sorted({f for f, _ in table}, key=list(FAMILY_METHODS).index)
    argv = " ".join(["--part", args.part, "--preset", args.preset, "--steps",
                     *map(str, args.steps)])
    lines = [
        f"# Tuning steps of the {args.part} part, checked on dev items",
        "",
        written_by("sweep_steps", argv + device_argv(args)) + ".",
        "",
        "Protocol: every family in its final configuration, at the rate (and, for JACTUS, the "
        f"task fraction) in `{repo_path_text(read_from)}`, "
        + ", ".join(f"{f} {cfg.lrs[f]:g}" for f in families)
        + f", tuned on the {args.preset} preset's tune items for each step count below, "
        + dev_protocol(parts_by_name, args.orders)
        + f"Cells: {dev_metric(args.part)}, mean ± sd over orders (-: not run).",
        "",
        *markdown_header("family", *(f"{s} steps" for s in steps_grid)),
    ]
    for f in families:
        row = {s: table[(f, s)] for s in steps_grid if (f, s) in table}
        own_best = max(row, key=lambda s: (row[s][0], -s))
        lines.append(markdown_row(f, *score_cells(args.part, steps_grid, row, own_best)))
    means = {s: float(np.mean([table[(f, s)][0] for f in families if (f, s) in table]))
             for s in steps_grid}
    lines.append("| mean over families | "
                 + " | ".join(f"{scale * means[s]:.{digits}f}" for s in steps_grid) + " |")
    ranks = rankings(table)
    lines += ["", "Families from best to worst dev score at each step count:", ""]
    lines += [f"- {s} steps: " + " > ".join(ranks[s]) for s in steps_grid]
    same = len({tuple(r) for r in ranks.values()}) == 1
    largest_sd = max(sd for _, sd, _ in table.values())
    lines += ["", f"Best step count, mean over families: **{best}** (bold cells: each family's "
              "own best). The ranking of the families "
              + ("is the same at every step count." if same else "changes with the step count.")
              + f" The largest sd over orders in the table is {abs(scale) * largest_sd:.{digits}f}: "
              "differences smaller than that do not separate two cells."]
    if best == preset_steps:
        lines.append(f"The preset's {preset_steps} steps are the best of the grid on dev items.")
    else:
        lines.append(f"The preset tunes for {preset_steps} steps, not the best of the grid on dev "
                     f"items ({best}); its rates were chosen at {preset_steps} steps, so a change "
                     "of steps needs the rates swept again at the new count first.")
    if best == steps_grid[-1] and len(steps_grid) > 1:
        lines.append("AT THE EDGE of the grid: more steps may score better still.")
    write_sweep_page(page, lines)


if __name__ == "__main__":
    main()
