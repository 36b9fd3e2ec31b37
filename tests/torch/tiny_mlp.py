"""A tiny MLP, its calibration batches, and helpers shared by the reliability tests.

The model is built here (no ``transformers``), so that the spawned processes
of the two-process tests start quickly.
"""

from __future__ import annotations

import json
import struct

import torch
from torch import nn

from jactus_linalg.torch import CalibrationStats, calibrate, compress

IN, HIDDEN, OUT = 12, 32, 3


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Targets ``0`` (12 -> 32), ``2`` (32 -> 32), ``4`` (32 -> 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, OUT),
    ).to(dtype)


def make_batches(
    n: int = 4, size: int = 24, seed: int = 1, dead: int | None = None, dtype=torch.float64
):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, IN, generator=g, dtype=torch.float64)
        if dead is not None:
            x[:, dead] = 0.0  # a dead input unit: this feature is never active
        out.append((x.to(dtype), torch.randint(0, OUT, (size,), generator=g)))
    return out


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x).float(), y)


def compressed_mlp(seed: int = 0, dtype: torch.dtype = torch.float64):
    """The MLP with layers ``0`` and ``2`` factored (neither kept dense), and its batches."""
    model, batches = make_mlp(seed, dtype), make_batches(dtype=dtype)
    stats = calibrate(model, batches, mlp_loss, targets=["0", "2"], progress=False)
    compress(model, stats, retain=0.4, progress=False)
    assert all(type(model[i]).__name__ == "JactusLinear" for i in (0, 2))
    return model, batches


def layer_report(report, name: str):
    return next(r for r in report.layers if r.name == name)


def stat_tensors(stats: CalibrationStats) -> dict[str, torch.Tensor]:
    out = {f"input/{k}": a.total for k, a in stats.inputs.items()}
    out |= {f"grad/{k}": a.total for k, a in stats.grads.items()}
    out |= {f"grad_sum/{k}": t for k, t in stats.grad_sums.items()}
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def rewrite_safetensors_header(path, edit) -> None:
    """Edit the JSON header of a safetensors file in place (the data bytes are kept)."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])
