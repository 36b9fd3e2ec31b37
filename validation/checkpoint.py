"""Checkpoints of the tuning loop, so that a killed run resumes mid-training.

A checkpoint is one safetensors file, written atomically
(:func:`jactus_linalg._files.atomic_write`): the previous checkpoint stays
whole until the new one is complete. It holds everything the loop's next
step depends on:

* the trainable parameters, by name (``param/<name>``);
* AdamW's state, by the parameter's index in the groups
  (``state/<index>/<key>``: ``step``, ``exp_avg``, ``exp_avg_sq``) and its
  groups and the scheduler's state (JSON, in the metadata);
* torch's CPU random state (``rng/cpu``), the losses so far, the seconds
  the earlier processes spent tuning, and the step to run next.

Resuming restores all of these, so the parameters and losses after step
``steps`` are bit-identical to those of an uninterrupted run (on the same
machine and torch version). A checkpoint written for other settings (steps,
rates, seed or trainable parameters: its ``identity``) is not resumed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jactus_linalg._files import atomic_write

__all__ = ["TuningState", "load_tuning_state", "save_tuning_state", "tuning_identity"]

FORMAT = "jactus_linalg.tune-checkpoint/1"


@dataclass
class TuningState:
    """What a checkpoint restores: the next step, the losses so far, earlier tuning seconds."""

    next_step: int
    losses: list[float]
    earlier_seconds: float


def tuning_identity(named: Sequence[tuple[str, torch.Tensor]], *, steps: int, lr: float,
                    head_lr: float | None, seed: int) -> dict:
    """The settings a checkpoint must match to be resumed (names, shapes and dtypes included)."""
    return {"steps": steps, "lr": lr, "head_lr": head_lr, "seed": seed,
            "params": {n: [list(p.shape), str(p.dtype)] for n, p in named}}


def save_tuning_state(path: Path, named: Sequence[tuple[str, torch.Tensor]],
                      opt: torch.optim.Optimizer, sched: Any, identity: dict,
                      state: TuningState) -> None:
    """Write the loop's state after ``state.next_step`` steps to ``path`` (atomically)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors = {f"param/{n}": p.detach().cpu().contiguous().clone() for n, p in named}
    opt_state = opt.state_dict()
    for index, entries in opt_state["state"].items():
        for key, value in entries.items():
            tensors[f"state/{index}/{key}"] = value.detach().cpu().contiguous().clone()
    tensors["rng/cpu"] = torch.get_rng_state()
    meta = {
        "format": FORMAT,
        "identity": identity,
        "next_step": state.next_step,
        "losses": state.losses,
        "earlier_seconds": state.earlier_seconds,
        "param_groups": opt_state["param_groups"],
        "scheduler": sched.state_dict(),
    }
    atomic_write(path, lambda tmp: save_file(
        tensors, str(tmp), metadata={"jactus": json.dumps(meta)}))


def load_tuning_state(path: Path, named: Sequence[tuple[str, torch.Tensor]],
                      opt: torch.optim.Optimizer, sched: Any, identity: dict) -> TuningState | None:
    """Restore the loop's state from ``path`` into the parameters, ``opt`` and ``sched``.

    Returns None, and changes nothing, when there is no checkpoint at
    ``path`` or it was written with another ``identity``.
    """
    from safetensors import safe_open  # noqa: PLC0415

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("jactus", "{}"))
        if meta.get("format") != FORMAT or meta.get("identity") != json.loads(json.dumps(identity)):
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param/{n}"])
    states: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            _, index, name = key.split("/", 2)
            states.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": states, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/cpu"])
    return TuningState(next_step=int(meta["next_step"]), losses=[float(x) for x in meta["losses"]],
                       earlier_seconds=float(meta["earlier_seconds"]))
