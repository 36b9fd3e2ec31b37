"""A loaded model runs: each stored tensor takes a dtype consistent with the model it goes into.

Stored tensors are cast to the dtypes of the model they are loaded into;
each factored layer takes the dtype of the layer it replaces, except a core
saved in another dtype than its factors (``mark_trainable(core_dtype=...)``),
which keeps its saved dtype. ``docs/failure-modes.md`` lists these promises.
"""

from __future__ import annotations

import pytest
import torch

from jactus_linalg.torch import JactusLinear, load_compressed, mark_trainable, save_compressed

from ..numerics import tolerance
from .models import hf_loss, llama_batches, tiny_llama
from .tiny_mlp import HIDDEN, compressed_mlp, make_mlp


def _factor_dtypes(model) -> dict[str, tuple[torch.dtype, torch.dtype, torch.dtype]]:
    return {
        name: (m.right_proj.weight.dtype, m.core.weight.dtype, m.left_proj.weight.dtype)
        for name, m in model.named_modules()
        if isinstance(m, JactusLinear)
    }


def test_bf16_model_with_float32_cores_loads_and_runs(tmp_path):
    """`mark_trainable(core_dtype=torch.float32)` on a bf16 model, saved and loaded.

    Before: every factor was built in the core's dtype, and forward failed
    with "expected m1 and m2 to have the same dtype".
    """
    model, batches = compressed_mlp(dtype=torch.bfloat16)
    mark_trainable(model, core_dtype=torch.float32)
    folder = save_compressed(model, tmp_path / "m")
    loaded = load_compressed(folder, model=make_mlp(seed=3, dtype=torch.bfloat16))
    bf16, f32 = torch.bfloat16, torch.float32
    assert _factor_dtypes(loaded) == dict.fromkeys(("0", "2"), (bf16, f32, bf16))
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # the same dtypes, so the same output
    # into a float32 model: everything float32 (the bf16 factors convert exactly)
    wide = load_compressed(folder, model=make_mlp(seed=3, dtype=f32))
    assert _factor_dtypes(wide) == dict.fromkeys(("0", "2"), (f32, f32, f32))
    with torch.no_grad():
        out = wide(x.float())
        assert out.dtype == f32
        gap = (out - model(x).float()).abs().max()
        assert gap <= tolerance(bf16, HIDDEN) * out.abs().max()  # bf16 rounding of activations


def test_float64_files_load_into_a_float32_model_cast_to_its_dtype(tmp_path):
    """Before: the factors stayed float64 beside float32 layers; forward failed for both inputs."""
    model, batches = compressed_mlp(dtype=torch.float64)
    folder = save_compressed(model, tmp_path / "m")
    loaded = load_compressed(folder, model=make_mlp(seed=3, dtype=torch.float32))
    assert {v.dtype for v in loaded.state_dict().values()} == {torch.float32}
    x = batches[0][0]
    with torch.no_grad():
        out = loaded(x.float())
        reference = model(x)
    assert out.dtype == torch.float32
    assert (out.double() - reference).abs().max() <= tolerance(torch.float32, HIDDEN) * reference.abs().max()


def test_float32_values_beyond_float16_are_refused(tmp_path):
    """Casting to the model's dtype never creates an Inf: such a file is refused, naming the tensor."""
    model, _ = compressed_mlp(dtype=torch.float32)
    with torch.no_grad():
        model[2].core.weight[0, 0] = 1e6  # beyond float16's 65504
    folder = save_compressed(model, tmp_path / "m")
    target = make_mlp(seed=3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"tensor `2\.core\.weight` .*overflows the model's dtype torch\.float16"):
        load_compressed(folder, model=target)
    assert all(type(m) is not JactusLinear for m in target)


def test_rebuilt_bf16_model_takes_the_saved_dtype(tmp_path):
    """Rebuilt from its config, a bf16 Llama (float32 cores) is bf16 again, and runs."""
    from jactus_linalg.torch import calibrate, compress

    model, batches = tiny_llama(), llama_batches()
    stats = calibrate(model, batches, hf_loss, targets=["q_proj", "o_proj"], progress=False)
    compress(model, stats, retain=0.88, progress=False)
    model = model.to(torch.bfloat16)
    mark_trainable(model, core_dtype=torch.float32)
    loaded = load_compressed(save_compressed(model, tmp_path / "m"))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert set(_factor_dtypes(loaded).values()) == {(torch.bfloat16, torch.float32, torch.bfloat16)}
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, model(**batches[0]).logits)
