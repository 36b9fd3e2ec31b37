"""Whole-model compression: plan every layer with the core, allocate ranks globally, swap layers.

``compress(model, stats, retain=0.8)`` is three steps, each reusable:

1. :func:`plan_compression` factors each input covariance once per input
   group and calls :func:`jactus_linalg.plan_layer` for every target layer
   (one decomposition per layer, whatever the final rank);
2. :func:`allocate` turns the ``retain`` budget into per-layer ranks with
   :func:`jactus_linalg.allocate_ranks` (or :func:`~jactus_linalg.allocate_uniform`);
3. :func:`replace_layers` swaps each ``nn.Linear`` for a :class:`JactusLinear`.

The budget counts the whole model: ``retain = parameters after / parameters
before``. Parameters outside the targets (embeddings, norms, head, biases)
are kept and count against it. Every target keeps rank >= 1; a layer whose
allocation reaches its break-even rank stays dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..allocation import (
    allocate_ranks,
    allocate_uniform,
    break_even_rank,
    factor_params,
    layer_units,
    rank_unit_costs,
)
from ..covariance import CovarianceRoot, LayerStatistics
from ..jactus import DEFAULT_TASK_FRACTION, LayerPlan, plan_layer
from ..lowrank import WhiteningInfo, curvature_error, info_of, orthonormal_factors
from ..whitening import DEFAULT_DAMPING, WhiteningOperator, whitening_operator
from .layer import JactusLinear
from .stats import CalibrationStats
from .targets import find_targets

__all__ = [
    "METHODS",
    "CompressionPlan",
    "CompressionReport",
    "LayerReport",
    "allocate",
    "compress",
    "plan_compression",
    "replace_layers",
]

#: method -> (uses input_cov, uses grad_cov, uses task directions)
METHODS: dict[str, tuple[bool, bool, bool]] = {
    "svd": (False, False, False),
    "svd-llm": (True, False, False),
    "kfac": (True, True, False),
    "jactus": (True, True, True),
}

GAIN_UNITS = {
    "svd": "squared Frobenius norm of the weight (no data)",
    "svd-llm": "E||dW x||^2, input-whitened squared error (no gradient scale)",
    "kfac": "K-FAC curvature (predicted loss increase x 2)",
    "jactus": "K-FAC curvature (predicted loss increase x 2)",
}


@dataclass
class LayerReport:
    """Outcome for one target layer."""

    name: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense
    core_shape: tuple[int, int] | None
    params_before: int
    params_after: int
    predicted_loss_increase: float | None
    notes: list[str] = field(default_factory=list)
    #: Damping, effective rank, numerical rank and notes of the input and
    #: gradient covariances (``None`` where that statistic was not used).
    input_whitening: WhiteningInfo | None = None
    grad_whitening: WhiteningInfo | None = None


@dataclass
class CompressionReport:
    """Per-layer ranks, parameter counts and predicted loss increase."""

    method: str
    retain_target: float
    retain_achieved: float
    params_before: int
    params_after: int
    task_fraction: float
    damping: Any
    allocation: str
    gain_units: str
    layers: list[LayerReport]
    notes: list[str] = field(default_factory=list)

    @property
    def total_predicted_loss_increase(self) -> float | None:
        values = [r.predicted_loss_increase for r in self.layers]
        if any(v is None for v in values):
            return None
        return float(sum(values))

    @property
    def ranks(self) -> dict[str, int | None]:
        return {r.name: r.rank for r in self.layers}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_predicted_loss_increase"] = self.total_predicted_loss_increase
        return out

    def table(self) -> str:
        """Plain-text per-layer table."""
        lines = [f"{'layer':<48}{'shape':>12}{'rank':>7}{'params':>11}{'pred. dL':>12}"]
        for r in self.layers:
            rank = "dense" if r.rank is None else str(r.rank)
            loss = "n/a" if r.predicted_loss_increase is None else f"{r.predicted_loss_increase:.3e}"
            lines.append(
                f"{r.name:<48}{f'{r.shape[0]}x{r.shape[1]}':>12}{rank:>7}{r.params_after:>11}{loss:>12}"
            )
        total = self.total_predicted_loss_increase
        lines.append(
            f"retain {self.retain_achieved:.4f} (target {self.retain_target}), "
            f"params {self.params_after}/{self.params_before}, predicted loss increase "
            f"{'n/a' if total is None else f'{total:.4e}'}"
        )
        return "\n".join(lines)


@dataclass
class CompressionPlan:
    """Decomposed layers of one model, ready for allocation at any budget."""

    method: str
    task_fraction: float
    damping: Any
    plans: dict[str, LayerPlan]
    curvature: dict[str, tuple[WhiteningOperator | None, WhiteningOperator | None]]
    fixed_dense: list[str]
    total_params: int
    target_dense_params: int
    notes: list[str] = field(default_factory=list)
    layer_notes: dict[str, list[str]] = field(default_factory=dict)


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_not_compressed(model: nn.Module) -> None:
    if any(isinstance(m, JactusLinear) for m in model.modules()):
        msg = (
            "`model` is already compressed (it holds JactusLinear layers); compress "
            "the original dense model instead (reload it, or keep a copy before compressing)"
        )
        raise ValueError(msg)


def _target_modules(model: nn.Module, stats: CalibrationStats) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    recorded = stats.meta.get("targets")
    if recorded is not None:
        try:
            expected = find_targets(model, recorded, exclude=stats.meta.get("exclude"))
        except ValueError as err:
            msg = (
                f"`stats` targets {recorded!r} match no layer of `model`: statistics from "
                "another model; calibrate this model and compress it with its own statistics"
            )
            raise ValueError(msg) from err
        lacking = [n for n in expected if n not in stats.layers]
        if lacking:
            msg = (
                f"`stats` lacks {len(lacking)} layer(s) that its targets select in `model`, "
                f"e.g. {lacking[:3]}: statistics from another model or with missing layers, "
                "or layers that no calibration batch reached (the forward pass never called "
                "them); recalibrate this model, with `exclude=` for layers it never calls"
            )
            raise ValueError(msg)
    found: dict[str, nn.Linear] = {}
    missing = []
    for name in stats.layers:
        mod = modules.get(name)
        if type(mod) is nn.Linear:
            found[name] = mod
        else:
            missing.append(name)
    if missing:
        msg = (
            f"`stats` names {len(missing)} layer(s) that are not nn.Linear modules of "
            f"`model`, e.g. {missing[:3]}: statistics from another model; calibrate this "
            "model and compress it with its own statistics"
        )
        raise ValueError(msg)
    stats.check_model({n: (m.out_features, m.in_features) for n, m in found.items()})
    return found


def _to(t: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A statistic on the weight's device, in the decomposition dtype if one is asked for."""
    return t.to(device=device, dtype=dtype or t.dtype) if isinstance(t, torch.Tensor) else t


