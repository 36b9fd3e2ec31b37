"""Benchmark ``calibration``: ``calibrate`` against a plain forward and backward over the same batches.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from validation.bench_machine import BenchResult, Row, medians, paired_ratio, profiled_once, rounds, say
from validation.bench_problems import build_vit, vit_config


@dataclass
class VitSetup:
    """A ViT, its calibration batches and loss, shared by benchmarks 3 and 4."""

    model: object
    batches: list
    loss_fn: Callable
    label: str
    stats: object = None


def vit_setup(args: argparse.Namespace) -> VitSetup:
    """ViT-Base widths (768/3072, 12 heads, 197 tokens) with ``--vit-layers`` layers."""
    import torch

    config = vit_config(args.quick, None if args.quick else args.vit_layers)
    model = build_vit(config)
    gen = torch.Generator().manual_seed(1)
    size = (args.batch, config.num_channels, config.image_size, config.image_size)
    batches = [
        {"pixel_values": torch.randn(size, generator=gen),
         "labels": torch.randint(0, config.num_labels, (args.batch,), generator=gen)}
        for _ in range(args.batches)
    ]
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    label = (f"ViT {config.hidden_size}/{config.intermediate_size}, {config.num_hidden_layers} "
             f"layers, batch {args.batch}x{tokens} tokens")
    return VitSetup(model, batches, lambda m, b: m(**b).loss, label)


def plain_pass(setup: VitSetup) -> None:
    """Forward + backward over every batch (all parameters require grad), no statistics."""
    for batch in setup.batches:
        setup.loss_fn(setup.model, batch).backward()
        setup.model.zero_grad(set_to_none=True)


def calibrate_pass(setup: VitSetup) -> None:
    """``calibrate`` over the same batches; keeps the statistics for benchmark 4."""
    from jactus_linalg.torch import calibrate

    setup.stats = calibrate(setup.model, setup.batches, setup.loss_fn, progress=False)


def bench_calibration(args: argparse.Namespace, setup: VitSetup) -> BenchResult:
    """Target 3: calibrate over N batches <= 1.6x a plain forward+backward."""
    res = BenchResult("calibration", "calibration overhead against a plain forward+backward")
    say(f"  calibration: {setup.label}, {len(setup.batches)} batches, {args.repeat} round(s)")
    plain_pass(setup)  # warm-up (allocator, MKL/oneDNN kernels)
    fns = {"plain": lambda: plain_pass(setup),
           "calibrate": profiled_once(lambda: calibrate_pass(setup), res.profiles, "calibrate")}
    times = rounds(fns, args.repeat)
    metric = f"calibrate / plain fwd+bwd ({len(setup.batches)} batches)"
    res.rows = [Row("calibration", setup.label, metric,
                    paired_ratio(times, "calibrate", "plain"), 1.6, "<=", profile="calibrate")]
    res.details = {"median_s": medians(times), "times_s": times, "model": setup.label}
    res.notes.append(
        "plain = loss.backward() with every parameter requiring grad, eval mode, grads dropped "
        "after each batch; calibrate = jactus_linalg.torch.calibrate (float64 statistics, "
        "gradients to target weights only, eval mode)"
    )
    return res
