"""torch/targets.py: which linear layers are compressed (PEFT-style ``targets``), and the meta-device check.

``find_targets`` directly on small module trees, then through
:func:`~jactus_linalg.torch.calibrate` and :func:`~jactus_linalg.torch.compress`
on real (tiny) Hugging Face models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jactus_linalg.torch import calibrate, compress
from jactus_linalg.torch.merge import MergeableLinear
from jactus_linalg.torch.targets import HEAD_NAMES, check_materialized, find_targets

from .models import hf_loss, llama_batches, tiny_llama, tiny_vit, vit_batches
from .tiny_mlp import make_batches, make_mlp, mlp_loss


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.xq_proj = nn.Linear(4, 4)  # ends with "q_proj" but not with ".q_proj"
        self.up = nn.Linear(4, 8)
        self.act = nn.GELU()


class Net(nn.Module):
    """``blocks.{0,1}.{q_proj,xq_proj,up}``, a conv, and an output head named ``out``."""

    def __init__(self, head_name: str = "lm_head") -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(4, 4, 1)
        setattr(self, head_name, nn.Linear(8, 3))
        self.head_name = head_name

    def get_output_embeddings(self) -> nn.Module:
        return getattr(self, self.head_name)


ALL = [f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "xq_proj", "up")]


def test_all_linear_is_every_plain_linear_but_the_head_in_module_order():
    assert list(find_targets(Net())) == ALL
    found = find_targets(Net(), include_head=True)
    assert list(found) == [*ALL, "lm_head"]
    assert all(type(m) is nn.Linear for m in found.values())  # not the conv


def test_the_head_is_found_by_get_output_embeddings_under_any_name():
    """A head named ``out`` (not in HEAD_NAMES) is still the model's output embedding."""
    assert "out" not in HEAD_NAMES
    assert list(find_targets(Net(head_name="out"))) == ALL
    assert list(find_targets(Net(head_name="out"), include_head=True))[-1] == "out"


def test_a_model_without_output_embeddings_keeps_layers_not_named_like_heads():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    assert list(find_targets(model)) == ["0", "2"]  # nothing named like a head: nothing excluded


def test_names_match_the_whole_name_or_a_dotted_suffix():
    assert list(find_targets(Net(), ["q_proj"])) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    assert list(find_targets(Net(), ["1.up", "blocks.0.q_proj"])) == ["blocks.0.q_proj", "blocks.1.up"]
    with pytest.raises(ValueError, match=r"matched no nn\.Linear"):
        find_targets(Net(), ["proj"])  # a part of a name, not a dotted suffix


def test_a_string_is_a_regex_matched_against_the_whole_name():
    assert list(find_targets(Net(), r".*q_proj")) == [n for n in ALL if n.endswith("q_proj")]
    assert list(find_targets(Net(), r"blocks\.1\..*")) == ALL[3:]
    with pytest.raises(ValueError, match=r"matched no nn\.Linear"):
        find_targets(Net(), "q_proj")  # fullmatch, not search: no qualified name is just `q_proj`


@pytest.mark.parametrize("exclude", [["xq_proj", "0.up"], r".*xq_proj|blocks\.0\.up"], ids=["names", "regex"])
def test_exclude_drops_layers_after_matching(exclude):
    assert list(find_targets(Net(), exclude=exclude)) == [
        "blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.up",
    ]


def test_subclasses_of_linear_are_not_targets():
    """Only exact ``nn.Linear``: layers already wrapped (a mergeable core) are left alone."""
    net = Net()
    net.blocks[0].up = MergeableLinear.from_linear(
        net.blocks[0].up, torch.eye(8, 2), torch.eye(4, 2)
    )
    assert "blocks.0.up" not in find_targets(net)


@pytest.mark.parametrize("targets", [3, [1, 2], None, [b"q_proj"]])
def test_targets_of_another_type_is_a_type_error(targets):
    with pytest.raises(TypeError, match=r"`targets` must be 'all-linear', a list of names or a regex"):
        find_targets(Net(), targets)


def test_nothing_matched_lists_the_linear_layers_that_exist():
    with pytest.raises(ValueError, match=r"head excluded: \['lm_head'\].*include: blocks\.0\.q_proj"):
        find_targets(Net(), ["nonexistent"])
    with pytest.raises(ValueError, match=r"matched no nn\.Linear"):
        find_targets(Net(), exclude=r".*")  # everything excluded


@pytest.mark.parametrize("argument", ["targets", "exclude"])
def test_invalid_regex_names_the_argument(argument):
    """Before: `re.error` from deep inside the matcher."""
    kwargs = {argument: "layers.(0"}
    with pytest.raises(ValueError, match=rf"`{argument}`='layers\.\(0' is not a valid regular expression"):
        calibrate(make_mlp(), make_batches(n=1), mlp_loss, progress=False, **kwargs)


# -- through calibrate, on Hugging Face models -------------------------------


def test_head_is_excluded_by_default():
    stats = calibrate(tiny_llama(), llama_batches(n=1), hf_loss, progress=False)
    assert "lm_head" not in stats
    stats = calibrate(tiny_vit(), vit_batches(n=1), hf_loss, progress=False)
    assert "classifier" not in stats
    assert any(name.endswith("attention.q_proj") for name in stats)


def test_targets_by_names_and_regex():
    model = tiny_llama()
    by_name = calibrate(model, llama_batches(n=1), hf_loss, targets=["q_proj", "v_proj"], progress=False)
    assert sorted(by_name) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    by_regex = calibrate(model, llama_batches(n=1), hf_loss, targets=r".*mlp\..*", progress=False)
    assert len(by_regex) == 6


def test_target_matching_nothing_raises():
    with pytest.raises(ValueError, match=r"targets.*matched no nn\.Linear"):
        calibrate(tiny_llama(), llama_batches(n=1), hf_loss, targets=["nonexistent"], progress=False)


# -- check_materialized -------------------------------------------------------


def test_a_loaded_model_passes_the_meta_check():
    check_materialized(make_mlp(), "calibrate")  # no exception: every parameter holds values


def test_meta_device_model_is_refused():
    """Before: "Tensor.item() cannot be called on meta tensors", from calibrate and compress."""
    stats = calibrate(make_mlp(), make_batches(), mlp_loss, targets=["0", "2"], progress=False)
    with torch.device("meta"):
        model = make_mlp()
    for action, call in (
        ("calibrate", lambda: calibrate(model, make_batches(n=1), mlp_loss, progress=False)),
        ("compress", lambda: compress(model, stats, retain=0.4, progress=False)),
    ):
        with pytest.raises(
            ValueError,
            match=rf"`model` has 6 parameter\(s\) on the meta device \(e\.g\. `0\.weight`\).*then {action}$",
        ):
            call()
