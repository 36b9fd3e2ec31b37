"""The tuning loop shared by every method: same steps, data order, seed and schedule.

AdamW on the parameters that require grad, linear warm-up then linear decay,
gradient clipping at 1.0. A new head (``head``: module names such as
``"classifier"``) is its own parameter group with its own rate
``head_lr``, the same for every method, so that the method's rate
(cores or adapters) is the only thing that differs between methods. Under ``torchrun`` (``torch.distributed``
initialised) the model is wrapped in ``DistributedDataParallel`` and each
process takes its own slice of every batch.

With ``checkpoint=path`` the loop's state is saved atomically every
``checkpoint_every_s`` seconds (:mod:`validation.checkpoint`); a later call
with the same settings resumes from it, and its parameters and losses are
bit-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from validation.checkpoint import TuningState, load_tuning_state, save_tuning_state, tuning_identity

__all__ = ["TuneResult", "parameter_groups", "tune"]


@dataclass
class TuneResult:
    losses: list[float]
    wall_time_s: float
    steps: int
    trainable_params: int
    resumed_from_step: int | None = None  # the step a checkpoint resumed at
    earlier_wall_time_s: float = 0.0  # tuning seconds of the interrupted earlier processes


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _shard(batch: Any) -> Any:
    """This process's slice of a batch (dicts of tensors sharded along dim 0)."""
    if not _distributed():
        return batch
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if isinstance(batch, dict):
        return {k: v[rank::world] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(v[rank::world] for v in batch)
    return batch


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def _is_head(name: str, head: Sequence[str]) -> bool:
    """``name`` lies inside one of the ``head`` modules (peft's ``modules_to_save`` copies included)."""
    dotted = f".{name}."
    return any(f".{h}." in dotted for h in head)


def parameter_groups(
    model: nn.Module, lr: float, head: Sequence[str] = (), head_lr: float | None = None
) -> list[dict]:
    """AdamW parameter groups: the head's trainable parameters at ``head_lr``, the rest at ``lr``.

    Returns one group (everything at ``lr``) when ``head`` is empty or
    ``head_lr`` is None; empty groups are left out.

    Raises
    ------
    ValueError
        If nothing requires grad.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        msg = "`model` has no parameter that requires grad: nothing to tune"
        raise ValueError(msg)
    if not head or head_lr is None:
        return [{"params": [p for _, p in named], "lr": lr, "name": "method"}]
    heads = [p for n, p in named if _is_head(n, head)]
    rest = [p for n, p in named if not _is_head(n, head)]
    groups = [{"params": rest, "lr": lr, "name": "method"},
              {"params": heads, "lr": head_lr, "name": "head"}]
    return [g for g in groups if g["params"]]


def tune(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    progress: bool = True,
    desc: str = "tune",
    head: Sequence[str] = (),
    head_lr: float | None = None,
    checkpoint: Path | None = None,
    checkpoint_every_s: float = 300.0,
) -> TuneResult:
    """Train the parameters of ``model`` that require grad for ``steps`` steps.

    ``batches`` is cycled in order, so every method sees the same data in
    the same order. Parameters inside the ``head`` modules train at
    ``head_lr`` (see :func:`parameter_groups`). Returns the per-step losses
    and the wall time (``wall_time_s`` counts this process only;
    ``earlier_wall_time_s`` the processes a checkpoint resumed from).

    With ``checkpoint`` (a ``.safetensors`` path) the state after a step is
    saved there whenever ``checkpoint_every_s`` seconds have passed since
    the last save (only the main process writes under torchrun), and a
    checkpoint found there at the start, written with the same steps,
    rates, seed and trainable parameters, is resumed. A checkpoint with
    other settings is ignored with a warning (and overwritten by the next
    save). The caller removes the file once the result is safe.

    Raises
    ------
    ValueError
        If nothing requires grad, or ``steps`` / ``lr`` are not positive.
    """
    if steps < 1 or lr <= 0 or (head_lr is not None and head_lr <= 0):
        msg = f"`steps`, `lr` and `head_lr` must be positive; got steps={steps}, lr={lr}, head_lr={head_lr}"
        raise ValueError(msg)
    groups = parameter_groups(model, lr, head, head_lr)
    params = [p for g in groups for p in g["params"]]
    torch.manual_seed(seed)
    wrapped = model
    if _distributed():
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10) if warmup is None else max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warm))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    identity = tuning_identity(named, steps=steps, lr=lr, head_lr=head_lr, seed=seed)
    resumed = _resume(checkpoint, named, opt, sched, identity)
    from tqdm.auto import tqdm  # noqa: PLC0415

    model.train()
    losses: list[float] = list(resumed.losses)
    start = time.perf_counter()
    last_save = start
    bar = tqdm(range(resumed.next_step, steps), desc=desc, disable=not progress, leave=False,
               initial=resumed.next_step, total=steps)
    for step in bar:
        batch = _shard(batches[step % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(wrapped, batch)
        if not torch.isfinite(loss):
            msg = f"non-finite training loss at step {step} ({desc}); lower the learning rate"
            raise FloatingPointError(msg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        now = time.perf_counter()
        if checkpoint is not None and step + 1 < steps and now - last_save >= checkpoint_every_s:
            if is_main_process():
                state = TuningState(step + 1, losses, resumed.earlier_seconds + now - start)
                save_tuning_state(checkpoint, named, opt, sched, identity, state)
            last_save = time.perf_counter()
    model.eval()
    return TuneResult(
        losses=losses,
        wall_time_s=time.perf_counter() - start,
        steps=steps,
        trainable_params=sum(p.numel() for p in params),
        resumed_from_step=resumed.next_step or None,
        earlier_wall_time_s=resumed.earlier_seconds,
    )


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised ``torch.distributed`` run."""
    return not _distributed() or torch.distributed.get_rank() == 0


def _resume(checkpoint: Path | None, named, opt, sched, identity: dict) -> TuningState:
    """The state saved at ``checkpoint``, restored; a fresh start when there is none to resume."""
    fresh = TuningState(next_step=0, losses=[], earlier_seconds=0.0)
    if checkpoint is None or not checkpoint.is_file():
        return fresh
    state = load_tuning_state(checkpoint, named, opt, sched, identity)
    if state is None:
        warnings.warn(f"`checkpoint` {checkpoint} was written with other tuning settings (steps, "
                      "rates, seed or trainable parameters); starting from step 0",
                      stacklevel=3)
        return fresh
    return state
