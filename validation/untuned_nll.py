"""Untuned dev answer NLL of a compressed model on the runner's language part.

A diagnostic for choosing the compression settings (task fraction tau, task
directions, damping) on dev items, never on test items: the language part of
a runner preset is built with its dev items as the scored items (as
:mod:`validation.sweep` does), the base model is calibrated once (cached in
``--out``), and each requested configuration is compressed and scored without
tuning. Prints one line per configuration (answer NLL per token of the right
answer, pooled over items, and length-normalised accuracy) and writes
``untuned_nll.json`` in ``--out``.

Usage::

    python -m validation.untuned_nll --retain 0.8 --task-fraction 0 0.1 0.25
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from validation import run_paper


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.untuned_nll", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("default", "full", "smoke"), default="default")
    p.add_argument("--retain", type=float, nargs="+", default=[0.8])
    p.add_argument("--task-fraction", type=float, nargs="+", default=[0.25],
                   help="tau values to compare (0: the weight subspace only)")
    p.add_argument("--directions", nargs="+", default=["covariance"],
                   choices=("covariance", "gradient"))
    p.add_argument("--n-dev", type=int, default=None,
                   help="dev items per task (default: the preset's n_dev)")
    p.add_argument("--calibration-batches", type=int, default=None,
                   help="calibration batches (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (data order)")
    p.add_argument("--base", action="store_true", help="also score the dense base model")
    p.add_argument("--out", type=Path, default=Path("results/untuned-nll"))
    return p


def _summary(metrics: dict) -> tuple[float, float]:
    nll = np.concatenate([np.asarray(v, dtype=float) for v in metrics["answer_nll"].values()])
    acc = np.concatenate([np.asarray(v, dtype=float) for v in metrics["correct"].values()])
    return float(nll.mean()), float(acc.mean())


def main(argv: list[str] | None = None) -> list[dict]:
    """Score every requested configuration; returns the rows written."""
    from jactus_linalg.torch import compress  # noqa: PLC0415

    args = _parser().parse_args(argv)
    preset = run_paper.presets()[args.preset]
    cfg = preset.language
    n_dev = args.n_dev if args.n_dev is not None else cfg.n_dev
    if n_dev < 1:
        msg = f"--n-dev: the {args.preset} preset reserves no dev items; pass --n-dev N"
        raise SystemExit(msg)
    cfg = replace(cfg, n_dev=n_dev)
    if args.calibration_batches is not None:
        cfg = replace(cfg, calibration_batches=args.calibration_batches)
    preset = replace(preset, seeds=(args.seed,))
    args.out.mkdir(parents=True, exist_ok=True)
    config = run_paper.RunConfig(preset=preset, out=args.out, progress=False)
    part = run_paper.build_language(cfg, preset, config, evaluate_on="dev")["language"][0]
    stats, secs = run_paper.statistics_for(part, args.out, f"dev-{args.seed}-cb{cfg.calibration_batches}", False)
    print(f"calibrated in {secs:.0f} s; {len(part.test_items)} dev items", flush=True)
    rows = []
    if args.base:
        nll, acc = _summary(part.evaluate_metrics(part.base))
        rows.append({"config": "base", "dev_answer_nll": nll, "dev_acc_norm": acc})
        print(f"base: dev answer NLL {nll:.3f}, accuracy {100 * acc:.1f}%", flush=True)
    for retain, tau, directions in itertools.product(args.retain, args.task_fraction,
                                                     args.directions):
        start = time.perf_counter()
        model = copy.deepcopy(part.base)
        report = compress(model, stats, retain=retain, method="jactus", task_fraction=tau,
                          task_directions=directions, dtype=cfg.compress_dtype,
                          damping=cfg.damping, progress=False)
        nll, acc = _summary(part.evaluate_metrics(model))
        dense = sum(r.rank is None for r in report.layers)
        row = {"config": f"retain={retain} tau={tau} directions={directions}",
               "retain": retain, "task_fraction": tau, "task_directions": directions,
               "dev_answer_nll": nll, "dev_acc_norm": acc,
               "retain_achieved": report.retain_achieved, "layers_dense": dense,
               "layers": len(report.layers), "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"{row['config']}: dev answer NLL {nll:.3f}, accuracy {100 * acc:.1f}%, "
              f"retain {report.retain_achieved:.4f}, {dense} of {len(report.layers)} dense, "
              f"{row['seconds']:.0f} s", flush=True)
        run_paper.atomic_json(args.out / "untuned_nll.json", rows)
    return rows


if __name__ == "__main__":
    main()