def _layer_error(name: str, err: Exception) -> ValueError:
    return ValueError(f"layer `{name}`: {err}")


def _gradient_signal(layer: LayerStatistics) -> str | None:
    """Why no loss gradient reached a layer's output (``None`` if one did)."""
    cov = layer.grad_cov
    if cov is None:
        return (
            "its output gradient was never computed (the output does not feed the loss, "
            "or it runs without autograd)"
        )
    data = cov.root if isinstance(cov, CovarianceRoot) else cov
    if not bool(torch.any(data != 0)):
        return (
            f"its output gradient is identically zero over all {layer.n_samples} "
            "calibration tokens"
        )
    return None


def _no_gradient_error(name: str, method: str, why: str, dtype: torch.dtype) -> ValueError:
    msg = (
        f"layer `{name}`: no loss gradient reached this layer during calibration: {why}. "
        f"method={method!r} weighs every layer by its gradient covariance E[g g^T], which is "
        "zero here, so this layer cannot be ranked against the others. Check that `loss_fn` "
        "depends on this layer; or calibrate again with it in `exclude=` (it then stays "
        "dense); or use method='svd-llm', which needs input statistics only"
    )
    if dtype == torch.float16:
        msg += (
            ". In float16, small gradients underflow to zero: calibrate with the loss "
            "multiplied by a large constant (the compression does not depend on the loss "
            "scale), or calibrate a float32 copy"
        )
    return ValueError(msg)


