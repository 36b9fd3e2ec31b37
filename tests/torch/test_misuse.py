"""API misuse: each error names the argument, says what was seen and what to do.

``docs/failure-modes.md`` lists these promises.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jactus_linalg.torch import (
    calibrate,
    compress,
    load_compressed,
    mark_trainable,
    save_compressed,
)

from .tiny_mlp import (
    HIDDEN,
    IN,
    OUT,
    make_batches,
    make_mlp,
    mlp_loss,
)


@pytest.fixture(scope="module")
def calibrated_mlp():
    model = make_mlp()
    return model, calibrate(model, make_batches(), mlp_loss, targets=["0", "2"], progress=False)


def test_misuse_errors_say_what_to_do(calibrated_mlp, tmp_path):
    """Each misuse names the problem and the fix."""
    model, stats = calibrated_mlp
    done = copy.deepcopy(model)
    compress(done, stats, retain=0.4, progress=False)  # both targets factored
    with pytest.raises(ValueError, match=r"already compressed.*compress the original dense model"):
        compress(done, stats, retain=0.4, progress=False)
    with pytest.raises(
        ValueError, match=r"already compressed.*calibrate and compress the original dense model"
    ):
        calibrate(done, make_batches(), mlp_loss, progress=False)
    other = nn.Sequential(
        nn.Linear(IN, 16), nn.GELU(), nn.Linear(16, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT)
    ).double()
    with pytest.raises(ValueError, match=r"statistics from another model.*calibrate this model"):
        compress(other, stats, retain=0.7, progress=False)
    with pytest.raises(
        ValueError, match=r"matched no nn.Linear.*include: 0, 2, 4.*Pass 'all-linear'"
    ):
        calibrate(
            copy.deepcopy(model), make_batches(), mlp_loss, targets=r"layers\.\d+\.q_proj", progress=False
        )
    with pytest.raises(ValueError, match=r"`retain`=0.01 is too small.*(raise `retain`|`retain` must be at least)"):
        compress(copy.deepcopy(model), stats, retain=0.01, progress=False)
    with pytest.raises(ValueError, match=r"no JactusLinear.*save a compressed model"):
        save_compressed(copy.deepcopy(model), tmp_path / "m")
    with pytest.raises(ValueError, match=r"compress it first"):
        mark_trainable(copy.deepcopy(model))
    folder = save_compressed(done, tmp_path / "m")
    with pytest.raises(
        ValueError,
        match=r"holds a Sequential but `model` is a Linear: pass a freshly constructed Sequential",
    ):
        load_compressed(folder, model=nn.Linear(2, 2))


@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_detached_loss_names_loss_fn(how):
    """Before: torch's "element 0 of tensors does not require grad", naming nothing."""

    def detached(model, batch):
        if how == "detach":
            return mlp_loss(model, batch).detach()
        with torch.no_grad():
            return mlp_loss(model, batch)

    model = make_mlp()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"`loss_fn` returned a loss that does not require grad at batch 0.*detach"):
        calibrate(model, make_batches(n=2), detached, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
