"""Baselines through the real ``peft`` library: LoRA, DoRA, and compress-then-LoRA.

* :func:`lora_model`: LoRA (or DoRA with ``dora=True``) on the dense model's
  target layers, at 100% of the parameters plus the adapters.
* :func:`compress_then_lora`: compress with a data-aware SVD
  (``method="svd-llm"`` or ``"svd"``) and put LoRA on the factors, choosing
  the compression so that *compressed parameters + adapter parameters* meet
  the same ``retain`` budget as JACTUS.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..allocation import bisect_budget, factor_params
from .compress import (
    CompressionReport,
    PreparedCompression,
    _check_model_and_stats,
    allocate,
    plan_compression,
    replace_layers,
)
from .config import JactusConfig
from .stats import CalibrationStats
from .targets import find_targets

__all__ = ["CompressThenLoRA", "compress_then_lora", "lora_adapter_params", "lora_model"]


def lora_model(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dora: bool = False,
    targets: str | Sequence[str] = "all-linear",
    modules_to_save: Sequence[str] | None = None,
    dropout: float = 0.0,
):
    """Wrap ``model`` with ``peft`` LoRA (or DoRA) adapters on ``targets``.

    Parameters
    ----------
    model : nn.Module
    rank : int, optional
        LoRA rank ``r``.
    alpha : float, optional
        LoRA scaling numerator (default ``2 * rank``).
    dora : bool, optional
        Weight-decomposed LoRA (``LoraConfig(use_dora=True)``).
    targets : "all-linear", list of str or regex, optional
        Resolved with :func:`find_targets` (output head excluded) and passed
        to peft as explicit module names.
    modules_to_save : list of str, optional
        Modules trained in full (e.g. a new ``"classifier"`` head).
    dropout : float, optional

    Returns
    -------
    peft.PeftModel
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    names = list(find_targets(model, targets))
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: a float works
        lora_dropout=dropout,
        target_modules=names,
        use_dora=dora,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute that peft reads while wrapping; not ours to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, config)


def lora_adapter_params(shapes: Sequence[tuple[int, int]], rank: int, *, dora: bool = False) -> int:
    """Parameters LoRA adds to linear maps of ``(out, in)`` shapes: ``r(in + out)`` each (+``out`` for DoRA)."""
    return sum(rank * (m + n) + (m if dora else 0) for m, n in shapes)


def _adapted_shapes(plan_shapes: dict[str, tuple[int, int]], ranks: dict) -> list[tuple[int, int]]:
    """Linear maps LoRA will wrap: both factors of a compressed layer, or the dense layer."""
    out: list[tuple[int, int]] = []
    for name, rank in ranks.items():
        m, n = plan_shapes[name]
        out.extend([(m, n)] if rank is None else [(m, rank), (rank, n)])
    return out


@dataclass
class CompressThenLoRA:
    """Result of :func:`compress_then_lora`."""

    model: nn.Module
    report: CompressionReport
    compress_retain: float
    adapter_params: int
    total_retain: float


def compress_then_lora(
    model: nn.Module,
    stats: CalibrationStats,
    *,
    retain: float = 0.8,
    lora_rank: int = 8,
    method: str = "svd-llm",
    damping: float | tuple[float, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    dtype: str | None = None,
    progress: bool = True,
    prepared: PreparedCompression | None = None,
) -> CompressThenLoRA:
    """Compress, then add LoRA on the factors, within ``retain`` of the original parameters.

    The compression budget ``rho`` is the largest one (found by bisection)
    for which ``params(compressed at rho) + params(LoRA adapters) <= retain ·
    params(original)``; the adapters sit on ``left_proj`` and ``right_proj``
    of every :class:`JactusLinear`, and on target layers kept dense. A new
    head in ``modules_to_save`` is trained in full and counted like the
    head of every other method (it is part of the model either way).

    ``prepared`` (from :func:`~jactus_linalg.torch.prepare_compression` of
    this model, or of the model it was copied from, with the same
    ``method``, ``dtype`` and ``damping``) skips the decomposition: one
    decomposition serves every retain, with the same result.

    Raises
    ------
    TypeError
        If ``model`` or ``stats`` has the wrong type, or ``retain`` is not a
        real number.
    ValueError
        If ``retain`` is outside (0, 1], or even the smallest compression
        leaves no room for the adapters; or if ``prepared`` was prepared
        with another ``method``, ``dtype`` or ``damping``, or from another
        model.
    """
    _check_model_and_stats(model, stats)
    retain = JactusConfig(retain=retain).retain  # numpy and 0-d torch scalars too; checked
    kwargs: dict[str, Any] = {} if damping is None else {"damping": damping}
    if prepared is None:
        plan = plan_compression(model, stats, method=method, dtype=dtype, progress=progress,
                                **kwargs)
    else:
        plan = prepared.plan_for(model, method=method, dtype=dtype, damping=damping)
    shapes = {n: p.shape for n, p in plan.plans.items()}
    total = plan.total_params
    fixed = total - plan.target_dense_params

    def footprint(rho: float) -> tuple[int, dict]:
        ranks = allocate(plan, rho)
        layers = sum(
            m * n if r is None else factor_params(m, n, r) for (m, n), r in
            ((shapes[k], v) for k, v in ranks.items())
        )
        adapters = lora_adapter_params(_adapted_shapes(shapes, ranks), lora_rank)
        return fixed + layers + adapters, ranks

    lo = (fixed + sum(factor_params(m, n, 1) for m, n in shapes.values())) / total
    if footprint(lo)[0] > retain * total:
        msg = (
            f"`retain`={retain} leaves no room for rank-{lora_rank} LoRA adapters on the "
            "compressed model; raise `retain` or lower `lora_rank`"
        )
        raise ValueError(msg)
    lo = bisect_budget(lambda rho: footprint(rho)[0] <= retain * total, lo, retain, steps=40)
    _, ranks = footprint(lo)
    report = replace_layers(model, plan, ranks, retain=lo)
    targets: list[str] = []
    for name, rank in ranks.items():
        targets.extend([name] if rank is None else [f"{name}.left_proj", f"{name}.right_proj"])
    wrapped = lora_model(model, rank=lora_rank, targets=targets, modules_to_save=modules_to_save)
    adapter = sum(
        p.numel() for n, p in wrapped.named_parameters() if "lora_" in n
    )
    return CompressThenLoRA(
        model=wrapped,
        report=report,
        compress_retain=lo,
        adapter_params=adapter,
        total_retain=(report.params_after + adapter) / total,
    )
