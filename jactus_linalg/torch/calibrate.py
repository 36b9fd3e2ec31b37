"""One forward and backward pass over calibration batches, streaming layer statistics.

Hooks on every target ``nn.Linear`` stream, per token:

* the input second moment :math:`C_x = E[x x^\\top]` (one per group of layers
  that read the same input tensor, e.g. q, k, v);
* the output-gradient second moment :math:`C_g = E[g g^\\top]`,
  :math:`g = \\partial L / \\partial y`;
* the mean weight gradient :math:`G = E[g x^\\top]`, read from the weight's
  ``.grad`` after each backward, so no activation is stored.

Statistics go through the core's accumulators (float64 on CPU, float32 on
CUDA by default); each batch's Gram product runs in the model's compute dtype
(float32 for a float32 or half-precision model) and is summed in the
accumulation dtype. No linear algebra happens here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..covariance import PRODUCTS, MomentAccumulator
from .stats import CalibrationStats, LayerInfo, check_stats_path
from .targets import check_materialized, find_targets

__all__ = ["calibrate"]


def _token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as a boolean mask, if it has one."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def _half_precision_hint(dtype: torch.dtype) -> str:
    """What to do when a half-precision model produced NaN / Inf (empty for other dtypes)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return ""
    return (
        f"; the model computes in {dtype}, whose largest finite value is "
        f"{torch.finfo(dtype).max:.6g}: an activation or gradient overflowed. Calibrate a "
        "float32 copy of the model (statistics do not depend on the model's dtype), or "
        "scale the inputs or the loss down"
    )


def _absorb(
    acc: MomentAccumulator, rows: torch.Tensor, layer: str, what: str,
    model_dtype: torch.dtype | None = None, scale: float = 1.0,
) -> None:
    """``acc.update(rows)``, with the layer and a half-precision hint in any error.

    ``model_dtype``: the dtype the model computed ``rows`` in, when ``rows``
    was upcast since (the hint is about the model's dtype).
    """
    try:
        acc.update(rows, scale=scale)
    except ValueError as err:
        msg = f"layer `{layer}`, {what}: {err}{_half_precision_hint(model_dtype or rows.dtype)}"
        raise ValueError(msg) from err