def plan_compression(
    model: nn.Module,
    stats: CalibrationStats,
    *,
    method: str = "jactus",
    task_fraction: float = DEFAULT_TASK_FRACTION,
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    grad_whitening: bool = True,
    whitening: str = "cholesky",
    dtype: str | None = None,
    progress: bool = True,
) -> CompressionPlan:
    """Decompose every target layer once (see :func:`compress` for the parameters)."""
    if dtype not in (None, "float32", "float64"):
        msg = f"`dtype` must be None, 'float32' or 'float64'; got {dtype!r}"
        raise ValueError(msg)
    work = None if dtype is None else getattr(torch, dtype)
    if method not in METHODS:
        msg = f"`method` must be one of {sorted(METHODS)}; got {method!r}"
        raise ValueError(msg)
    _check_not_compressed(model)
    modules = _target_modules(model, stats)
    use_x, use_g, use_task = METHODS[method]
    use_g = use_g and grad_whitening
    tau = task_fraction if use_task else 0.0
    needs_grad = use_g or (use_task and tau > 0)
    damp_x, damp_g = damping if isinstance(damping, tuple | list) else (damping, damping)
    input_ops: dict[str, WhiteningOperator] = {}
    plans: dict[str, LayerPlan] = {}
    curvature: dict[str, tuple[WhiteningOperator | None, WhiteningOperator | None]] = {}
    fixed: list[str] = []
    layer_notes: dict[str, list[str]] = {}
    from tqdm.auto import tqdm  # noqa: PLC0415

    for name, mod in tqdm(modules.items(), desc=f"plan {method}", disable=not progress, leave=False):
        m, n = mod.out_features, mod.in_features
        if break_even_rank(m, n) < 1:
            fixed.append(name)
            continue
        weight = mod.weight.detach()
        layer = stats.layer(name)
        group = stats.layers[name].input_group
        no_gradient = _gradient_signal(layer)
        if no_gradient is not None:
            if needs_grad:
                raise _no_gradient_error(name, method, no_gradient, weight.dtype)
            layer_notes[name] = [
                f"no loss gradient reached this layer ({no_gradient}): its predicted loss "
                "increase is not available"
            ]
            layer = layer._replace(grad_cov=None)
        if mod.bias is not None and not bool(torch.isfinite(mod.bias).all()):
            msg = f"layer `{name}`: `bias` contains non-finite values (NaN or Inf)"
            raise ValueError(msg)
        try:
            if group not in input_ops:  # one factorization per shared input
                input_ops[group] = whitening_operator(
                    _to(layer.input_cov, weight.device, work), damping=damp_x,
                    method=whitening, name="input_cov",
                )
            grad_op = None
            if layer.grad_cov is not None:
                grad_op = whitening_operator(
                    _to(layer.grad_cov, weight.device, work), damping=damp_g,
                    method=whitening, name="grad_cov",
                )
            plans[name] = plan_layer(
                weight,
                input_cov=input_ops[group] if use_x else None,
                grad_cov=grad_op if use_g else None,
                grad_mean=_to(layer.grad_mean, weight.device, work) if tau > 0 else None,
                task_fraction=tau,
                max_rank=break_even_rank(m, n),
                whitening=whitening,
            )
        except ValueError as err:
            raise _layer_error(name, err) from err
        curvature[name] = (input_ops[group], grad_op)
    target_dense = sum(modules[n].weight.numel() for n in plans)
    return CompressionPlan(
        method=method,
        task_fraction=tau,
        damping=damping,
        plans=plans,
        curvature=curvature,
        fixed_dense=fixed,
        total_params=_model_params(model),
        target_dense_params=target_dense,
        notes=[f"{len(fixed)} target layer(s) too small to factor stay dense"] if fixed else [],
        layer_notes=layer_notes,
    )


