r"""Measured rise of the mean per-token loss, to set beside the predicted one.

:func:`~jactus_linalg.torch.compress` predicts, per layer, the rise of the
mean per-token loss :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert_F^2`
in nats (with statistics from :func:`~jactus_linalg.torch.calibrate` on the
per-token scale, ``grad_scale="tokens"``). :func:`measure_loss_increase`
measures the same quantity: the mean per-token loss of the compressed model
minus that of the dense model, on the same batches. The prediction is
second order (K-FAC, no first-order term, no interaction between layers), so
it is close for a small change of a model at a minimum of its loss and only
an order-of-magnitude guide for a large one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["LossIncrease", "mean_token_loss", "measure_loss_increase"]


class LossIncrease(NamedTuple):
    """Result of :func:`measure_loss_increase` (nats of mean per-token loss)."""

    dense: float
    compressed: float
    increase: float
    tokens: float


def _batch_tokens(batch: Any, tokens: Callable[[Any], float] | None) -> float:
    """Tokens a batch's mean loss averages over: ``tokens(batch)``, else the mask or 1 per batch."""
    if tokens is not None:
        return float(tokens(batch))
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        mask = batch.get("attention_mask")
        if isinstance(labels, torch.Tensor) and labels.ndim >= 2:
            # a causal LM's loss averages the shifted labels that are not -100
            return float((labels[..., 1:] != -100).sum())
        if isinstance(mask, torch.Tensor):
            return float(mask.sum())
    return 1.0


@torch.no_grad()
def mean_token_loss(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    tokens: Callable[[Any], float] | None = None,
) -> tuple[float, float]:
    r"""Token-weighted mean of ``loss_fn`` over ``batches``: :math:`\sum_b T_b L_b / \sum_b T_b`.

    ``loss_fn`` returns each batch's mean loss :math:`L_b` over its
    :math:`T_b` tokens. :math:`T_b` is ``tokens(batch)`` if given; otherwise
    the shifted labels that are not ``-100`` (a causal LM's loss), else the
    ``attention_mask`` sum, else 1 (every batch weighs the same). Runs in
    eval mode without gradients; the mode is restored. Returns
    ``(mean loss, total tokens)``.

    Raises
    ------
    ValueError
        If ``batches`` is empty or a loss is not a finite scalar.
    """
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    try:
        for index, batch in enumerate(batches):
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                msg = f"`loss_fn` must return a scalar tensor; got {type(loss).__name__} at batch {index}"
                raise ValueError(msg)
            value = float(loss)
            if value != value or value in (float("inf"), float("-inf")):
                msg = f"`loss_fn` returned a non-finite loss ({value}) at batch {index}"
                raise ValueError(msg)
            t = _batch_tokens(batch, tokens)
            total += t * value
            weight += t
    finally:
        model.train(was_training)
    if weight == 0.0:
        msg = "`batches` yielded no batch (or no token) to measure the loss on"
        raise ValueError(msg)
    return total / weight, weight


def measure_loss_increase(
    dense: nn.Module,
    compressed: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    tokens: Callable[[Any], float] | None = None,
) -> LossIncrease:
    r"""Rise of the mean per-token loss from ``dense`` to ``compressed``, in nats.

    Compare it with :attr:`CompressionReport.total_predicted_loss_increase`
    (same units when the statistics were collected with
    ``grad_scale="tokens"``, or a ``grad_scale`` callable that counts the
    same tokens as ``tokens``).

    Parameters
    ----------
    dense, compressed : nn.Module
        The model before compression (keep a copy) and after.
    batches : iterable
        Batches for ``loss_fn`` (materialised once, used for both models).
    loss_fn : callable
        ``loss_fn(model, batch) -> mean loss of the batch``.
    tokens : callable, optional
        ``batch -> tokens the batch's loss averages`` (see
        :func:`mean_token_loss`).

    Returns
    -------
    LossIncrease
        ``dense``, ``compressed`` (mean per-token losses), ``increase`` (their
        difference) and ``tokens``.
    """
    batches = list(batches)
    before, count = mean_token_loss(dense, batches, loss_fn, tokens=tokens)
    after, _ = mean_token_loss(compressed, batches, loss_fn, tokens=tokens)
    return LossIncrease(before, after, after - before, count)
