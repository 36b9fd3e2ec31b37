"""Benchmark ``tuning-loss``: a language tuning step on the answer tokens' logits only.

The language part tunes on context + correct answer with the loss on the
answer tokens (:func:`validation.tuning_data.tuning_example`). A causal LM's
own ``model(**batch).loss`` applies the output head at every position;
:func:`validation.tuning_data.answer_loss` applies it at the answer
positions only, with the same loss and gradients. On SmolLM2-135M
(vocabulary 49,152, hidden width 576) wrapped by peft LoRA (rank 8, the
runner's), over the first 4 tuning batches of 8 items x at most 96 tokens
of the eight commonsense tasks (4 items per task, shuffled with seed 0),
two things run side by side (:func:`validation.bench_machine.rounds`):

``answer``
    forward + backward of :func:`~validation.tuning_data.answer_loss`
    over the batches;
``model``
    the same with ``model(**batch).loss``.

Row: ``answer / model`` against <= 0.9x (the saving must be worth the
second code path). The two losses are compared on every batch before the
timing (relative difference <= 1e-4, else the benchmark fails).
``--quick``: the tiny random Llama of :func:`validation.assets.tiny_llama`
with the builtin tokenizer; its row is shown, not judged (the saving
depends on the head's share of the model: a tiny model's says little about
a real one's).

Run through ``python validation/bench.py --only tuning-loss``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from validation.bench_end_to_end import end_to_end_model
from validation.bench_machine import BenchResult, Row, medians, paired_ratio, rounds, say

TARGET = 0.9
#: items per task, rows per batch, tokens per row at most (the runner's language batches)
ITEMS_PER_TASK, BATCH_ROWS, MAX_TOKENS = 4, 8, 96
LORA_RANK = 8


def tuning_batches_of_every_task(tokenizer) -> list[dict]:
    """The first :data:`ITEMS_PER_TASK` items of each task, shuffled (seed 0), in tuning batches."""
    from validation.commonsense import TASKS, load_task
    from validation.tuning_data import tuning_batches

    items = [item for task in TASKS for item in load_task(task)[:ITEMS_PER_TASK]]
    return tuning_batches(items, tokenizer, batch_size=BATCH_ROWS, max_length=MAX_TOKENS, seed=0)


def backward_over(model: Any, batches: list[dict], loss_fn) -> list[float]:
    """Forward + backward of ``loss_fn`` over every batch; gradients dropped; the losses."""
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def model_loss(model: Any, batch: dict) -> Any:
    """The causal LM's own loss (the output head at every position)."""
    return model(**batch).loss


def bench_tuning_loss(args: argparse.Namespace) -> BenchResult:
    """answer_loss step / model(**batch).loss step on a LoRA-wrapped SmolLM2-135M (<= 0.9x)."""
    from jactus_linalg.torch import lora_model
    from validation.tuning_data import answer_loss

    res = BenchResult("tuning-loss", "a LoRA tuning step: the head on the answer tokens only")
    base, tokenizer, name = end_to_end_model(args.quick)
    model = lora_model(base, rank=LORA_RANK)
    model.train()
    batches = tuning_batches_of_every_task(tokenizer)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    answers = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    case = f"{name} + LoRA r={LORA_RANK}, {len(batches)} batches, {tokens} tokens, {answers} scored"
    say(f"  tuning-loss: {case}, {args.repeat} round(s)")
    ours, theirs = backward_over(model, batches, answer_loss), backward_over(model, batches, model_loss)
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))
    if worst > 1e-4:
        msg = f"answer_loss differs from model(**batch).loss by {worst:.2e} (relative)"
        raise RuntimeError(msg)
    times = rounds({"answer": lambda: backward_over(model, batches, answer_loss),
                    "model": lambda: backward_over(model, batches, model_loss)}, args.repeat)
    med = medians(times)
    res.rows = [Row("tuning-loss", case, "answer_loss step / model(**batch).loss step",
                    paired_ratio(times, "answer", "model"), math.inf if args.quick else TARGET,
                    "<=")]
    res.details = {"model": name, "batches": len(batches), "tokens": tokens,
                   "scored_tokens": answers, "median_s": med, "times_s": times,
                   "largest_relative_loss_difference": worst}
    res.notes.append(f"median s over {len(batches)} batches: answer_loss {med['answer']:.2f}, "
                     f"model loss {med['model']:.2f}; the output head at {answers} of {tokens} "
                     f"positions; losses agree to {worst:.1e} (relative)")
    return res
