"""Loading strangers' files: safetensors and JSON only, every claim checked before use.

Statistics files and model folders that are pickles, tampered, garbled,
nested too deeply, or claim more than they hold are refused with a
``ValueError`` naming the path; nothing reaches a model before every check
passes. ``docs/failure-modes.md`` lists these promises.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from jactus_linalg.torch import (
    CalibrationStats,
    JactusLinear,
    calibrate,
    compress,
    load_compressed,
    save_compressed,
)
from jactus_linalg.torch import io as jio
from jactus_linalg.torch import targets as jtargets

from .models import hf_loss, llama_batches, tiny_llama
from .tiny_mlp import (
    IN,
    assert_bit_identical,
    compressed_mlp,
    make_batches,
    make_mlp,
    mlp_loss,
    rewrite_safetensors_header,
    stat_tensors,
)


@pytest.fixture
def saved_stats(tmp_path):
    stats = calibrate(make_mlp(), make_batches(n=2), mlp_loss, progress=False)
    return stats, stats.save(tmp_path / "stats.safetensors")


def test_stats_load_refuses_pickles(tmp_path, saved_stats):
    stats, _ = saved_stats
    pickled = tmp_path / "stats.pt"
    torch.save(stat_tensors(stats), pickled)
    with pytest.raises(ValueError, match=r"must be a \.safetensors file"):
        CalibrationStats.load(pickled)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match=r"not a valid safetensors file.*corrupted"):
        CalibrationStats.load(disguised)


def test_stats_load_refuses_tampered_shape(saved_stats):
    """A tensor reshaped in the header (same bytes) no longer fits its layer: refused."""
    _, path = saved_stats

    def reshape(header):
        header["input/0"]["shape"] = [IN // 2, IN * 2]

    rewrite_safetensors_header(path, reshape)
    with pytest.raises(
        ValueError, match=rf"tensor `input/0`.*shape \[{IN // 2}, {IN * 2}\].*needs \[{IN}, {IN}\]"
    ):
        CalibrationStats.load(path)


def test_stats_load_refuses_tampered_layer_table(saved_stats):
    _, path = saved_stats

    def widen(header):
        meta = json.loads(header["__metadata__"]["jactus"])
        meta["layers"][1]["in_features"] += 1
        header["__metadata__"]["jactus"] = json.dumps(meta)

    rewrite_safetensors_header(path, widen)
    with pytest.raises(ValueError, match=r"(tensor `\w+/2`.*shape|input group).*"):
        CalibrationStats.load(path)

    def garble(header):
        header["__metadata__"]["jactus"] = '{"format": "jactus_linalg.calibration/1", "layers": 3'

    rewrite_safetensors_header(path, garble)
    with pytest.raises(ValueError, match=r"malformed jactus calibration header.*not JSON"):
        CalibrationStats.load(path)


def test_header_claiming_a_huge_shape_is_refused(tmp_path, saved_stats):
    """A header that claims a 10^6 x 10^6 tensor is refused from the header alone.

    Nothing is allocated, and the model is untouched.
    """
    _, path = saved_stats

    def huge(header):
        start = header["input/0"]["data_offsets"][0]
        header["input/0"]["shape"] = [10**6, 10**6]
        header["input/0"]["data_offsets"] = [start, start + 8 * 10**12]

    rewrite_safetensors_header(path, huge)
    with pytest.raises(ValueError, match=r"not a valid safetensors file"):
        CalibrationStats.load(path)
    # the same for a compressed model: refused before any tensor reaches the model
    model, _ = compressed_mlp()
    folder = save_compressed(model, tmp_path / "m")
    key = next(k for k in model.state_dict() if k.endswith("core.weight"))

    def huge_core(header):
        start = header[key]["data_offsets"][0]
        header[key]["shape"] = [10**6, 10**6]
        header[key]["data_offsets"] = [start, start + 8 * 10**12]

    rewrite_safetensors_header(folder / "model.safetensors", huge_core)
    target = make_mlp(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load_compressed(folder, model=target)
    assert_bit_identical(before, target.state_dict())


def test_tampered_dtype_or_config_is_refused(tmp_path):
    """jactus.json records every dtype.

    A tensor relabelled in the header (same bytes) or a garbled config is refused.
    """
    model, _ = compressed_mlp(dtype=torch.float32)
    folder = save_compressed(model, tmp_path / "m")
    key = next(k for k in model.state_dict() if k.endswith("core.weight"))

    def relabel(header):
        header[key]["dtype"] = "I32"  # same width as F32

    rewrite_safetensors_header(folder / "model.safetensors", relabel)
    target = make_mlp(seed=4, dtype=torch.float32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"tensor `{key}`.*dtype I32.*records 'float32'"):
        load_compressed(folder, model=target)
    assert_bit_identical(before, target.state_dict())
    folder = save_compressed(model, tmp_path / "m")
    (folder / "jactus.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"jactus\.json is not valid JSON"):
        load_compressed(folder, model=target)
    config = {
        "format": "jactus_linalg.model/1",
        "architecture": "Sequential",
        "layers": {"0": {"core": "x"}},
        "shapes": {},
        "dtypes": {},
    }
    (folder / "jactus.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"malformed record for layer `0`"):
        load_compressed(folder, model=target)
    assert_bit_identical(before, target.state_dict())


# --- values, sizes and names a file may not smuggle in ----------------------------------


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    model, batches = compressed_mlp()
    return model, batches, save_compressed(model, tmp_path_factory.mktemp("mlp") / "m")


def _copy_folder(folder, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for p in folder.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_stored_factor_is_refused_naming_the_tensor(tmp_path, saved_mlp, value):
    """A NaN written into a factor (same shapes and dtypes) is refused; the model is untouched.

    Before: it loaded silently, and every output was NaN.
    """
    _, _, saved = saved_mlp
    folder = _copy_folder(saved, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["2.core.weight"][0, 1] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "jactus_linalg.model/1"})
    target = make_mlp(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    counts = "1 NaN, 0 Inf" if value != value else "0 NaN, 1 Inf"
    with pytest.raises(ValueError, match=rf"tensor `2\.core\.weight` in .*copy.*\({counts}\)"):
        load_compressed(folder, model=target)
    assert_bit_identical(before, target.state_dict())


def test_deeply_nested_json_is_a_value_error_naming_the_path(tmp_path, saved_mlp, saved_stats):
    """JSON nested 10^5 deep made both loaders raise RecursionError."""
    _, _, saved = saved_mlp
    folder = _copy_folder(saved, tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    (folder / "jactus.json").write_text(deep)
    with pytest.raises(ValueError, match=rf"`folder` {folder}: jactus\.json .*nested too deeply"):
        load_compressed(folder, model=make_mlp())
    _, path = saved_stats

    def nest(header):
        header["__metadata__"]["jactus"] = '{"format": ' + deep + "}"

    rewrite_safetensors_header(path, nest)
    with pytest.raises(ValueError, match=rf"`path` {path} .*nested too deeply"):
        CalibrationStats.load(path)


def test_a_directory_named_like_a_file_is_a_value_error(tmp_path, saved_mlp):
    """A directory `x.safetensors` gave "OSError: No such device"."""
    directory = tmp_path / "x.safetensors"
    directory.mkdir()
    with pytest.raises(ValueError, match=rf"`path` {directory} is a directory"):
        CalibrationStats.load(directory)
    _, _, saved = saved_mlp
    folder = _copy_folder(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match=rf"`folder` {folder} lacks model\.safetensors"):
        load_compressed(folder, model=make_mlp())


def test_targets_patterns_from_a_file_are_never_executed(tmp_path, monkeypatch):
    """Statistics files record the layer names their targets selected; patterns stay inert.

    A pattern stored in a file (tampered, or from an older version) would be
    run by ``compress`` on every layer name: ``(.*)*X`` hangs it. Now a loaded
    file's pattern is never compiled.
    """
    stats = calibrate(make_mlp(), make_batches(n=2), mlp_loss, targets=r"[02]", progress=False)
    assert stats.meta["target_names"] == ["0", "2"]
    path = stats.save(tmp_path / "s.safetensors")
    compiled = []
    real_compile = re.compile

    def spy(pattern, *args, **kwargs):
        compiled.append(pattern)
        return real_compile(pattern, *args, **kwargs)

    monkeypatch.setattr(jtargets.re, "compile", spy)
    loaded = CalibrationStats.load(path)
    assert loaded.meta["targets"] == ["0", "2"] and loaded.meta["exclude"] is None
    assert loaded.meta["targets_pattern"] == {"targets": "[02]"}
    model = make_mlp()
    compress(model, loaded, retain=0.4, progress=False)
    assert compiled == []  # only the resolved names were matched
    assert isinstance(model[0], JactusLinear) and isinstance(model[2], JactusLinear)

    for meta_edit in (
        {"targets": r"(.*)*X", "exclude": None},  # an older file: a pattern, no names
        {"targets": r"(.*)*X", "exclude": "(", "target_names": ["0", "2"]},  # a tampered one
    ):

        def tamper(header, meta_edit=meta_edit):
            record = json.loads(header["__metadata__"]["jactus"])
            record["meta"] = {**{k: v for k, v in record["meta"].items() if k != "target_names"},
                              **meta_edit}
            header["__metadata__"]["jactus"] = json.dumps(record)

        rewrite_safetensors_header(path, tamper)
        loaded = CalibrationStats.load(path)
        assert loaded.meta.get("targets") in (None, ["0", "2"])
        assert loaded.meta["targets_pattern"]["targets"] == r"(.*)*X"
        start = time.perf_counter()
        compress(make_mlp(), loaded, retain=0.4, progress=False)
        assert time.perf_counter() - start < 30
        assert compiled == []


def test_invalid_meta_targets_are_refused(saved_stats):
    _, path = saved_stats

    def tamper(header):
        record = json.loads(header["__metadata__"]["jactus"])
        record["meta"]["targets"] = {"not": "a pattern"}
        header["__metadata__"]["jactus"] = json.dumps(record)

    rewrite_safetensors_header(path, tamper)
    with pytest.raises(ValueError, match=r"malformed jactus calibration header.*meta\.targets"):
        CalibrationStats.load(path)


# --- a Hugging Face model rebuilt from its folder's config -------------------------------


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama with its attention projections factored (nothing kept dense)."""
    model, batches = tiny_llama(), llama_batches()
    stats = calibrate(model, batches, hf_loss, targets=["q_proj", "o_proj"], progress=False)
    compress(model, stats, retain=0.88, progress=False)
    factored = [n for n, m in model.named_modules() if isinstance(m, JactusLinear)]
    assert len(factored) == 4, "every target factored (a dense one would need merging)"
    return model, batches, save_compressed(model, tmp_path_factory.mktemp("llama") / "m")