def _valid_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens of ``t`` (shape ``(..., d)``) where ``mask`` is set (if the shapes line up)."""
    if mask is not None and tuple(t.shape[:-1]) == tuple(mask.shape):
        return t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1])


def _check_grad_scale(grad_scale: object) -> str:
    """Label of a valid ``grad_scale`` (for the statistics' metadata)."""
    if callable(grad_scale):
        return "callable"
    if grad_scale not in ("tokens", "none"):
        msg = (
            "`grad_scale` must be 'tokens' (the loss is a mean over the batch's tokens), "
            "'none' (it is a sum of per-token losses) or a callable batch -> number of "
            f"loss terms; got {grad_scale!r}"
        )
        raise ValueError(msg)
    return str(grad_scale)


class _Collector:
    """Hooks that feed the accumulators for one calibration pass."""

    def __init__(
        self, modules: dict[str, nn.Linear], stats: CalibrationStats, dtype, mode,
        grad_scale: Any = "tokens", products: str = "compute",
    ):
        self.modules = modules
        self.stats = stats
        self.dtype = dtype
        self.mode = mode
        self.products = products
        self.grad_scale = grad_scale
        self.terms: float | None = None  # loss terms of this batch (callable grad_scale)
        self.scales: dict[str, float] = {}  # per layer: the factor applied in this batch
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, str] = {}  # id(input tensor) -> group, within one batch
        self._alive: list[torch.Tensor] = []  # keeps those ids unique until the batch ends
        self._handles: list = []

    def start_batch(self, batch: Any) -> None:
        self.mask = _token_mask(batch)
        self.terms = None
        if callable(self.grad_scale) and batch is not None:
            self.terms = float(self.grad_scale(batch))
            if not (self.terms > 0 and self.terms < float("inf")):
                msg = f"`grad_scale(batch)` must be a positive number of loss terms; got {self.terms!r}"
                raise ValueError(msg)
        self._seen.clear()
        self._alive.clear()

    def install(self) -> None:
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._input_hook(name)))
            self._handles.append(mod.register_forward_hook(self._output_hook(name)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _input_hook(self, name: str) -> Callable:
        def hook(mod: nn.Linear, args: tuple) -> None:
            x = args[0].detach()
            key = id(args[0])
            group = self._seen.get(key)
            info = self.stats.layers.get(name)
            if info is None:  # first batch: group layers reading the same tensor
                group = group or name
                self.stats.layers[name] = LayerInfo(
                    name, mod.in_features, mod.out_features, group
                )
            elif group is not None and group != info.input_group:
                msg = (
                    f"layer `{name}` shared its input with `{group}` in this batch "
                    f"but with `{info.input_group}` before: the model's data flow "
                    "changed between batches"
                )
                raise RuntimeError(msg)
            group = self.stats.layers[name].input_group
            if key in self._seen:
                return  # this input was already absorbed for the group
            self._seen[key] = group
            self._alive.append(args[0])
            acc = self.stats.inputs.get(group)
            if acc is None:
                acc = MomentAccumulator(
                    mod.in_features, name=f"{name}:input_cov", mode=self.mode, dtype=self.dtype,
                    products=self.products,
                )
                self.stats.inputs[group] = acc
            _absorb(acc, _valid_rows(x, self.mask), name, "input activations")

        return hook

    def _output_hook(self, name: str) -> Callable:
        def hook(mod: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            acc = self.stats.grads.get(name)
            if acc is None:
                acc = MomentAccumulator(
                    mod.out_features, name=f"{name}:grad_cov", mode=self.mode, dtype=self.dtype,
                    products=self.products,
                )
                self.stats.grads[name] = acc
            mask = self.mask

            def grad_hook(g: torch.Tensor) -> None:
                rows = _valid_rows(g.detach(), mask)
                scale = self._per_token_scale(rows)
                self.scales[name] = scale
                # per-token gradients: d(sum of losses)/dy = T dL/dy; the factor is
                # applied to the product in the accumulation dtype (no overflow in half)
                _absorb(acc, rows, name, "output gradient", g.dtype, scale)

            output.register_hook(grad_hook)

        return hook

    def _per_token_scale(self, rows: torch.Tensor) -> float:
        r"""The factor on the hooked gradients: :math:`\sqrt{T R}` (1 for ``grad_scale="none"``).

        With the loss a mean over :math:`T` terms and :math:`R` rows of this
        layer's output, :math:`T\,g` is the gradient of the summed loss, and a
        loss term spans :math:`R/T` rows; K-FAC's rise per loss term is then
        :math:`\tfrac{R}{T}\cdot\tfrac12 E_{\text{rows}}[((T g)^\top \Delta W x)^2]`,
        which is :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert^2` when the
        gradients carry :math:`\sqrt{TR}`. For ``"tokens"`` :math:`T = R`.
        """
        if self.grad_scale == "none":
            return 1.0
        rows_seen = float(rows.shape[0])
        if self.terms is not None:
            return math.sqrt(self.terms * rows_seen)
        return rows_seen  # "tokens": one loss term per position of this layer's output

    def absorb_weight_grads(self) -> None:
        r""":math:`\sum_t g_t x_t^\top` of this batch is the weight's ``.grad`` (times ``T``)."""
        for name, mod in self.modules.items():
            grad = mod.weight.grad
            if grad is None:
                continue
            if not torch.isfinite(grad).all():
                msg = (
                    f"non-finite values in the weight gradient of layer `{name}` (statistic "
                    f"`{name}:grad_mean`){_half_precision_hint(grad.dtype)}"
                )
                raise ValueError(msg)
            total = self.stats.grad_sums.get(name)
            grad = grad.detach().to(_accumulation_dtype(grad, self.dtype))
            grad = grad * self.scales.pop(name, 1.0)
            self.stats.grad_sums[name] = grad.clone() if total is None else total + grad
            mod.weight.grad = None


def _check_products(products: object) -> str:
    if products not in PRODUCTS:
        msg = f"`products` must be one of {PRODUCTS}; got {products!r}"
        raise ValueError(msg)
    return str(products)


def _accumulation_dtype(t: torch.Tensor, requested: str | None) -> torch.dtype:
    if requested is not None:
        return getattr(torch, requested)
    return torch.float32 if t.device.type == "cuda" else torch.float64


@contextmanager
def _only_target_weights_need_grad(model: nn.Module, modules: dict[str, nn.Linear], train: bool):
    """Gradients flow to target weights only; flags, grads and mode are restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    targets = {id(m.weight) for m in modules.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in targets)
            p.grad = None
        model.train(train)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]
        model.train(was_training)


def _check_finite_weights(modules: dict[str, nn.Linear]) -> None:
    """A target layer's weight or bias holding NaN / Inf is refused up front, by name."""
    for name, mod in modules.items():
        for label, p in (("weight", mod.weight), ("bias", mod.bias)):
            if p is not None and not bool(torch.isfinite(p).all()):
                n_nan = int(torch.isnan(p).sum())
                n_inf = int(torch.isinf(p).sum())
                msg = (
                    f"layer `{name}`: `{label}` contains non-finite values ({n_nan} NaN, "
                    f"{n_inf} Inf); calibrate a model with finite weights"
                )
                raise ValueError(msg)


def _check_resume(stats: CalibrationStats, meta: dict, checkpoint: Path) -> None:
    """A checkpoint resumes only the calibration that wrote it (same target layers and mode).

    Target layers are compared by the names they resolved to (a loaded file's
    patterns are never executed; see :meth:`CalibrationStats.load`).
    """
    keys = ("model", "target_names", "mode", "products") if "target_names" in stats.meta else (
        "model", "targets", "exclude", "mode", "products"
    )
    for key in keys:
        if key in stats.meta and stats.meta[key] != meta[key]:
            msg = (
                f"`checkpoint` {checkpoint} was written with {key}={stats.meta[key]!r}, but this "
                f"call has {key}={meta[key]!r} (targets={meta['targets']!r}, exclude="
                f"{meta['exclude']!r}): resuming would mix two calibrations. Call "
                "calibrate with the same arguments, or pass another checkpoint path"
            )
            raise ValueError(msg)


def _check_fresh(model: nn.Module) -> None:
    from .layer import JactusLinear  # noqa: PLC0415

    if any(isinstance(m, JactusLinear) for m in model.modules()):
        msg = (
            "`model` is already compressed (it holds JactusLinear layers): calibrate "
            "and compress the original dense model"
        )
        raise ValueError(msg)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    targets: str | Sequence[str] = "all-linear",
    exclude: str | Sequence[str] | None = None,
    dtype: str | None = None,
    mode: str = "gram",
    train_mode: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
    total: int | None = None,
    grad_scale: str | Callable[[Any], float] = "tokens",
    products: str = "compute",
) -> CalibrationStats:
    r"""Collect :math:`C_x`, :math:`C_g` and :math:`G` for every target linear layer.

    Parameters
    ----------
    model : nn.Module
        The dense model (any dtype; statistics are kept in float64 on CPU,
        float32 on CUDA unless ``dtype`` says otherwise).
    batches : iterable
        Calibration batches; each is passed to ``loss_fn``. A Mapping batch
        with an ``attention_mask`` restricts statistics to unmasked tokens.
    loss_fn : callable
        ``loss_fn(model, batch) -> scalar loss``; for Hugging Face models
        ``lambda m, b: m(**b).loss``.
    targets : "all-linear", list of str or regex, optional
        As in PEFT; the output head is excluded.
    exclude : list of str or regex, optional
        Names to leave out.
    dtype : {"float64", "float32"} or None, optional
        Accumulation dtype.
    mode : {"gram", "qr"}, optional
        Sum Gram matrices, or keep streamed-QR roots of the second moments.
    train_mode : bool, optional
        Run in ``model.train()`` (dropout on). Default: eval mode.
    checkpoint : path, optional
        A ``.safetensors`` file (another suffix is refused before any work).
        If it exists, calibration resumes after the
        batches it holds (skipping that many batches of ``batches``); with
        ``checkpoint_every > 0`` it is rewritten every that many batches and
        at the end.
    checkpoint_every : int, optional
    progress : bool, optional
        Show a progress bar.
    total : int, optional
        Number of batches, for the progress bar.
    grad_scale : {"tokens", "none"} or callable, optional
        Puts :math:`C_g` and :math:`G` on the per-token scale of DESIGN, so
        that :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert^2` predicts
        the rise of the mean per-token loss in nats. ``"tokens"`` (default):
        ``loss_fn`` returns a mean over the batch's tokens, counted as the
        positions of each layer's output (those of ``attention_mask`` when
        the batch has one), and the hooked gradients are multiplied by that
        count :math:`T`. ``"none"``: the loss is already a sum of per-token
        losses; the gradients are used as hooked. A callable ``batch ->
        T`` gives the number of terms the loss averages when it is not the
        number of positions (e.g. ``(labels != -100).sum()`` for a causal
        LM's shifted labels, or the batch size for a loss per example); a
        layer whose output has :math:`R` rows in the batch then scales its
        gradients by :math:`\sqrt{T R}`, so that the prediction is the rise
        per loss term (a ViT's per-image loss spans :math:`R/T` = 197 rows;
        K-FAC sums their contributions and ignores their correlation).
    products : {"compute", "accumulation"}, optional
        dtype of each batch's Gram products :math:`X^\top X`, :math:`G^\top G`
        (``mode="gram"``). ``"compute"`` (default): the model's compute dtype
        (float32 for a float32 or half-precision model; about twice as fast
        as float64 on CPU), summed in the accumulation dtype across batches.
        ``"accumulation"``: all in the accumulation dtype (float64 on CPU).
        The statistics record which (``MomentAccumulator.gram_products``), and
        :func:`compress`'s whitening uses the matching rounding tolerance; the
        accuracy cost against all-float64 is on the Numerics page.

    Returns
    -------
    CalibrationStats
        All-reduced over ``torch.distributed`` processes when initialised.

    Raises
    ------
    ValueError
        If ``targets`` matches nothing, the model is already compressed, a
        target layer's weight or bias holds NaN/Inf, a batch produces NaN/Inf
        (the message names layer and statistic, and for a float16/bfloat16
        model says that it overflowed), the loss is not a finite scalar, or
        ``checkpoint`` was written by a calibration with other target layers,
        ``mode`` or model class, or does not end in ``.safetensors``; if
        ``loss_fn`` returns a loss that does not require grad (detached), or
        the model has parameters on the meta device.

    Notes
    -----
    The model's weights are not changed; ``requires_grad`` flags, existing
    ``.grad`` tensors and the train/eval mode are restored afterwards.

    Resuming from ``checkpoint`` adds the remaining batches to the saved sums
    in the same order as an uninterrupted run, so on the same data and
    hardware the statistics are bit-identical to it. Across different numbers
    of ``torch.distributed`` processes they agree to rounding only (the
    summation order differs).
    """
    if checkpoint is not None:
        checkpoint = check_stats_path(checkpoint, "checkpoint")
    _check_fresh(model)
    check_materialized(model, "calibrate")
    modules = find_targets(model, targets, exclude=exclude)
    _check_finite_weights(modules)
    meta = {
        "model": type(model).__name__,
        "targets": targets if isinstance(targets, str) else list(targets),
        "exclude": exclude if exclude is None or isinstance(exclude, str) else list(exclude),
        "target_names": list(modules),  # what a loaded file uses: its patterns never run
        "mode": mode,
        "grad_scale": _check_grad_scale(grad_scale),
        "products": _check_products(products),
    }
    if checkpoint is not None and Path(checkpoint).exists():
        stats = CalibrationStats.load(checkpoint)
        _check_resume(stats, meta, Path(checkpoint))
        stats.check_model({n: (m.out_features, m.in_features) for n, m in modules.items()})
    else:
        stats = CalibrationStats(meta=meta)
    collector = _Collector(modules, stats, dtype, mode, grad_scale, products)
    skip = stats.n_batches
    bar = _progress(progress, total, "calibrate", initial=skip)
    with _only_target_weights_need_grad(model, modules, train_mode):
        collector.install()
        try:
            for index, batch in enumerate(batches):
                if index < skip:
                    continue
                collector.start_batch(batch)
                loss = loss_fn(model, batch)
                _check_loss(loss, index)
                loss.backward()
                collector.absorb_weight_grads()
                collector.start_batch(None)  # release this batch's inputs
                stats.n_batches += 1
                bar.update(1)
                if checkpoint is not None and checkpoint_every and stats.n_batches % checkpoint_every == 0:
                    stats.save(checkpoint)
        finally:
            collector.remove()
            bar.close()
    if stats.n_batches == 0:
        msg = "`batches` yielded no batch to calibrate on"
        raise ValueError(msg)
    stats.all_reduce()
    if checkpoint is not None and checkpoint_every:
        stats.save(checkpoint)
    return stats


def _check_loss(loss: Any, index: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        msg = f"`loss_fn` must return a scalar tensor; got {type(loss).__name__} at batch {index}"
        raise ValueError(msg)
    if not torch.isfinite(loss):
        msg = f"`loss_fn` returned a non-finite loss ({loss.item()}) at batch {index}"
        raise ValueError(msg)
    if not loss.requires_grad:
        msg = (
            f"`loss_fn` returned a loss that does not require grad at batch {index}: it was "
            "detached (.detach(), .item(), a new tensor) or computed under torch.no_grad(). "
            "Return the loss as computed from `model(...)`, so that calibrate can "
            "backpropagate it to the target layers"
        )
        raise ValueError(msg)


def _progress(enabled: bool, total: int | None, desc: str, initial: int = 0):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, leave=False)
