"""LoRA / DoRA (peft) at 100%, and compress-then-LoRA at the JACTUS budget."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from jactus_linalg.torch import (
    calibrate,
    compress,
    compress_then_lora,
    count_parameters,
    lora_model,
)
from jactus_linalg.torch.baselines import lora_adapter_params

from ..numerics import tolerance
from .models import hf_loss, llama_batches, tiny_llama, tiny_vit


@pytest.mark.parametrize("dora", [False, True])
def test_lora_and_dora_start_at_the_dense_model(dora):
    model = tiny_llama()
    batch = llama_batches(n=1)[0]
    with torch.no_grad():
        ref = model(**batch).logits
    wrapped = lora_model(copy.deepcopy(model), rank=4, dora=dora)
    assert isinstance(wrapped, PeftModel)
    # LoRA's B = 0 adds exactly nothing; DoRA rescales W by m / ‖W‖ = 1, one float32 rounding
    # per weight entry, carried through the model's hidden width and its layers
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    tol = tolerance(torch.float32, hidden * layers) * ref.abs().max().item()
    with torch.no_grad():
        assert (wrapped(**batch).logits - ref).abs().max().item() <= tol
    trainable, _ = count_parameters(wrapped)
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert trainable == lora_adapter_params(shapes, 4, dora=dora)


def test_lora_with_new_head_trains_the_head():
    model = tiny_vit()
    wrapped = lora_model(model, rank=2, modules_to_save=["classifier"])
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in names)
    assert all("lora_" in n or "classifier" in n for n in names)


def test_compress_then_lora_meets_the_same_budget():
    model = tiny_llama()
    batches = llama_batches()
    stats = calibrate(model, batches, hf_loss, progress=False)
    total = sum(p.numel() for p in model.parameters())
    result = compress_then_lora(copy.deepcopy(model), stats, retain=0.8, lora_rank=2, progress=False)
    assert result.total_retain <= 0.8
    assert result.compress_retain < 0.8
    # every parameter of the wrapped model is counted: frozen factors + adapters + the rest
    _, wrapped_total = count_parameters(result.model)
    assert wrapped_total == result.report.params_after + result.adapter_params
    assert wrapped_total / total == pytest.approx(result.total_retain)
    # greedy allocation stops short of the budget by at most two rank units (as in test_compress)
    unit = 2 * max(m + n + 2 * min(m, n) + 1 for m, n in (r.shape for r in result.report.layers)) / total
    assert 0.8 - result.total_retain <= unit
    jactus = compress(copy.deepcopy(model), stats, retain=0.8, progress=False)
    assert abs(jactus.retain_achieved - result.total_retain) <= unit
    # adapters start at zero: the wrapped model computes the compressed model
    loss = result.model(**batches[0]).loss
    loss.backward()
    grads = [p.grad for n, p in result.model.named_parameters() if "lora_" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_compress_then_lora_refuses_an_impossible_budget():
    model = tiny_llama()
    stats = calibrate(model, llama_batches(n=1), hf_loss, progress=False)
    with pytest.raises(ValueError, match=r"too small|no room"):
        compress_then_lora(model, stats, retain=0.3, lora_rank=16, progress=False)