def allocate(
    plan: CompressionPlan, retain: float, *, allocation: str = "global", keep_dense: bool = True
) -> dict[str, int | None]:
    """Ranks per layer (``None`` = keep dense) meeting ``retain`` for the whole model.

    With ``keep_dense=False`` no layer is kept dense: a layer that would be is
    factorized at its break-even rank instead, so every target layer has a
    trainable core (at the price of the energy beyond that rank).

    Raises
    ------
    ValueError
        If ``retain`` is outside ``(0, 1]``, too small to hold the parameters
        outside the targets plus rank 1 per layer, or ``allocation`` unknown.
    """
    if isinstance(retain, bool) or not isinstance(retain, int | float) or not 0 < retain <= 1:
        msg = f"`retain` must lie in (0, 1]; got {retain!r}"
        raise ValueError(msg)
    if allocation not in ("global", "uniform"):
        msg = f"`allocation` must be 'global' or 'uniform'; got {allocation!r}"
        raise ValueError(msg)
    names = list(plan.plans)
    shapes = [plan.plans[n].shape for n in names]
    fixed = plan.total_params - plan.target_dense_params
    available = retain * plan.total_params - fixed
    floor = sum(factor_params(m, n, 1) for m, n in shapes)
    if available < floor:
        msg = (
            f"`retain`={retain} is too small: the parameters outside the compressed "
            f"layers alone are {fixed / plan.total_params:.4f} of the model, and rank 1 "
            f"everywhere needs {(fixed + floor) / plan.total_params:.4f}; raise `retain` "
            "or target more layers"
        )
        raise ValueError(msg)
    if available >= plan.target_dense_params:
        if keep_dense:
            return dict.fromkeys(names)
        return {n: max(1, break_even_rank(*plan.plans[n].shape)) for n in names}
    if allocation == "uniform":
        ranks = allocate_uniform(shapes, available / plan.target_dense_params)
        return {
            n: (None if keep_dense and factor_params(m, k, r) >= m * k else r)
            for n, (m, k), r in zip(names, shapes, ranks, strict=True)
        }
    gains, costs = [], []
    for n in names:
        p = plan.plans[n]
        if keep_dense:
            g, c = layer_units(p.gains, *p.shape, p.total_energy)
        else:  # rank units only, up to break-even
            r_be = max(1, break_even_rank(*p.shape))
            g, c = np.asarray(p.gains[:r_be]), rank_unit_costs(*p.shape, r_be)
        gains.append(g[1:])  # rank 1 is bought up front for every layer
        costs.append(c[1:])
    if not keep_dense and sum(c.sum() for c in costs) == 0:
        return {n: 1 for n in names}
    budget = (available - floor) / float(sum(c.sum() for c in costs))
    if budget <= 0:
        taken = [0] * len(names)
    else:
        taken = allocate_ranks(gains, costs, min(budget, 1.0))
    out: dict[str, int | None] = {}
    for n, t, g in zip(names, taken, gains, strict=True):
        out[n] = None if keep_dense and t == len(g) else 1 + t
    return out


