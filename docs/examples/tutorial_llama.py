"""Tutorial: compress and tune a (tiny, random) Hugging Face Llama model with JACTUS.

A 2-layer ``LlamaForCausalLM`` with grouped-query attention (4 query heads,
2 key/value heads) stands in for a pretrained checkpoint; the task is
next-token prediction on arithmetic sequences ``a, a+d, a+2d, ... (mod 256)``.
Calibrate, compress to 80% of the parameters with a ``JactusConfig``, print
the report, train only the cores (those of the factored layers and the
mergeable cores of the layers kept dense), merge, save and reload, then
compare with the baselines (``svd-llm``, ``svd``, ``kfac``;
compress-then-LoRA and LoRA through ``peft``).

Asserts: only cores train, the held-out loss goes down while tuning,
merging changes the logits by float32 rounding only, the reloaded model
gives bit-identical logits with its config, the budget is met, and the
curvature-aware methods have a lower predicted loss increase than the
data-free and input-only ones.

Shown on ``docs/tutorials/llama.md``.

Run: ``python docs/examples/tutorial_llama.py``
"""

from __future__ import annotations

# --8<-- [start:setup]
import copy
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jactus_linalg.torch import (
    JactusConfig,
    calibrate,
    compress,
    compress_then_lora,
    count_parameters,
    load_compressed,
    lora_model,
    merge,
    save_compressed,
)

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=64,
)
dense = LlamaForCausalLM(config).eval()  # random weights: stands in for a pretrained model
data = torch.Generator().manual_seed(1)


def batch(size: int = 8, length: int = 32) -> dict[str, torch.Tensor]:
    """Arithmetic sequences a, a+d, a+2d, ... (mod 256): the downstream task."""
    start = torch.randint(0, 256, (size, 1), generator=data)
    step = torch.randint(1, 4, (size, 1), generator=data)
    ids = (start + step * torch.arange(length)) % 256
    return {"input_ids": ids, "labels": ids}  # HF shifts the labels internally


calibration = [batch() for _ in range(4)]
train = [batch() for _ in range(8)]
held_out = [batch() for _ in range(4)]
loss_fn = lambda m, b: m(**b).loss  # noqa: E731


@torch.no_grad()
def evaluate(model) -> float:
    model.eval()
    return sum(loss_fn(model, b).item() for b in held_out) / len(held_out)


# --8<-- [end:setup]


# --8<-- [start:compress]
stats = calibrate(dense, calibration, loss_fn, progress=False)  # one forward+backward per batch
model = copy.deepcopy(dense)  # compress() works in place; keep the dense model for baselines
config = JactusConfig(retain=0.8, method="jactus")  # validated here, saved with the model
report = compress(model, stats, config, progress=False)  # or compress(model, stats, retain=0.8)
print(report.table())
# --8<-- [end:compress]
assert abs(report.retain_achieved - 0.8) < 0.01 and report.retain_achieved <= 0.8


# --8<-- [start:tune]
def tune(model, epochs: int = 5, lr: float = 1e-2) -> list[float]:
    """AdamW on whatever requires grad; held-out loss before and after each epoch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = [evaluate(model)]
    for _ in range(epochs):
        model.train()
        for b in train:
            opt.zero_grad()
            loss_fn(model, b).backward()
            opt.step()
        losses.append(evaluate(model))
    return losses


# compress() left only the cores trainable: C of each factored layer, ΔC of each dense one
trainable = [name for name, p in model.named_parameters() if p.requires_grad]
print(f"\ntrainable tensors: {len(trainable)}, all cores: {all(n.endswith('core.weight') for n in trainable)}")
tuning_counts = count_parameters(model)  # while tuning: the dense layers carry their cores too
print("trainable / total parameters while tuning: {} / {}".format(*tuning_counts))
print(f"held-out loss: dense {evaluate(dense):.4f}, compressed {evaluate(model):.4f}")
losses = tune(model)
print("held-out loss per epoch:", " ".join(f"{x:.4f}" for x in losses))
# --8<-- [end:tune]
assert losses[-1] < losses[0] - 0.05, losses
assert all(n.endswith("core.weight") for n in trainable)

# --8<-- [start:save]
with torch.no_grad():
    tuned_logits = model(**held_out[0]).logits
merge(model)  # fold each dense layer's A ΔC Bᵀ into its weight: plain nn.Linear again
with torch.no_grad():
    merged_logits = model(**held_out[0]).logits
change = ((merged_logits - tuned_logits).abs().max() / tuned_logits.abs().max()).item()
print(f"\nmerged: largest logit change {change:.1e} (float32 rounding)")
with tempfile.TemporaryDirectory() as tmp:
    folder = save_compressed(model, f"{tmp}/llama-jactus")  # model.safetensors + jactus.json
    print("saved:", sorted(p.name for p in folder.iterdir()))
    reloaded = load_compressed(folder).eval()  # rebuilt from the saved config
    with torch.no_grad():
        same = torch.equal(merged_logits, reloaded(**held_out[0]).logits)
print("reloaded logits identical:", same, "| config restored:", reloaded.jactus_config == config)
# --8<-- [end:save]
assert same and reloaded.jactus_config == config
assert change <= 100 * 64 * torch.finfo(torch.float32).eps  # c n eps, n = hidden size

# --8<-- [start:baselines]
print("\npredicted loss increase at retain 0.8 (K-FAC, same norm for every method):")
predicted = {}
for method in ("jactus", "kfac", "svd-llm", "svd"):
    rep = compress(copy.deepcopy(dense), stats, retain=0.8, method=method, progress=False)
    predicted[method] = rep.total_predicted_loss_increase
    print(f"  {method:<8} {predicted[method]:.3e}  (retain {rep.retain_achieved:.4f})")

ctl = compress_then_lora(copy.deepcopy(dense), stats, retain=0.8, lora_rank=4, progress=False)
lora = lora_model(copy.deepcopy(dense), rank=4)  # LoRA on the dense model: 100% + adapters
print("\nsame 5 epochs of AdamW, held-out loss (trainable / total parameters while tuning):")
candidates = {"JACTUS cores": model, "SVD-LLM + LoRA": ctl.model, "LoRA (dense)": lora}
for name, candidate in candidates.items():
    tuned = losses[-1] if candidate is model else tune(candidate)[-1]
    train_p, total_p = tuning_counts if candidate is model else count_parameters(candidate)
    print(f"  {name:<15} {tuned:.4f}   ({train_p} / {total_p})")
print(
    f"compress-then-LoRA: factors at retain {ctl.compress_retain:.4f} + {ctl.adapter_params} "
    f"adapter parameters = {ctl.total_retain:.4f} of the dense model; JACTUS deploys "
    f"{report.params_after} parameters ({report.retain_achieved:.4f}) after merging"
)
# --8<-- [end:baselines]
assert ctl.total_retain <= 0.8
assert max(predicted["jactus"], predicted["kfac"]) < min(predicted["svd-llm"], predicted["svd"])

# --8<-- [start:merge]
merged = ctl.model.merge_and_unload()  # fold the LoRA adapters into the frozen factors
with tempfile.TemporaryDirectory() as tmp:
    reloaded = load_compressed(save_compressed(merged, f"{tmp}/svd-llm-lora")).eval()
    with torch.no_grad():
        same = torch.equal(merged(**held_out[0]).logits, reloaded(**held_out[0]).logits)
print("\ncompress-then-LoRA, merged and reloaded, logits identical:", same)
# --8<-- [end:merge]
assert same
