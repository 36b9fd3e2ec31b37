"""Tuning helpers: train only the cores (plus any new head), and count parameters.

The cores are those of the factored layers (:class:`JactusLinear`) and the
mergeable cores of the layers kept dense (:class:`MergeableLinear`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn

from .layer import JactusLinear
from .merge import MergeableLinear

_WITH_CORE = (JactusLinear, MergeableLinear)

__all__ = ["core_parameters", "count_parameters", "mark_trainable"]


def core_parameters(model: nn.Module) -> list[nn.Parameter]:
    r"""The cores of ``model``: :math:`C` of each :class:`JactusLinear`, :math:`\Delta C` of each mergeable core."""
    return [cast(nn.Parameter, m.core.weight) for m in model.modules() if isinstance(m, _WITH_CORE)]


def mark_trainable(
    model: nn.Module, extra: Sequence[str] | str = (), *, core_dtype: torch.dtype | None = None
) -> list[str]:
    """Freeze everything except the cores and the modules named in ``extra``.

    :func:`~jactus_linalg.torch.compress` calls it (``trainable="cores"``,
    ``modules_to_save`` as ``extra``); call it again to change ``extra`` or
    ``core_dtype``.

    Parameters
    ----------
    model : nn.Module
        A compressed model.
    extra : str or list of str, optional
        Module names (or name suffixes, e.g. ``"classifier"``) whose
        parameters also train, such as a new task head.
    core_dtype : torch.dtype, optional
        Keep the trainable cores in this dtype (e.g. ``torch.float32`` for a
        bf16 model, so optimizer updates are not lost to bf16 rounding); the
        frozen factors keep the model's dtype.

    Returns
    -------
    list of str
        Names of the trainable parameters.

    Raises
    ------
    ValueError
        If ``model`` holds no core (neither :class:`JactusLinear` nor
        :class:`MergeableLinear`), or a name in ``extra`` matches no module.
    """
    cores = core_parameters(model)
    if not cores:
        msg = "`model` holds no core (no JactusLinear or MergeableLinear layer): compress it first"
        raise ValueError(msg)
    extra = [extra] if isinstance(extra, str) else list(extra)
    for p in model.parameters():
        p.requires_grad_(False)
    if core_dtype is not None:
        for mod in model.modules():
            if isinstance(mod, _WITH_CORE):
                mod.core.to(core_dtype)
        cores = core_parameters(model)
    for p in cores:
        p.requires_grad_(True)
    for wanted in extra:
        mods = [m for n, m in model.named_modules() if n == wanted or n.endswith("." + wanted)]
        if not mods:
            msg = f"`extra` name {wanted!r} matches no module of `model`"
            raise ValueError(msg)
        for mod in mods:
            for p in mod.parameters():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module | Iterable[nn.Parameter]) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    seen: dict[int, nn.Parameter] = {id(p): p for p in params}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total