def replace_layers(
    model: nn.Module,
    plan: CompressionPlan,
    ranks: Mapping[str, int | None],
    *,
    retain: float,
    allocation: str = "global",
    basis: str = "orthonormal",
) -> CompressionReport:
    r"""Swap each planned layer for its :class:`JactusLinear` at ``ranks[name]``.

    ``basis="orthonormal"`` stores the factors as orthonormal bases of
    :math:`\operatorname{span}(A)`, :math:`\operatorname{span}(B)` with the
    core re-expressed in them (:func:`jactus_linalg.orthonormal_factors`;
    same product, well-scaled for training); ``"whitened"`` keeps
    :math:`A = S_g^{-\top} U`, :math:`B = S_x^{-\top} V` as the core computes them.
    """
    if basis not in ("orthonormal", "whitened"):
        msg = f"`basis` must be 'orthonormal' or 'whitened'; got {basis!r}"
        raise ValueError(msg)
    modules = dict(model.named_modules())
    reports: list[LayerReport] = []
    for name, rank in ranks.items():
        mod = modules[name]
        m, n = mod.out_features, mod.in_features
        bias = 0 if mod.bias is None else mod.bias.numel()
        infos, notes = _whitening_report(plan, name)
        if rank is None:
            reports.append(
                LayerReport(
                    name, (m, n), None, None, m * n + bias, m * n + bias, 0.0, notes, *infos
                )
            )
            continue
        lp = plan.plans[name]
        # factor, orthonormalise and measure in the working precision (at least
        # float32); round to the model's dtype once, at the end
        cut = lp._replace(weight_dtype=lp.core.dtype).factorize(rank)
        factors = (cut.left, cut.core, cut.right)
        if basis == "orthonormal":
            factors = orthonormal_factors(*factors)
        factors = tuple(f.to(mod.weight.dtype) for f in factors)
        _check_factors(name, rank, factors, basis)
        new = JactusLinear.from_factors(
            *factors, None if mod.bias is None else mod.bias.detach()
        )
        loss = _predicted_loss(plan, name, mod.weight.detach(), cut)
        _set_module(model, name, new)
        reports.append(
            LayerReport(
                name, (m, n), rank, tuple(cut.core.shape), m * n + bias, new.n_params(), loss,
                notes, *infos,
            )
        )
    for name in plan.fixed_dense:
        mod = modules[name]
        size = sum(p.numel() for p in mod.parameters())
        reports.append(LayerReport(name, (mod.out_features, mod.in_features), None, None, size, size, 0.0))
    after = _model_params(model)
    return CompressionReport(
        method=plan.method,
        retain_target=retain,
        retain_achieved=after / plan.total_params,
        params_before=plan.total_params,
        params_after=after,
        task_fraction=plan.task_fraction,
        damping=plan.damping,
        allocation=allocation,
        gain_units=GAIN_UNITS[plan.method],
        layers=reports,
        notes=list(plan.notes),
    )


def _whitening_report(
    plan: CompressionPlan, name: str
) -> tuple[tuple[WhiteningInfo | None, WhiteningInfo | None], list[str]]:
    """Whitening info of both statistics of a planned layer, and every note about it."""
    input_op, grad_op = plan.curvature.get(name, (None, None))
    infos = (info_of(input_op), info_of(grad_op))
    notes = [note for info in infos if info is not None for note in info.notes]
    return infos, notes + list(plan.layer_notes.get(name, []))


def _check_factors(name: str, rank: int, factors: tuple[torch.Tensor, ...], basis: str) -> None:
    """Refuse factors that overflowed when rounded to the model's dtype."""
    for label, f in zip(("left", "core", "right"), factors, strict=True):
        if not bool(torch.isfinite(f).all()):
            msg = (
                f"layer `{name}`: the rank-{rank} `{label}` factor overflows the model's "
                f"dtype {f.dtype} (largest finite value {torch.finfo(f.dtype).max:.6g})"
                + (
                    "; use basis='orthonormal' (bounded factors)"
                    if basis != "orthonormal"
                    else ""
                )
                + "; or compress a float32 copy of the model"
            )
            raise ValueError(msg)


