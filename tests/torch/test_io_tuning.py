"""Tuning only the cores, and saving/loading compressed models safely."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from jactus_linalg.torch import (
    JactusLinear,
    calibrate,
    compress,
    core_parameters,
    count_parameters,
    load_compressed,
    mark_trainable,
    merge,
    save_compressed,
)
from jactus_linalg.torch import io as jio

from .models import hf_loss, llama_batches, mlp, mlp_batches, mlp_loss, tiny_llama, tiny_vit, vit_batches


@pytest.fixture(scope="module")
def compressed_llama():
    model = tiny_llama()
    batches = llama_batches()
    stats = calibrate(model, batches, hf_loss, progress=False)
    compress(model, stats, retain=0.8, progress=False)
    return merge(model), batches


@pytest.mark.parametrize("by", ["compress", "mark_trainable"])
def test_only_cores_and_head_train(by):
    model = tiny_vit()
    batches = vit_batches()
    stats = calibrate(model, batches, hf_loss, progress=False)
    if by == "compress":  # compress marks the cores (and modules_to_save) trainable itself
        compress(model, stats, retain=0.8, modules_to_save=["classifier"], progress=False)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        compress(model, stats, retain=0.8, trainable="none", progress=False)
        assert all(p.requires_grad for p in model.classifier.parameters())  # left as they were
        names = mark_trainable(model, extra=["classifier"])
    assert names, "something must train"
    for name in names:
        assert name.endswith("core.weight") or name.startswith("classifier.")
    cores = core_parameters(model)
    trainable, total = count_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == sum(c.numel() for c in cores) + head
    assert total == sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        if isinstance(mod, JactusLinear):
            assert not mod.left_proj.weight.requires_grad
            assert not mod.right_proj.weight.requires_grad


def test_mark_trainable_needs_a_compressed_model():
    with pytest.raises(ValueError, match="compress it first"):
        mark_trainable(tiny_llama())
    model = mlp()
    stats = calibrate(model, mlp_batches(), mlp_loss, progress=False)
    compress(copy.deepcopy(model), stats, retain=1.0, dense_cores=False, progress=False)  # no core
    compress(model, stats, retain=0.8, progress=False)
    with pytest.raises(ValueError, match="extra"):
        mark_trainable(model, extra=["no_such_head"])


def test_a_few_core_steps_lower_the_loss():
    model, batches = mlp(), mlp_batches()
    compress(model, calibrate(model, batches, mlp_loss, progress=False), retain=0.7, progress=False)
    mark_trainable(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(3):
        for batch in batches:
            opt.zero_grad()
            loss = mlp_loss(model, batch)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    final = sum(mlp_loss(model, b).item() for b in batches) / len(batches)
    assert final < sum(losses[: len(batches)]) / len(batches)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_save_load_gives_identical_outputs(tmp_path, compressed_llama):
    model, batches = compressed_llama
    save_compressed(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["jactus.json", "model.safetensors"]
    again = load_compressed(tmp_path / "m")  # rebuilt from the saved Hugging Face config
    with torch.no_grad():
        assert torch.equal(again(**batches[0]).logits, model(**batches[0]).logits)
    given = load_compressed(tmp_path / "m", model=tiny_llama(seed=5))
    with torch.no_grad():
        assert torch.equal(given(**batches[0]).logits, model(**batches[0]).logits)


def test_save_load_plain_module(tmp_path):
    model, batches = mlp(), mlp_batches()
    compress(model, calibrate(model, batches, mlp_loss, progress=False), retain=0.7, progress=False)
    save_compressed(merge(model), tmp_path / "m")
    with pytest.raises(ValueError, match="pass `model`"):
        load_compressed(tmp_path / "m")
    again = load_compressed(tmp_path / "m", model=mlp(seed=9))
    assert torch.equal(again(batches[0][0]), model(batches[0][0]))


def test_interrupted_save_leaves_previous_folder(tmp_path, compressed_llama, monkeypatch):
    model, _ = compressed_llama
    folder = save_compressed(model, tmp_path / "m")
    before = load_file(folder / "model.safetensors")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(jio, "save_file", crash)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(core_parameters(changed))).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(changed, folder)
    after = load_file(folder / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left behind


def test_pickle_in_folder_is_refused(tmp_path, compressed_llama):
    model, _ = compressed_llama
    folder = save_compressed(model, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle"):
        load_compressed(folder)


def test_tampered_shape_is_refused_before_loading(tmp_path, compressed_llama):
    model, _ = compressed_llama
    folder = save_compressed(model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    key = next(k for k in state if k.endswith("core.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, folder / "model.safetensors")
    target = tiny_llama(seed=3)
    snapshot = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        load_compressed(folder, model=target)
    assert all(torch.equal(snapshot[k], v) for k, v in target.state_dict().items())


def test_wrong_architecture_is_refused(tmp_path, compressed_llama):
    model, _ = compressed_llama
    folder = save_compressed(model, tmp_path / "m")
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        load_compressed(folder, model=tiny_vit())
    config = json.loads((folder / "jactus.json").read_text())
    config["format"] = "something/else"
    (folder / "jactus.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format"):
        load_compressed(folder)


def test_saving_a_peft_model_says_to_merge_first(tmp_path):
    from jactus_linalg.torch import lora_model

    model, batches = mlp(), mlp_batches()
    compress(model, calibrate(model, batches, mlp_loss, progress=False), retain=0.8, progress=False)
    merge(model)
    names = [n + ".left_proj" for n, m in model.named_modules() if isinstance(m, JactusLinear)]
    wrapped = lora_model(model, rank=2, targets=names)
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_compressed(wrapped, tmp_path / "m")
    save_compressed(wrapped.merge_and_unload(), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
