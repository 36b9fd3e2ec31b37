"""Tiny real models (random weights) and calibration batches for adapter tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    """2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def llama_batches(n: int = 3, batch: int = 4, length: int = 12, seed: int = 1, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            mask[0, -3:] = 0  # one padded row: its tokens must not enter the statistics
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def tiny_vit(seed: int = 0, num_labels: int = 5) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def vit_batches(n: int = 3, batch: int = 6, seed: int = 1, num_labels: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(batch, 1, 16, 16, generator=g),
            "labels": torch.randint(0, num_labels, (batch,), generator=g),
        }
        for _ in range(n)
    ]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 24), nn.GELU(),
        nn.Linear(24, 3),
    ).double()


def mlp_batches(n: int = 4, batch: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 24, generator=g, dtype=torch.float64) @ mix
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        out.append((x, y))
    return out


def hf_loss(model, batch):
    return model(**batch).loss


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


#: The tiny models the adapter tests run on: key -> (builder, batches, loss).
MODEL_FAMILIES = {
    "llama": (tiny_llama, llama_batches, hf_loss),
    "vit": (tiny_vit, vit_batches, hf_loss),
    "mlp": (mlp, mlp_batches, mlp_loss),
}


def count_plan_layer_calls(monkeypatch) -> list[int]:
    """Count calls of ``jactus_linalg.torch.compress.plan_layer`` (one entry per call)."""
    import importlib  # noqa: PLC0415

    module = importlib.import_module("jactus_linalg.torch.compress")
    calls: list[int] = []
    original = module.plan_layer

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "plan_layer", counted)
    return calls
