"""Benchmark: a dense layer's mergeable core against a peft LoRA layer of the same rank.

A layer that :func:`jactus_linalg.torch.compress` keeps dense trains through
a mergeable core, :math:`y = Wx + b + A\\,\\Delta C\\,B^\\top x`, with frozen
orthonormal :math:`A` (m x a), :math:`B` (n x b) at the layer's break-even
rank and a trainable :math:`\\Delta C` (a x b). The natural peer is LoRA on
the same layer, :math:`y = Wx + b + s\\,L R x` with trainable :math:`L`
(m x r), :math:`R` (r x n), at the same rank ``r = a = b``. Measured side by
side in one run (``bench.rounds``): the training step time (forward,
backward, AdamW step) and the memory a training step holds (parameters,
gradients and AdamW state, in bytes, from the tensors themselves).

Targets: a step no slower than LoRA's (<= 1.0x) and no more training
memory (<= 1.0x). The trainable core holds :math:`r^2` numbers against
LoRA's :math:`r(m+n)`; the frozen bases hold what LoRA trains.

Run through ``python validation/bench.py --only mergeable`` (or ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

from validation.bench import BenchResult, Row, medians, optimizer_state_bytes, paired_ratio, rounds, say

#: (out, in) shapes: ViT-Base attention and MLP; tiny ones for ``--quick``.
SHAPES = ((768, 768), (3072, 768), (768, 3072))
QUICK_SHAPES = ((64, 64), (128, 64))
TOKENS, QUICK_TOKENS = 2048, 256


def _layers(m: int, n: int, seed: int = 0) -> dict[str, Any]:
    """A dense layer with a mergeable core at break-even rank, and the same layer under peft LoRA."""
    import torch
    from torch import nn

    from jactus_linalg import break_even_rank
    from jactus_linalg.torch import lora_model
    from jactus_linalg.torch.merge import MergeableLinear

    rank = break_even_rank(m, n)
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(n, m)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(m, n, generator=gen) / n**0.5)
    left = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    right = torch.linalg.qr(torch.randn(n, rank, generator=gen)).Q

    class One(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    cored = One(MergeableLinear.from_linear(copy.deepcopy(dense), left, right))
    for name, p in cored.named_parameters():
        p.requires_grad_(name.endswith("core.weight"))
    lora = lora_model(One(copy.deepcopy(dense)), rank=rank, targets=["layer"])
    with torch.no_grad():  # a trained LoRA (B != 0), so both steps do the same work
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3, generator=gen)
    return {"rank": rank, "cored": cored, "lora": lora}


def _stepper(model, optimizer, x) -> Callable[[], None]:
    """One training step of ``model`` on ``x`` (loss: mean square of the output)."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def _training_bytes(model, optimizer) -> int:
    """Parameters, their gradients and the optimizer's state, in bytes."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + grads + optimizer_state_bytes(optimizer)


def bench_mergeable(args: argparse.Namespace) -> BenchResult:
    """Step time and training memory: mergeable core / peft LoRA at the same rank."""
    import torch

    res = BenchResult("mergeable", "mergeable core of a dense layer vs peft LoRA, same rank")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = QUICK_TOKENS if args.quick else TOKENS
    say(f"  mergeable: shapes {list(shapes)}, {tokens} tokens, {args.repeat} round(s)")
    for m, n in shapes:
        built = _layers(m, n)
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1))
        models = {"cored": built["cored"], "lora": built["lora"]}
        opts = {k: torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-4)
                for k, v in models.items()}
        fns = {k: _stepper(models[k], opts[k], x) for k in models}
        for f in fns.values():
            f()  # warm-up; creates the AdamW states
        times = rounds(fns, args.repeat)
        memory = {k: _training_bytes(models[k], opts[k]) for k in models}
        case = f"{m}x{n} r={built['rank']}"
        res.rows += [
            Row("mergeable", case, "train step: mergeable core / peft LoRA",
                paired_ratio(times, "cored", "lora"), 1.0, "<="),
            Row("mergeable", case, "training memory: mergeable core / peft LoRA",
                memory["cored"] / memory["lora"], 1.0, "<="),
        ]
        trainable = {k: sum(p.numel() for p in v.parameters() if p.requires_grad)
                     for k, v in models.items()}
        res.details[case] = {"step_median_s": medians(times), "step_times_s": times,
                             "training_bytes": memory, "trainable_params": trainable}
    res.notes.append(
        "training memory = parameters + gradients + AdamW state (bytes of the tensors); "
        "activations saved for backward are not counted; the LoRA B factor is set nonzero "
        "so both layers compute a full update"
    )
    return res