def _predicted_loss(plan: CompressionPlan, name: str, weight: torch.Tensor, cut) -> float | None:
    r"""Half the squared K-FAC curvature-norm error: :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert^2`."""
    input_op, grad_op = plan.curvature[name]
    if grad_op is None:
        return None
    if plan.method in ("kfac", "jactus") and plan.plans[name].grad_op is not None:
        return 0.5 * cut.error**2  # the plan's own norm is the K-FAC norm
    err = curvature_error(
        weight, cut.left, cut.core, cut.right, input_cov=input_op, grad_cov=grad_op
    )
    return 0.5 * err**2


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compress(
    model: nn.Module,
    stats: CalibrationStats,
    *,
    retain: float = 0.8,
    task_fraction: float = DEFAULT_TASK_FRACTION,
    method: str = "jactus",
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    allocation: str = "global",
    grad_whitening: bool = True,
    whitening: str = "cholesky",
    basis: str = "orthonormal",
    dtype: str | None = None,
    keep_dense: bool = True,
    progress: bool = True,
) -> CompressionReport:
    r"""Compress ``model`` in place to ``retain`` of its parameters.

    Parameters
    ----------
    model : nn.Module
        The dense model that ``stats`` were collected on.
    stats : CalibrationStats
        From :func:`jactus_linalg.torch.calibrate`.
    retain : float in (0, 1], optional
        Parameters after / parameters before, over the whole model.
    task_fraction : float in [0, 1], optional
        :math:`\tau`, the share of each layer's rank spent on gradient
        directions (``method="jactus"`` only).
    method : {"jactus", "kfac", "svd-llm", "svd"}, optional
        ``"svd"``: truncated SVD; ``"svd-llm"``: input whitening only;
        ``"kfac"``: two-sided whitening; ``"jactus"``: two-sided whitening
        plus the union with gradient directions.
    damping : float or (float, float), optional
        Relative damping of (input, gradient) covariances.
    allocation : {"global", "uniform"}, optional
        Greedy global allocation by gain per parameter, or the same
        parameter fraction in every layer (ablation).
    grad_whitening : bool, optional
        ``False`` drops :math:`C_g` from the factorization (ablation).
    whitening : {"cholesky", "eigh"}, optional
    basis : {"orthonormal", "whitened"}, optional
        How the frozen factors are stored (see :func:`replace_layers`).
    dtype : {None, "float32", "float64"}, optional
        Decomposition dtype. ``None`` keeps the statistics' dtype (float64 on
        CPU); ``"float32"`` halves the time of the SVDs. Statistics are still
        accumulated in float64; the weight is promoted to at least this dtype.
    keep_dense : bool, optional
        Keep a layer dense (frozen, no core) when its allocation reaches the
        break-even rank (default, as DESIGN.md says). ``False`` factorizes it
        at the break-even rank instead, so every target layer has a core.
    progress : bool, optional

    Returns
    -------
    CompressionReport
        Per-layer ranks, parameters before and after, the achieved retain
        fraction and the predicted loss increase
        :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert_F^2` per layer (for
        every method, in the same K-FAC norm, when gradients were collected).

    Raises
    ------
    ValueError
        On an unknown ``method``, ``retain`` outside (0, 1] or too small for
        the non-target parameters, a model that is already compressed,
        statistics from another model or with missing layers, non-finite
        statistics, weights or biases, a singular covariance with
        ``damping=0``, a layer that no loss gradient reached (for ``"kfac"``
        and ``"jactus"``; ``"svd-llm"`` and ``"svd"`` compress it and note
        that its predicted loss is unavailable), or factors that overflow the
        model's dtype. Every message names the layer and says what to do.

    Notes
    -----
    Each :class:`LayerReport` carries ``input_whitening`` and
    ``grad_whitening`` (:class:`~jactus_linalg.WhiteningInfo`: damping,
    effective rank, numerical rank, notes), also for layers kept dense.
    Factors are computed and orthonormalised in the working precision (at
    least float32) and rounded to the model's dtype once.
    """
    plan = plan_compression(
        model, stats, method=method, task_fraction=task_fraction, damping=damping,
        grad_whitening=grad_whitening, whitening=whitening, dtype=dtype, progress=progress,
    )
    ranks = allocate(plan, retain, allocation=allocation, keep_dense=keep_dense)
    return replace_layers(model, plan, ranks, retain=retain, allocation=allocation, basis=basis)


def predicted_losses(report: CompressionReport) -> np.ndarray:
    """Per-layer predicted loss increases as an array (NaN where unavailable)."""
    return np.array(
        [math.nan if r.predicted_loss_increase is None else r.predicted_loss_increase for r in report.layers]
    )
