"""Benchmark ``deployed``: forward latency, a cores-only training step against peft LoRA, optimizer memory.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import argparse
import copy
import math

from validation.bench_calibration import VitSetup, calibrate_pass
from validation.bench_machine import BenchResult, Row, medians, paired_ratio, rounds, say
from validation.bench_problems import LORA_RANK


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (AdamW: exp_avg, exp_avg_sq, step)."""
    import torch

    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def train_step(model, optimizer, batch, loss_fn) -> None:
    """One optimizer step on one batch."""
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    optimizer.step()


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def deployed_models(setup: VitSetup, retain: float):
    """``(dense, compressed, lora)``: copies of the setup's model (calibrates if needed)."""
    from jactus_linalg.torch import compress, lora_model, mark_trainable

    if setup.stats is None:
        calibrate_pass(setup)
    dense = copy.deepcopy(setup.model).eval()
    compressed = copy.deepcopy(setup.model).eval()
    report = compress(compressed, setup.stats, retain=retain, progress=False)
    mark_trainable(compressed, extra="classifier")
    lora = lora_model(copy.deepcopy(setup.model), rank=LORA_RANK, modules_to_save=["classifier"])
    lora.eval()
    return dense, compressed, lora, report


def bench_deployed(args: argparse.Namespace, setup: VitSetup) -> BenchResult:
    """Target 4: compressed forward <= dense; core-only step <= LoRA step; optimizer memory."""
    import torch

    from jactus_linalg.torch import merge

    res = BenchResult("deployed", "deployed model: latency, training step, optimizer state")
    say(f"  deployed: {setup.label}, compress at retain 0.8, {args.repeat} round(s)")
    dense, compressed, lora, report = deployed_models(setup, 0.8)
    batch = setup.batches[0]
    deployed = merge(copy.deepcopy(compressed))  # as deployed: dense layers' cores folded in
    with torch.inference_mode():
        fwd = {"dense": lambda: dense(pixel_values=batch["pixel_values"]),
               "compressed": lambda: deployed(pixel_values=batch["pixel_values"]),
               "unmerged": lambda: compressed(pixel_values=batch["pixel_values"])}
        for f in fwd.values():
            f()  # warm-up
        fwd_times = rounds(fwd, args.repeat)
    opts = {"cores": torch.optim.AdamW(trainable(compressed), lr=1e-4),
            "lora": torch.optim.AdamW(trainable(lora), lr=1e-4)}
    step = {"cores": lambda: train_step(compressed, opts["cores"], batch, setup.loss_fn),
            "lora": lambda: train_step(lora, opts["lora"], batch, setup.loss_fn)}
    for f in step.values():
        f()  # warm-up; creates the AdamW states
    step_times = rounds(step, args.repeat)
    res.rows = [
        Row("deployed", setup.label, "forward: compressed@0.8, merged (deployed) / dense",
            paired_ratio(fwd_times, "compressed", "dense"), 1.0, "<="),
        Row("deployed", setup.label, "forward: compressed@0.8 while tuning (unmerged) / dense, "
            "no target", paired_ratio(fwd_times, "unmerged", "dense"), math.inf, "<="),
        Row("deployed", setup.label, f"train step: cores only / peft LoRA r={LORA_RANK}",
            paired_ratio(step_times, "cores", "lora"), 1.0, "<="),
    ]
    memory = {k: {"trainable_params": sum(p.numel() for p in trainable(m)),
                  "adamw_formula_bytes": 2 * 4 * sum(p.numel() for p in trainable(m)),
                  "adamw_measured_bytes": optimizer_state_bytes(opts[k])}
              for k, m in (("cores", compressed), ("lora", lora))}
    res.details = {"forward_median_s": medians(fwd_times), "step_median_s": medians(step_times),
                   "forward_times_s": fwd_times, "step_times_s": step_times, "memory": memory,
                   "retain_achieved": report.retain_achieved,
                   "dense_layers": sum(r.rank is None for r in report.layers)}
    res.notes.append(
        f"compressed with calibrate statistics of benchmark 3 (retain achieved "
        f"{report.retain_achieved:.4f}, {res.details['dense_layers']} of "
        f"{len(report.layers)} targets kept dense, each with a mergeable core at its "
        "break-even rank that trains with the factored layers' cores and is folded into the "
        "weight by merge() for the deployed forward); both step variants train their "
        "classifier head too; "
        f"AdamW state = 2 x trainable x 4 bytes: cores {_memory(memory['cores'])}, "
        f"LoRA r={LORA_RANK} {_memory(memory['lora'])}"
    )
    return res


def _memory(entry: dict) -> str:
    mib = entry["adamw_formula_bytes"] / 2**20
    return f"{mib:.2f} MiB ({entry['trainable_params']} params)"