def _edit_config(folder, edit) -> None:
    config = json.loads((folder / "jactus.json").read_text())
    edit(config)
    (folder / "jactus.json").write_text(json.dumps(config))


class _BuildSpy:
    """Records the device each LlamaForCausalLM is constructed on."""

    def __init__(self, monkeypatch):
        self.devices: list[str] = []
        real = transformers.LlamaForCausalLM.__init__

        def init(model_self, *args, **kwargs):
            self.devices.append(torch.empty(0).device.type)
            real(model_self, *args, **kwargs)

        monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", init)


def test_rebuilt_model_loads_and_runs(saved_llama, monkeypatch):
    model, batches, folder = saved_llama
    spy = _BuildSpy(monkeypatch)
    again = load_compressed(folder)
    assert spy.devices == ["meta", "cpu"]  # checked on the meta device, then built once
    with torch.no_grad():
        assert torch.equal(again(**batches[0]).logits, model(**batches[0]).logits)


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("vocab_size", 10**6, r"tensor `\S+` in .*copy has shape \[96, 48\]; the model needs \[1000000, 48\]"),
        ("hidden_size", 4096, r"`model` has no 48x48 linear layer `model\.layers\.0\.self_attn\.q_proj`"),
        ("num_hidden_layers", 3, r"tensors do not match the model: unexpected \[\], missing \['model\.layers\.2"),
        ("num_hidden_layers", 10**9, r"num_hidden_layers=1000000000.*holds only \d+ tensors"),
    ],
)
def test_config_claims_are_checked_before_anything_is_allocated(
    tmp_path, saved_llama, monkeypatch, field, value, pattern
):
    """A `jactus.json` claiming a huge vocabulary was built (and allocated) before any check.

    Now the model the config describes is built on the meta device first and
    must hold exactly the stored tensors; layer counts are bounded by the
    number of tensors before even that.
    """
    _, _, saved = saved_llama
    folder = _copy_folder(saved, tmp_path)
    _edit_config(folder, lambda c: c["config"].__setitem__(field, value))
    spy = _BuildSpy(monkeypatch)
    with pytest.raises(ValueError, match=pattern):
        load_compressed(folder)
    assert set(spy.devices) <= {"meta"}, "a model was allocated before the checks"


