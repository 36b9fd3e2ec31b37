"""``--preset paper`` end to end on tiny stand-ins of every input it reads.

The paper preset needs a ViT-Base checkpoint, eight image datasets, a
Llama-2-7B checkpoint and the LLM-Adapters commonsense files. Here each is
replaced by a tiny file of the same format (a random ViT and Llama saved with
``save_pretrained``, image folders and a ``save_to_disk`` dataset, JSON files
in the LLM-Adapters layout), so the same code path runs on CPU in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
         "openbookqa")
ANSWERS = {"boolq": "true", "piqa": "solution2", "social_i_qa": "answer3", "hellaswag": "ending1",
           "winogrande": "option2", "ARC-Easy": "answer4", "ARC-Challenge": "answer1",
           "openbookqa": "answer2"}


def _vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       num_labels=7)
    ViTForImageClassification(config).save_pretrained(folder)


def _image_folder(folder: Path, rng) -> None:
    from PIL import Image

    for split, count in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / cls / f"{i}.png")


def _saved_dataset(folder: Path, rng) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]},
                                          features=features)

    datasets.DatasetDict({"train": split(9), "test": split(6)}).save_to_disk(str(folder))


def _llama(folder: Path) -> None:
    from validation.assets import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _commonsense(train: Path, test: Path) -> None:
    records = [{"instruction": f"Question {i}: pick one. Answer1: yes Answer2: no",
                "input": "", "output": f"the correct answer is answer{1 + i % 2}",
                "answer": f"answer{1 + i % 2}"} for i in range(16)]
    train.write_text(json.dumps(records))
    for task in TASKS:
        (test / task).mkdir(parents=True)
        instruction = "Which one? Answer1: a Answer2: b Answer3: c Answer4: d"
        items = [{"instruction": instruction, "input": "", "output": "", "answer": ANSWERS[task]}
                 for _ in range(2)]
        (test / task / "test.json").write_text(json.dumps(items))


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    rng = np.random.default_rng(0)
    _vit(root / "vit")
    _image_folder(root / "data" / "cifar10", rng)
    _saved_dataset(root / "data" / "dtd", rng)
    _llama(root / "llama")
    _commonsense(root / "commonsense_170k.json", root / "test")
    out = root / "out"
    cmd = [sys.executable, str(ROOT / "validation" / "run_paper.py"), "--preset", "paper",
           "--vit-checkpoint", str(root / "vit"), "--vision-data", str(root / "data"),
           "--vision-datasets", "cifar10,dtd", "--llama-checkpoint", str(root / "llama"),
           "--commonsense-train", str(root / "commonsense_170k.json"),
           "--commonsense-test", str(root / "test"), "--device", "cpu", "--dtype", "float32",
           "--steps", "2", "--calibration-batches", "1", "--probe-steps", "1", "--lora-rank", "2",
           "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_paper_preset_runs_every_method_on_both_parts(paper_run):
    payload = json.loads((paper_run / "results.json").read_text())
    by_part: dict[str, set] = {}
    for row in payload["rows"]:
        by_part.setdefault(row["part"], set()).add(row["method"])
    expected = {"JACTUS@0.8", "SVD-LLM+LoRA@0.8", "LoRA@1.0", "DoRA@1.0"}
    assert expected <= by_part["language"]
    assert expected <= by_part["vision"]
    vision_tasks = {r["task"] for r in payload["rows"] if r["part"] == "vision"}
    assert vision_tasks == {"cifar10", "dtd", "average"}
    lang_tasks = {r["task"] for r in payload["rows"] if r["part"] == "language"}
    assert lang_tasks == {*TASKS, "average"}


def test_paper_preset_prints_the_paper_numbers_beside_ours(paper_run):
    text = (paper_run / "results.md").read_text()
    assert "JACTUS@0.8: paper 89.2" in text
    assert "DoRA@1.0: paper 79.7" in text
    for name in ("results.csv", "accuracy_vs_retain_vision.png", "ranks_language.png"):
        assert (paper_run / name).stat().st_size > 0
