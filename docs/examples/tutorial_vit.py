"""Tutorial: compress a (tiny, random) ViT and adapt it to a new task with a new head.

A 2-layer ``ViTForImageClassification`` (16x16 single-channel images, 4x4
patches) stands in for a pretrained checkpoint. The downstream task has 4
classes (which quadrant of a noisy image is bright), so the 10-way head is
replaced by a new 4-way ``classifier`` *before* calibration: the gradient
statistics then come from the task's loss. The new head trains alongside the
cores (``JactusConfig(modules_to_save=["classifier"])``).

Asserts: the budget is met, only cores and head train, held-out loss goes
down and accuracy goes up while tuning, the model saved with its mergeable
cores folded in reloads with logits equal up to float32 rounding, and the
curvature-aware methods have a lower predicted loss increase than
``svd-llm`` and ``svd``.

Shown on ``docs/tutorials/vit.md``.

Run: ``python docs/examples/tutorial_vit.py``
"""

from __future__ import annotations

# --8<-- [start:setup]
import copy
import tempfile

import torch
from transformers import ViTConfig, ViTForImageClassification

from jactus_linalg.torch import (
    JactusConfig,
    calibrate,
    compress,
    compress_then_lora,
    count_parameters,
    load_compressed,
    lora_model,
    save_compressed,
)

torch.manual_seed(0)
config = ViTConfig(
    image_size=16,
    patch_size=4,
    num_channels=1,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    num_labels=10,
)
dense = ViTForImageClassification(config).eval()  # random weights: stands in for a checkpoint
dense.classifier = torch.nn.Linear(config.hidden_size, 4)  # the new task's head
dense.config.num_labels = 4  # keep the config in step: load_compressed rebuilds from it
data = torch.Generator().manual_seed(1)


def batch(size: int = 32) -> dict[str, torch.Tensor]:
    """Noisy 16x16 images; the label is the quadrant that is brighter."""
    labels = torch.randint(0, 4, (size,), generator=data)
    images = 0.3 * torch.randn(size, 1, 16, 16, generator=data)
    for i, c in enumerate(labels.tolist()):
        row, col = divmod(c, 2)
        images[i, 0, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] += 1.0
    return {"pixel_values": images, "labels": labels}


calibration = [batch() for _ in range(4)]
train = [batch() for _ in range(8)]
held_out = batch(256)
loss_fn = lambda m, b: m(**b).loss  # noqa: E731


@torch.no_grad()
def evaluate(model) -> tuple[float, float]:
    """Held-out (loss, accuracy)."""
    model.eval()
    out = model(**held_out)
    return out.loss.item(), (out.logits.argmax(-1) == held_out["labels"]).float().mean().item()


# --8<-- [end:setup]


# --8<-- [start:compress]
stats = calibrate(dense, calibration, loss_fn, progress=False)  # the head is not a target
model = copy.deepcopy(dense)
config = JactusConfig(retain=0.8, modules_to_save=["classifier"])  # the new head trains in full
report = compress(model, stats, config, progress=False)  # leaves the cores + head trainable
print(report.table())
# --8<-- [end:compress]
assert abs(report.retain_achieved - 0.8) < 0.01 and report.retain_achieved <= 0.8


# --8<-- [start:tune]
def tune(model, epochs: int = 5, lr: float = 1e-2) -> list[tuple[float, float]]:
    """AdamW on whatever requires grad; held-out (loss, accuracy) before and after each epoch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = [evaluate(model)]
    for _ in range(epochs):
        model.train()
        for b in train:
            opt.zero_grad()
            loss_fn(model, b).backward()
            opt.step()
        history.append(evaluate(model))
    return history


trainable = [name for name, p in model.named_parameters() if p.requires_grad]
shown = [t for t in trainable if "layers.0.attention" in t or "classifier" in t]
print("\ntrainable tensors:", ", ".join(shown))
tuning_counts = count_parameters(model)
print("trainable / total parameters while tuning: {} / {}".format(*tuning_counts))
history = tune(model)
for epoch, (loss, acc) in enumerate(history):
    print(f"epoch {epoch}: held-out loss {loss:.4f}, accuracy {acc:.3f}")
# --8<-- [end:tune]
assert all(".core." in t or t.startswith("classifier.") for t in trainable)
assert history[-1][0] < history[0][0] and history[-1][1] > history[0][1] + 0.25

# --8<-- [start:save]
with tempfile.TemporaryDirectory() as tmp:
    folder = save_compressed(model, f"{tmp}/vit-jactus", merge=True)  # dense layers' cores folded
    reloaded = load_compressed(folder).eval()  # rebuilt from the saved config (4 labels)
    with torch.no_grad():
        tuned = model(**held_out).logits
        change = ((reloaded(**held_out).logits - tuned).abs().max() / tuned.abs().max()).item()
print(f"\nreloaded (merged) logits: largest relative change {change:.1e} (float32 rounding)")
# --8<-- [end:save]
assert change <= 100 * 64 * torch.finfo(torch.float32).eps  # c n eps, n = hidden size

# --8<-- [start:baselines]
print("\npredicted loss increase at retain 0.8 (K-FAC, same norm for every method):")
predicted = {}
for method in ("jactus", "kfac", "svd-llm", "svd"):
    rep = compress(copy.deepcopy(dense), stats, retain=0.8, method=method, progress=False)
    predicted[method] = rep.total_predicted_loss_increase
    print(f"  {method:<8} {predicted[method]:.3e}  (retain {rep.retain_achieved:.4f})")

ctl = compress_then_lora(  # the new head trains in full here too
    copy.deepcopy(dense),
    stats,
    retain=0.8,
    lora_rank=4,
    modules_to_save=["classifier"],
    progress=False,
)
lora = lora_model(copy.deepcopy(dense), rank=4, modules_to_save=["classifier"])
print("\nsame 5 epochs of AdamW, held-out loss / accuracy (trainable / total while tuning):")
candidates = {"JACTUS cores": model, "SVD-LLM + LoRA": ctl.model, "LoRA (dense)": lora}
for name, candidate in candidates.items():
    loss, acc = history[-1] if candidate is model else tune(candidate)[-1]
    train_p, total_p = tuning_counts if candidate is model else count_parameters(candidate)
    print(f"  {name:<15} {loss:.4f} / {acc:.3f}   ({train_p} / {total_p})")
print(
    f"compress-then-LoRA: factors at retain {ctl.compress_retain:.4f} + {ctl.adapter_params} "
    f"adapter parameters = {ctl.total_retain:.4f} of the dense model"
)
# --8<-- [end:baselines]
assert ctl.total_retain <= 0.8
assert max(predicted["jactus"], predicted["kfac"]) < min(predicted["svd-llm"], predicted["svd"])
