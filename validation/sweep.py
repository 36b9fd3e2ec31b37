"""Choose the runner's defaults on the tune split only (never the test items).

The tune part is split again into a train part and a dev part; every
configuration is tuned on the train part and scored on the dev part, with
the same steps, data order and seed as ``run_paper.py``. Grids:

1. the learning rate of every method family (JACTUS cores, compress-then-LoRA,
   LoRA, DoRA) at retain 0.8;
2. for JACTUS at its best learning rate: the task fraction, the damping and
   whether layers may stay dense (``keep_dense``).

Usage: ``python validation/sweep.py --part vision`` (or ``python -m
validation.sweep --part vision``; a few minutes) or
``--part language`` (about an hour on 2 cores). Writes ``sweep.json`` and
``sweep.md`` under ``--out`` (default ``results/sweep-<part>``) and resumes
from finished configurations.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from validation import run_paper
from validation.methods import Method
from validation.report import macro_average, write_text_atomic

LRS = (3e-4, 1e-3, 3e-3, 1e-2)
TAUS = (0.0, 0.1, 0.25, 0.5)
DAMPINGS = (1e-3, 1e-2, 1e-1)


def build_dev_part(name: str, cfg, seed: int, *, dev_per_task: int = 8, dev_size: int = 100):
    """The part with its evaluation set replaced by held-back tune items.

    ``dev_per_task`` language items per task, or ``dev_size`` vision images,
    are held back from the tune part and scored instead of the test part.
    """
    if name == "language":
        from validation.assets import load_smollm2  # noqa: PLC0415
        from validation.parts import LanguagePart  # noqa: PLC0415

        model, tokenizer = load_smollm2()
        return LanguagePart(
            model, tokenizer, n_tune=cfg.n_tune, n_test=cfg.n_test, seed=seed,
            batch_size=cfg.batch_size, max_length=cfg.max_length,
            calibration_batches=cfg.calibration_batches, eval_batch_size=cfg.eval_batch_size,
            settings={}, dev_per_task=dev_per_task,
        )
    from validation import vision  # noqa: PLC0415
    from validation.parts import VisionPart  # noqa: PLC0415

    model = vision.replace_head(vision.pretrained_vit(seed=seed), num_labels=10, seed=seed)
    task = vision.digits_task(seed=seed, n_tune=cfg.n_tune, n_test=cfg.n_test)
    dev = dev_size
    held = vision.DigitsTask(task.tune_x[:-dev], task.tune_y[:-dev], task.tune_ids[:-dev],
                             task.tune_x[-dev:], task.tune_y[-dev:], task.tune_ids[-dev:])
    return VisionPart(model, held, task_name="digits", seed=seed, batch_size=cfg.batch_size,
                      calibration_batches=cfg.calibration_batches, probe_steps=cfg.probe_steps,
                      probe_lr=cfg.probe_lr, settings={})


def configurations(best_core_lr: float | None, lrs=LRS, taus=TAUS, dampings=DAMPINGS,
                   keeps=(True, False), stage1_keep: bool | None = None):
    """(label, method, learning rate, damping) to try; stage 2 needs stage 1's best core lr.

    ``stage1_keep`` sets ``keep_dense`` for the stage-1 JACTUS rows (named in
    their label); ``None`` leaves the package default (keep layers dense).
    """
    out = []
    for lr in lrs:
        if stage1_keep is None:
            out.append((f"JACTUS lr={lr:g}", Method("JACTUS@0.8", "JACTUS", "jactus", 0.8), lr, None))
        else:
            out.append((f"JACTUS lr={lr:g} keep_dense={stage1_keep}",
                        Method("JACTUS@0.8", "JACTUS", "jactus", 0.8,
                               (("keep_dense", stage1_keep),)), lr, None))
        out.append((f"SVD-LLM+LoRA lr={lr:g}", Method("SVD-LLM+LoRA@0.8", "SVD-LLM+LoRA", "ctf", 0.8,
                                                       (("compression", "svd-llm"),)), lr, None))
        out.append((f"LoRA lr={lr:g}", Method("LoRA@1.0", "LoRA", "lora"), lr, None))
        out.append((f"DoRA lr={lr:g}", Method("DoRA@1.0", "DoRA", "dora"), lr, None))
    if best_core_lr is None:
        return out
    lr = best_core_lr
    for tau in taus:
        for damping in dampings:
            for keep in keeps:
                opts = (("task_fraction", tau), ("keep_dense", keep))
                label = f"JACTUS lr={lr:g} tau={tau:g} damping={damping:g} keep_dense={keep}"
                out.append((label, Method("JACTUS@0.8", "JACTUS", "jactus", 0.8, opts), lr, damping))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("vision", "language"), default="vision")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dev-size", type=int, default=100, help="vision: held-back tune images")
    p.add_argument("--dev-per-task", type=int, default=8, help="language: held-back items per task")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    p.add_argument("--dampings", type=float, nargs="+", default=list(DAMPINGS))
    p.add_argument("--keep-dense", type=int, nargs="+", default=[1, 0], help="1 and/or 0")
    p.add_argument("--stage1-keep-dense", type=int, choices=(0, 1), default=None,
                   help="keep_dense for the stage-1 JACTUS rows (default: the package's)")
    p.add_argument("--families", default=None,
                   help="comma-separated method families to run (e.g. JACTUS,SVD-LLM+LoRA)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    grid = {"lrs": tuple(args.lrs), "taus": tuple(args.taus), "dampings": tuple(args.dampings),
            "keeps": tuple(bool(k) for k in args.keep_dense)}
    preset = run_paper.presets()["default"]
    cfg = getattr(preset, args.part)
    out = args.out or Path("results") / f"sweep-{args.part}"
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "sweep.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    part = build_dev_part(args.part, cfg, preset.seed, dev_per_task=args.dev_per_task, dev_size=args.dev_size)
    stats = None
    progress = not args.no_progress

    def run(label, method, lr, damping):
        nonlocal stats
        if label in done:
            return done[label]["dev_accuracy"]
        if stats is None:
            stats, _ = run_paper.statistics_for(part, out, "dev", progress)
        local = replace(cfg, lr_core=lr, lr_adapter=lr, damping=damping or cfg.damping)
        start = time.perf_counter()
        rec = run_paper.run_method(part, method, local, stats, preset.seed, progress)
        acc = macro_average({t: np.asarray(v) for t, v in rec["correct"].items()})
        done[label] = {"dev_accuracy": acc, "lr": lr, "damping": local.damping,
                       "options": method.opts, "family": method.family,
                       "trainable_params": rec["trainable_params"],
                       "retain_achieved": rec["retain_achieved"],
                       "seconds": time.perf_counter() - start}
        run_paper.atomic_json(done_path, done)
        print(f"{label}: dev accuracy {100 * acc:.1f}%", flush=True)
        return acc

    keep1 = None if args.stage1_keep_dense is None else bool(args.stage1_keep_dense)
    families = None if args.families is None else {f.strip() for f in args.families.split(",")}
    for label, method, lr, damping in configurations(None, **grid, stage1_keep=keep1):
        if families is None or method.family in families:
            run(label, method, lr, damping)
    core = {k: v for k, v in done.items() if k.startswith("JACTUS lr=") and "tau" not in k}
    best_lr = max(core.values(), key=lambda v: v["dev_accuracy"])["lr"]
    if args.stage == 2:
        for label, method, lr, damping in configurations(best_lr, **grid)[4 * len(grid["lrs"]):]:
            run(label, method, lr, damping)
    write_summary(out, done, args.part)


def write_summary(out: Path, done: dict, part: str) -> None:
    lines = [f"# Hyperparameter sweep on the tune split: {part}", "",
             "Dev accuracy (held-back tune items; test items never used).", "",
             "| configuration | dev acc (%) | trainable | retain |", "|---|---|---|---|"]
    best: dict[str, tuple[str, float]] = {}
    for label, v in done.items():
        lines.append(f"| {label} | {100 * v['dev_accuracy']:.1f} | {v['trainable_params']:,} | "
                     f"{v['retain_achieved']:.3f} |")
        fam = v["family"]
        if fam not in best or v["dev_accuracy"] > best[fam][1]:
            best[fam] = (label, v["dev_accuracy"])
    lines += ["", "Best per family:", ""]
    lines += [f"- {fam}: {label} ({100 * acc:.1f}%)" for fam, (label, acc) in best.items()]
    write_text_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-len(best) - 1 :]), flush=True)


if __name__ == "__main__":
    main()
