"""Benchmark problems: layer shapes, one layer's weight and statistics with known spectra, the ViT models.

The matrices come from :mod:`jactus_linalg.testing` (the tests' and docs examples' known-spectrum
helpers); the geometric spectra are from 1 down to ``ratio``.

Part of ``validation/bench.py`` (run that; ``--only`` selects benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jactus_linalg import break_even_rank, factor_params
from jactus_linalg.testing import tokens_with_spectrum, with_spectrum

VIT_SHAPES = [(768, 768), (3072, 768), (768, 3072)]
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(192, 192), (384, 192), (192, 384)]
TASK_FRACTION = 0.25
TOKENS_PER_FEATURE = 1.25  # calibration tokens per feature of the wider side
TASK_RANK = 16  # rank of the input-gradient coupling that makes G = E[g x^T] informative


@dataclass
class LayerProblem:
    """Weight and realistic statistics of one layer (float64 numpy)."""

    weight: np.ndarray
    input_cov: np.ndarray
    grad_cov: np.ndarray
    grad_mean: np.ndarray
    tokens: int


def decaying_tokens(rng: np.random.Generator, count: int, dim: int, ratio: float) -> np.ndarray:
    """``count`` tokens whose second moment has a geometric spectrum from 1 down to ``ratio``."""
    return tokens_with_spectrum(rng, count, np.geomspace(1.0, ratio, dim))


def known_spectrum_matrix(rng: np.random.Generator, m: int, n: int, ratio: float) -> np.ndarray:
    """``P diag(s) Qᵀ`` (m x n) with ``s`` geometric from 1 down to ``ratio``."""
    return with_spectrum(rng, m, n, np.geomspace(1.0, ratio, min(m, n)))


def layer_problem(m: int, n: int, seed: int = 0) -> LayerProblem:
    """Weight ``W`` (m x n) with a decaying spectrum and statistics from N > max(m, n) tokens.

    Inputs ``x`` have a covariance spectrum decaying over 4 decades; output
    gradients are ``g = g0 + T x`` with ``g0`` of a decaying spectrum and a
    rank-16 task map ``T``, so ``G = E[g xᵀ]`` carries a low-rank signal
    above sampling noise, as a real task gradient does.
    """
    rng = np.random.default_rng(seed)
    tokens = math.ceil(TOKENS_PER_FEATURE * max(m, n))
    weight = known_spectrum_matrix(rng, m, n, 1e-3)
    x = decaying_tokens(rng, tokens, n, 1e-4)
    g = decaying_tokens(rng, tokens, m, 1e-4)
    task = (rng.standard_normal((n, TASK_RANK)), rng.standard_normal((m, TASK_RANK)))
    g += (x @ task[0]) @ task[1].T / math.sqrt(n * TASK_RANK)
    return LayerProblem(
        weight=weight,
        input_cov=x.T @ x / tokens,
        grad_cov=g.T @ g / tokens,
        grad_mean=g.T @ x / tokens,
        tokens=tokens,
    )


def typical_rank(m: int, n: int, keep: float = 0.8) -> int:
    """Largest rank whose factors hold at most ``keep`` of the dense layer's parameters."""
    r = break_even_rank(m, n)
    while r > 1 and factor_params(m, n, r) > keep * m * n:
        r -= 1
    return r


def fast_max_rank(m: int, n: int) -> int:
    """``max_rank`` = k + j for the fast path: 10% of ``min(m, n)``."""
    return max(int(0.1 * min(m, n)), 1)


def shapes_for(which: str, quick: bool) -> list[tuple[int, int]]:
    """Layer shapes of a run: ``default`` is ViT-Base plus Llama's 4096x4096."""
    if quick:
        return QUICK_SHAPES
    return {
        "default": [*VIT_SHAPES, LLAMA_SHAPES[0]],
        "vit": VIT_SHAPES,
        "llama": LLAMA_SHAPES,
        "all": [*VIT_SHAPES, *LLAMA_SHAPES],
    }[which]