def test_config_implying_a_much_larger_dense_model_is_refused(saved_llama, monkeypatch):
    """The dense model a config implies may be at most `_MAX_EXPANSION` times the file's tensors."""
    _, _, folder = saved_llama
    monkeypatch.setattr(jio, "_MAX_EXPANSION", 1)
    spy = _BuildSpy(monkeypatch)
    with pytest.raises(ValueError, match=r"dense model of \d+ parameters, more than 1 times.*pass `model`"):
        load_compressed(folder)
    assert spy.devices == ["meta"]


@pytest.mark.parametrize(
    ("architecture", "pattern"),
    [
        ("set_seed", r"architecture 'set_seed' is not a transformers model class"),
        ("LlamaConfig", r"architecture 'LlamaConfig' is not a transformers model class"),
        ("ViTForImageClassification", r"does not build a ViTForImageClassification"),
        ("os.system", r"cannot rebuild architecture 'os\.system'"),
    ],
)
def test_architecture_must_be_a_model_class(tmp_path, saved_llama, monkeypatch, architecture, pattern):
    """`architecture` named any callable of `transformers`, and it was called."""
    _, _, saved = saved_llama
    folder = _copy_folder(saved, tmp_path)
    _edit_config(folder, lambda c: c.__setitem__("architecture", architecture))
    called = []
    monkeypatch.setattr(transformers, "set_seed", lambda *a, **k: called.append(a))
    with pytest.raises(ValueError, match=pattern):
        load_compressed(folder)
    assert called == []
