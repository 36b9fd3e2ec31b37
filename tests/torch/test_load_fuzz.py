"""Fuzzing both loaders: whatever a file's headers say, the result runs or is a ``ValueError``.

Hypothesis edits the safetensors header of a saved statistics file and of a
saved model (tensor shapes, dtypes, byte offsets, names, metadata, JSON
nested deeply) and the ``jactus.json`` beside the model (layer records,
recorded shapes and dtypes, the architecture, the Hugging Face config).
Every case must give statistics that compress a model, or a model whose
forward pass runs, or a ``ValueError``: never another exception, never a
hang. Each case is bounded in time (``_SECONDS``), and the test in memory
(``_MEGABYTES`` of peak resident memory growth): a header that claims a
terabyte is refused from the header alone.
"""

from __future__ import annotations

import json
import resource
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jactus_linalg.torch import CalibrationStats, calibrate, compress, load_compressed, save_compressed

from .models import hf_loss, llama_batches, tiny_llama
from .tiny_mlp import OUT, compressed_mlp, make_batches, make_mlp, mlp_loss

_SECONDS = 20.0
_MEGABYTES = 1024
_EXAMPLES = 2 * settings.default.max_examples
_FUZZ = settings(
    max_examples=_EXAMPLES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: How the cases ended; each test checks that both outcomes occurred.
OUTCOMES: Counter[str] = Counter()
_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "Q4"]


def _split(raw: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _join(header_text: str, data: bytes) -> bytes:
    text = header_text.encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
sizes = st.integers(0, 48) | st.sampled_from([10**6, 2**31, 2**40, -1])


@st.composite
def tensor_edits(draw, names: list[str], data_size: int):
    """One edit of a safetensors header: ``(kind, tensor name, value)``."""
    kind = draw(st.sampled_from(["shape", "dtype", "offsets", "drop", "rename", "entry"]))
    name = draw(st.sampled_from(names))
    if kind == "shape":
        return kind, name, draw(st.lists(sizes, max_size=3))
    if kind == "dtype":
        return kind, name, draw(st.sampled_from(_DTYPES))
    if kind == "offsets":
        bound = st.integers(-8, data_size + 64) | st.sampled_from([2**40, 2**63])
        return kind, name, [draw(bound), draw(bound)]
    if kind == "rename":
        return kind, name, draw(st.text(max_size=12))
    if kind == "entry":
        return kind, name, draw(json_values)
    return kind, name, None


def _apply_tensor_edit(header: dict, edit) -> None:
    kind, name, value = edit
    if name not in header:
        return
    if kind == "drop":
        header.pop(name)
    elif kind == "rename":
        header[value] = header.pop(name)
    elif kind == "entry":
        header[name] = value
    elif isinstance(header[name], dict):
        field = {"shape": "shape", "dtype": "dtype", "offsets": "data_offsets"}[kind]
        header[name][field] = value


@st.composite
def header_edits(draw, names: tuple[str, ...], data_size: int, metadata: bool):
    """How to edit a safetensors header: tensor entries, the metadata record, deep nesting."""
    tensors = draw(st.lists(tensor_edits(list(names), data_size), max_size=3))
    record = None
    if metadata and draw(st.booleans()):
        record = ("field", draw(st.text(max_size=8) | st.sampled_from(
            ["format", "layers", "counts", "modes", "n_batches", "meta"]
        )), draw(json_values)) if draw(st.booleans()) else ("whole", None, draw(json_values))
    nest = None
    if draw(st.integers(0, 9)) == 0:  # JSON nested deeply, in the metadata or a tensor entry
        nest = (draw(st.booleans()), draw(st.sampled_from([64, 200, 5000, 200_000])))
    return tensors, record, nest


def _edited_file(raw: bytes, edits, metadata_key: str | None) -> bytes:
    header, data = _split(raw)
    tensors, record, nest = edits
    for edit in tensors:
        _apply_tensor_edit(header, edit)
    if record is not None and metadata_key is not None:
        kind, key, value = record
        if kind == "whole":
            header["__metadata__"][metadata_key] = json.dumps(value)
        else:
            content = json.loads(header["__metadata__"][metadata_key])
            content[key] = value
            header["__metadata__"][metadata_key] = json.dumps(content)
    text = json.dumps(header)
    if nest is not None:
        in_metadata, depth = nest
        if in_metadata and metadata_key is not None:
            header["__metadata__"][metadata_key] = '{"format": ' + _deep(depth) + "}"
            text = json.dumps(header)
        else:
            text = text[:-1] + ', "nested": ' + _deep(depth) + "}"
    return _join(text, data)


def _edits_for(raw: bytes, metadata: bool):
    header, data = _split(raw)
    names = tuple(k for k in header if k != "__metadata__")
    return header_edits(names, len(data), metadata)


class _Bound:
    """Time per case and peak memory growth over the whole test."""

    def __init__(self):
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def case(self, fn):
        start = time.perf_counter()
        try:
            return fn()
        finally:
            assert time.perf_counter() - start < _SECONDS, "a fuzzed file took too long"

    def check_memory(self):
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss) / 1024
        assert grown < _MEGABYTES, f"peak memory grew by {grown:.0f} MB"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    model, batches = compressed_mlp()
    folder = save_compressed(model, tmp / "model")
    stats = calibrate(make_mlp(), make_batches(n=2), mlp_loss, targets=["0", "2"], progress=False)
    path = stats.save(tmp / "stats.safetensors")
    return {
        "stats": path.read_bytes(),
        "weights": (folder / "model.safetensors").read_bytes(),
        "config": json.loads((folder / "jactus.json").read_text()),
        "x": batches[0][0],
    }