CALIBRATION_TOKENS = 256 * 197  # 256 images of 197 tokens, as the statistics' sample count


LORA_RANK = 8  # the peft LoRA baseline's rank (benchmarks 2 and 4)


def vit_config(quick: bool, layers: int | None = None):
    """ViT-Base (``ViTConfig()`` defaults), or a tiny ViT for ``--quick``."""
    from transformers import ViTConfig

    if quick:
        config = ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
    else:
        config = ViTConfig()
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def build_vit(config, seed: int = 0):
    """``ViTForImageClassification`` with random init, in eval mode."""
    import torch
    from transformers import ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval()


def input_groups(model, example) -> dict[str, str]:
    """``{target layer: name of the first target reading the same input tensor}``."""
    import torch

    from jactus_linalg.torch.targets import find_targets

    first: dict[int, str] = {}
    groups: dict[str, str] = {}
    keep = []

    def hook(name):
        def record(_mod, args):
            keep.append(args[0])
            groups[name] = first.setdefault(id(args[0]), name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in find_targets(model).items()]
    try:
        with torch.no_grad():
            model(pixel_values=example)
    finally:
        for h in handles:
            h.remove()
    return groups


def base_second_moment(dim: int, seed: int, ratio: float = 1e-4):
    """float64 torch Gram matrix of ``1.25 dim`` tokens with a decaying spectrum."""
    import torch

    rng = np.random.default_rng(seed)
    x = decaying_tokens(rng, math.ceil(TOKENS_PER_FEATURE * dim), dim, ratio)
    return torch.from_numpy(x.T @ x / x.shape[0])


def synthetic_stats(model, example, seed: int = 0):
    """A :class:`CalibrationStats` for every target of ``model``, filled without calibrating.

    Each second moment is a per-dimension base Gram matrix (tokens with a
    decaying spectrum) under a random per-layer diagonal rescaling, so every
    layer differs; each ``G`` is a rank-16 task signal plus noise. All float64.
    """
    import torch

    from jactus_linalg import MomentAccumulator
    from jactus_linalg.torch.stats import CalibrationStats, LayerInfo
    from jactus_linalg.torch.targets import find_targets

    targets = find_targets(model)
    groups = input_groups(model, example)
    stats = CalibrationStats(meta={"model": type(model).__name__, "targets": "all-linear",
                                   "exclude": None, "mode": "gram", "synthetic": True})
    gen = torch.Generator().manual_seed(seed)
    bases: dict[int, torch.Tensor] = {}

    def moment(dim: int, name: str) -> MomentAccumulator:
        if dim not in bases:
            bases[dim] = base_second_moment(dim, seed + dim)
        scale = torch.exp(torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5)
        acc = MomentAccumulator(dim, name=name, mode="gram", dtype="float64")
        acc.total = (scale[:, None] * bases[dim] * scale[None, :]) * CALIBRATION_TOKENS
        acc.count = CALIBRATION_TOKENS
        return acc

    for name, mod in targets.items():
        m, n = mod.out_features, mod.in_features
        group = groups[name]
        stats.layers[name] = LayerInfo(name, n, m, group)
        if group not in stats.inputs:
            stats.inputs[group] = moment(n, f"{name}:input_cov")
        stats.grads[name] = moment(m, f"{name}:grad_cov")
        left = torch.randn(m, TASK_RANK, generator=gen, dtype=torch.float64)
        right = torch.randn(n, TASK_RANK, generator=gen, dtype=torch.float64)
        noise = torch.randn(m, n, generator=gen, dtype=torch.float64)
        stats.grad_sums[name] = (left @ right.T / TASK_RANK + 0.01 * noise) * CALIBRATION_TOKENS
    stats.n_batches = 1
    return stats


def stats_nbytes(stats) -> int:
    """Bytes held by the statistics' tensors (input and gradient moments, ``G`` sums)."""
    tensors = [a.total for a in (*stats.inputs.values(), *stats.grads.values())]
    tensors += list(stats.grad_sums.values())
    return sum(t.numel() * t.element_size() for t in tensors)