def _stats_case(path: Path, x: torch.Tensor) -> None:
    try:
        stats = CalibrationStats.load(path)
    except ValueError:
        OUTCOMES["statistics: refused by load"] += 1
        return
    model = make_mlp()
    try:
        compress(model, stats, retain=0.4, progress=False)
    except ValueError:
        OUTCOMES["statistics: loaded, refused by compress"] += 1
        return
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], OUT)
    OUTCOMES["statistics: loaded and compressed"] += 1


@pytest.fixture(scope="module")
def bound():
    b = _Bound()
    yield b
    b.check_memory()


def test_fuzzed_statistics_files_load_or_are_value_errors(saved, tmp_path, bound):
    path = tmp_path / "fuzzed.safetensors"

    @_FUZZ
    @given(edits=_edits_for(saved["stats"], metadata=True))
    def run(edits):
        path.write_bytes(_edited_file(saved["stats"], edits, "jactus"))
        bound.case(lambda: _stats_case(path, saved["x"]))

    run()
    assert OUTCOMES["statistics: loaded and compressed"] > 0
    assert OUTCOMES["statistics: refused by load"] > 0


@st.composite
def config_edits(draw, config: dict):
    """``jactus.json`` with one or two fields replaced, a layer record edited, or nested deeply."""
    config = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["top", "layer", "shape", "dtype", "nest"]))
        if kind == "top":
            config[draw(st.sampled_from(sorted(config)))] = draw(json_values)
        elif kind == "layer" and isinstance(config.get("layers"), dict) and config["layers"]:
            name = draw(st.sampled_from(sorted(config["layers"])))
            record = config["layers"][name]
            if isinstance(record, dict) and record:
                field = draw(st.sampled_from(sorted(record)))
                record[field] = draw(st.lists(sizes, min_size=2, max_size=2) | sizes | json_values)
        elif kind in ("shape", "dtype") and isinstance(config.get(kind + "s"), dict):
            table = config[kind + "s"]
            if table:
                key = draw(st.sampled_from(sorted(table)))
                table[key] = draw(st.lists(sizes, max_size=3)) if kind == "shape" else draw(
                    st.sampled_from(["float64", "float32", "bfloat16", "int32", "bool", "complex64"])
                )
        elif kind == "nest":
            return '{"format": "jactus_linalg.model/1", "layers": ' + _deep(
                draw(st.sampled_from([64, 5000, 200_000]))
            ) + "}"
    return json.dumps(config)


def _model_case(folder: Path, x: torch.Tensor) -> None:
    try:
        model = load_compressed(folder, model=make_mlp(seed=5))
    except ValueError:
        OUTCOMES["model: refused"] += 1
        return
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], OUT)
    OUTCOMES["model: loaded and ran"] += 1


def test_fuzzed_model_folders_load_and_run_or_are_value_errors(saved, tmp_path, bound):
    folder = tmp_path / "fuzzed"
    folder.mkdir()

    @_FUZZ
    @given(edits=_edits_for(saved["weights"], metadata=False), config=config_edits(saved["config"]))
    def run(edits, config):
        (folder / "model.safetensors").write_bytes(_edited_file(saved["weights"], edits, None))
        (folder / "jactus.json").write_text(config)
        bound.case(lambda: _model_case(folder, saved["x"]))

    run()
    assert OUTCOMES["model: loaded and ran"] > 0 and OUTCOMES["model: refused"] > 0


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model, batches = tiny_llama(), llama_batches()
    stats = calibrate(model, batches, hf_loss, targets=["q_proj", "o_proj"], progress=False)
    compress(model, stats, retain=0.88, progress=False)
    folder = save_compressed(model, tmp_path_factory.mktemp("llama") / "m")
    return folder, json.loads((folder / "jactus.json").read_text()), batches[0]


_HF_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
]
_ARCHITECTURES = [
    "LlamaForCausalLM", "LlamaModel", "ViTForImageClassification", "PreTrainedModel",
    "AutoModel", "LlamaConfig", "set_seed", "pipeline", "os.system", "",
]


def test_fuzzed_hugging_face_configs_rebuild_and_run_or_are_value_errors(saved_llama, tmp_path, bound):
    """Rebuilt from the folder alone: size claims, layer counts and classes from a stranger."""
    folder, config, batch = saved_llama
    fuzzed = tmp_path / "fuzzed"
    fuzzed.mkdir()
    (fuzzed / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())

    def case():
        try:
            model = load_compressed(fuzzed)
        except ValueError:
            OUTCOMES["config: refused"] += 1
            return
        with torch.no_grad():
            assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
        OUTCOMES["config: rebuilt and ran"] += 1

    @_FUZZ
    @given(
        fields=st.dictionaries(
            st.sampled_from(_HF_FIELDS),
            st.integers(-2, 96) | st.sampled_from([10**6, 10**9, 2**62]) | json_values,
            max_size=3,
        ),
        architecture=st.sampled_from(_ARCHITECTURES),
    )
    def run(fields, architecture):
        edited = json.loads(json.dumps(config))
        edited["config"].update(fields)
        edited["architecture"] = architecture
        (fuzzed / "jactus.json").write_text(json.dumps(edited))
        bound.case(case)

    run()
    assert OUTCOMES["config: rebuilt and ran"] > 0 and OUTCOMES["config: refused"] > 0
