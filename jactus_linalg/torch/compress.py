"""Whole-model compression: plan every layer with the core, allocate ranks globally, swap layers.

``compress(model, stats, JactusConfig(retain=0.8))`` (or
``compress(model, stats, retain=0.8)``) is four steps, the first three
reusable on their own:

1. :func:`plan_compression` factors each input covariance once per input
   group and calls :func:`jactus_linalg.plan_layer` for every target layer
   (one decomposition per layer, whatever the final rank);
2. :func:`allocate` turns the ``retain`` budget into per-layer ranks with
   the core's budget solver;
3. :func:`replace_layers` swaps each factored ``nn.Linear`` for a
   :class:`JactusLinear`;
4. every target layer kept dense gets a mergeable core
   (:class:`~jactus_linalg.torch.merge.MergeableLinear`, ``dense_cores``),
   and :func:`~jactus_linalg.torch.mark_trainable` leaves only the cores
   trainable (``trainable="cores"``), as PEFT's ``get_peft_model`` does.

Step 1 is the cost; steps 2-4 are cheap. To compress one model at several
budgets, decompose it once with :func:`prepare_compression` and compress a
copy per retain with :meth:`PreparedCompression.compress` (or
:func:`compress_many`, which does both): the same ranks and factors as
:func:`compress` at each retain, which is itself
``prepare_compression(model, stats, config).compress(model)``.

The budget counts the whole model: ``retain = parameters after / parameters
before``, counted as deployed (after :func:`~jactus_linalg.torch.merge`).
Parameters outside the targets (embeddings, norms, head, biases) are kept
and count against it. Every factored layer keeps rank >= ``min_rank``; a
layer whose allocation reaches its break-even rank stays dense (factored
there, it would hold as many numbers and lose information); ``retain=1``
keeps every layer dense.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._backend import namespace, qr_reduced
from ..allocation import allocate_budget, break_even_rank
from ..covariance import CovarianceRoot, LayerStatistics
from ..jactus import DEFAULT_TASK_DIRECTIONS, DEFAULT_TASK_FRACTION, JactusLayer, LayerPlan, plan_layer
from ..lowrank import WhiteningInfo, curvature_error, info_of, orthonormal_factors
from ..whitening import DEFAULT_DAMPING, WhiteningOperator, whitening_operator
from .config import METHODS, JactusConfig, check_field_names
from .layer import JactusLinear
from .merge import MergeableLinear
from .stats import CalibrationStats
from .targets import check_materialized, find_targets
from .tuning import core_parameters, mark_trainable

__all__ = [
    "METHODS",
    "PLAN_FIELDS",
    "CompressionPlan",
    "CompressionReport",
    "LayerReport",
    "PreparedCompression",
    "add_dense_cores",
    "allocate",
    "compress",
    "compress_many",
    "plan_compression",
    "prepare_compression",
    "replace_layers",
]

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
    #: Shape ``(a, b)`` of the mergeable core of a layer kept dense (``None``
    #: for a factored layer, or one kept dense without a core).
    dense_core: tuple[int, int] | None = None


@dataclass
class CompressionReport:
    """Per-layer ranks, parameter counts (as deployed, after merging) and predicted loss increase."""

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
    #: The configuration that produced this report (set by :func:`compress`).
    config: JactusConfig | None = None

    @property
    def total_predicted_loss_increase(self) -> float | None:
        known = [r.predicted_loss_increase for r in self.layers if r.predicted_loss_increase is not None]
        if len(known) < len(self.layers):
            return None
        return float(sum(known))

    @property
    def ranks(self) -> dict[str, int | None]:
        return {r.name: r.rank for r in self.layers}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total_predicted_loss_increase"] = self.total_predicted_loss_increase
        return out

    def table(self) -> str:
        """Plain-text per-layer table."""
        lines = [f"{'layer':<48}{'shape':>12}{'rank':>7}{'core':>9}{'params':>11}{'pred. dL':>12}"]
        for r in self.layers:
            rank = "dense" if r.rank is None else str(r.rank)
            shape = r.core_shape if r.rank is not None else r.dense_core
            core = "-" if shape is None else f"{shape[0]}x{shape[1]}"
            loss = "n/a" if r.predicted_loss_increase is None else f"{r.predicted_loss_increase:.3e}"
            lines.append(
                f"{r.name:<48}{f'{r.shape[0]}x{r.shape[1]}':>12}{rank:>7}{core:>9}"
                f"{r.params_after:>11}{loss:>12}"
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
    #: Where the task directions came from ("covariance" or "gradient").
    task_directions: str = DEFAULT_TASK_DIRECTIONS


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
    task_directions: str = DEFAULT_TASK_DIRECTIONS,
    damping: float | tuple[float, float] = DEFAULT_DAMPING,
    grad_whitening: bool = True,
    whitening: str = "cholesky",
    dtype: str | None = None,
    progress: bool = True,
) -> CompressionPlan:
    """Decompose every target layer once (see :func:`compress` for the parameters).

    ``task_directions="covariance"`` (default) takes the task directions from
    the top eigenvectors of each layer's :math:`C_g` and its shared
    :math:`C_x` (read off their factors, which are computed once; the
    shared operator keeps its eigenvectors, so :math:`C_x` is decomposed once
    per input group: q/k/v, gate/up);
    ``"gradient"`` from the whitened mean gradient (ablation).
    """
    if dtype not in (None, "float32", "float64"):
        msg = f"`dtype` must be None, 'float32' or 'float64'; got {dtype!r}"
        raise ValueError(msg)
    work = None if dtype is None else getattr(torch, dtype)
    if method not in METHODS:
        msg = f"`method` must be one of {sorted(METHODS)}; got {method!r}"
        raise ValueError(msg)
    _check_not_compressed(model)
    check_materialized(model, "compress")
    modules = _target_modules(model, stats)
    use_x, use_g, use_task = METHODS[method]
    use_g = use_g and grad_whitening
    tau = task_fraction if use_task else 0.0
    needs_grad = use_g or (use_task and tau > 0)
    by_gradient = task_directions == "gradient"
    if method == "svd-llm" and damping is DEFAULT_DAMPING:  # not overridden: SVD-LLM's numerics
        damping = ("svd-llm", DEFAULT_DAMPING)  # type: ignore[assignment]  # C_g: report only
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
                    method=whitening, name="input_cov", products=layer.input_products,
                )
            grad_op = None
            if layer.grad_cov is not None:
                grad_op = whitening_operator(
                    _to(layer.grad_cov, weight.device, work), damping=damp_g,
                    method=whitening, name="grad_cov", products=layer.grad_products,
                )
            plans[name] = plan_layer(
                weight,
                input_cov=input_ops[group] if use_x else None,
                grad_cov=grad_op if use_g else None,
                grad_mean=(
                    _to(layer.grad_mean, weight.device, work) if tau > 0 and by_gradient else None
                ),
                task_fraction=tau,
                task_directions=task_directions,
                max_rank=break_even_rank(m, n),
                whitening=whitening,
                task_grad_cov=grad_op if tau > 0 and not use_g else None,
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
        task_directions=task_directions,
    )


def allocate(
    plan: CompressionPlan,
    retain: float,
    *,
    allocation: str = "global",
    min_rank: int = 1,
    fixed_ranks: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
    """Ranks per layer (``None`` = keep dense) meeting ``retain`` for the whole model.

    A thin call to :func:`jactus_linalg.allocate_budget`, the budget rule of
    the core (whole-model budget, rank floor ``min_rank``, keep-dense unit,
    ``fixed_ranks`` by layer name paid first).

    Raises
    ------
    ValueError
        If ``retain`` is outside ``(0, 1]``, too small to hold the parameters
        outside the targets plus the fixed ranks plus ``min_rank`` per layer,
        or ``allocation`` unknown.
    """
    names = list(plan.plans)
    index = {name: i for i, name in enumerate(names)}
    fixed = {index[n]: r for n, r in (fixed_ranks or {}).items() if n in index}
    ranks = allocate_budget(
        [plan.plans[n].shape for n in names],
        [plan.plans[n].gains for n in names],
        [plan.plans[n].total_energy for n in names],
        retain,
        plan.total_params,
        min_rank=min_rank,
        fixed_ranks=fixed,
        allocation=allocation,
    )
    return dict(zip(names, ranks, strict=True))


def replace_layers(
    model: nn.Module,
    plan: CompressionPlan,
    ranks: Mapping[str, int | None],
    *,
    retain: float,
    allocation: str = "global",
    basis: str = "orthonormal",
    extract: Callable[[str, int, str], tuple[JactusLayer, tuple[torch.Tensor, ...]]] | None = None,
) -> CompressionReport:
    r"""Swap each planned layer for its :class:`JactusLinear` at ``ranks[name]``.

    ``basis="orthonormal"`` stores the factors as orthonormal bases of
    :math:`\operatorname{span}(A)`, :math:`\operatorname{span}(B)` with the
    core re-expressed in them (:func:`jactus_linalg.orthonormal_factors`;
    same product, well-scaled for training); ``"whitened"`` keeps
    :math:`A = S_g^{-\top} U`, :math:`B = S_x^{-\top} V` as the core computes them.
    ``extract(name, rank, basis)`` gives a layer's cut and factors in the
    working precision (default :func:`_extract_factors`, computed at
    ``rank``; :class:`PreparedCompression` slices them from its cache).
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
        cut, factors = _extract_factors(lp, rank, basis) if extract is None else extract(name, rank, basis)
        left, core, right = (f.to(mod.weight.dtype) for f in factors)
        _check_factors(name, rank, (left, core, right), basis)
        new = JactusLinear.from_factors(
            left, core, right, None if mod.bias is None else mod.bias.detach()
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


def _extract_factors(
    lp: LayerPlan, rank: int, basis: str
) -> tuple[JactusLayer, tuple[torch.Tensor, ...]]:
    """The plan cut at ``rank`` in the working precision, and its factors in ``basis``."""
    cut = _working_factorization(lp, rank)
    factors: tuple[torch.Tensor, ...] = (cut.left, cut.core, cut.right)
    if basis == "orthonormal":
        factors = tuple(orthonormal_factors(*factors))
    return cut, factors


def _dense_core_bases(lp: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the union subspaces at the break-even rank (working precision)."""
    cut = _working_factorization(lp, lp.max_rank)
    left, _, right = orthonormal_factors(cut.left, cut.core, cut.right)
    return left, right


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
    r"""Half the squared K-FAC curvature-norm error: :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert^2`.

    With statistics on DESIGN's per-token scale (``calibrate(...,
    grad_scale="tokens")``, the default) this is the predicted rise of the
    mean per-token loss in nats; measure the actual rise with
    :func:`jactus_linalg.torch.measure.measure_loss_increase`.
    """
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


def _working_factorization(lp: LayerPlan, rank: int):
    """The plan cut at ``rank`` with factors in the working precision (at least float32)."""
    return lp.factorize(rank, dtype=lp.core.dtype)


def _resolve_config(config: object, fields: dict[str, Any]) -> JactusConfig:
    """``config`` with ``fields`` applied, or a config made of ``fields``."""
    check_field_names(fields)
    if config is None:
        return JactusConfig(**fields)
    if not isinstance(config, JactusConfig):
        hint = (
            f" (to set the budget, pass `retain={config!r}`)"
            if isinstance(config, int | float) and not isinstance(config, bool)
            else ""
        )
        msg = f"`config` must be a JactusConfig or None; got {type(config).__name__}{hint}"
        raise TypeError(msg)
    return config.replace(**fields) if fields else config


def _check_model_and_stats(model: object, stats: object) -> None:
    if not isinstance(model, nn.Module):
        msg = f"`model` must be a torch nn.Module; got {type(model).__name__}"
        raise TypeError(msg)
    if not isinstance(stats, CalibrationStats):
        msg = (
            "`stats` must be the CalibrationStats that `calibrate(model, batches, loss_fn)` "
            f"returns (or `CalibrationStats.load(path)`); got {type(stats).__name__}"
        )
        raise TypeError(msg)
    cored = [n for n, m in model.named_modules() if isinstance(m, MergeableLinear)]
    if cored:
        msg = (
            f"`model` is already compressed (it holds mergeable cores, e.g. `{cored[0]}`); "
            "compress the original dense model (or `merge(model)` first)"
        )
        raise ValueError(msg)


def _selected_stats(model: nn.Module, stats: CalibrationStats, config: JactusConfig) -> CalibrationStats:
    """``stats`` restricted to ``config.target_modules`` minus ``config.exclude_modules``."""
    if config.target_modules is None and config.exclude_modules is None:
        return stats
    _check_not_compressed(model)
    calibrated = list(_target_modules(model, stats))  # checks stats against the model
    targets = calibrated if config.target_modules is None else config.target_modules
    key = "target_modules" if config.exclude_modules is None else "target_modules/exclude_modules"
    try:
        chosen = find_targets(model, targets, exclude=config.exclude_modules)
    except ValueError as err:
        msg = f"`{key}` select no layer: {err}"
        raise ValueError(msg) from err
    lacking = [n for n in chosen if n not in stats.layers]
    if lacking:
        msg = (
            f"`target_modules`={config.target_modules!r} selects {len(lacking)} layer(s) that "
            f"`stats` has no statistics for, e.g. {lacking[:3]}; calibrate with `targets` "
            "covering them, or narrow `target_modules`"
        )
        raise ValueError(msg)
    return CalibrationStats(
        layers={n: info for n, info in stats.layers.items() if n in chosen},
        inputs=stats.inputs,
        grads=stats.grads,
        grad_sums=stats.grad_sums,
        n_batches=stats.n_batches,
        meta={**stats.meta, "targets": None, "exclude": None},  # checked above
    )


def _pattern_matches(key: str, name: str) -> bool:
    """PEFT's rule: ``key`` (a name or regex) matches ``name`` or its last dotted parts."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


def _check_names_before_planning(model: nn.Module, layers: list[str], config: JactusConfig) -> None:
    """``rank_pattern`` keys and ``modules_to_save`` that match nothing, refused before any work."""
    for key in config.rank_pattern:
        if not any(_pattern_matches(key, n) for n in layers):
            msg = (
                f"`rank_pattern` key {key!r} matches no compressed layer; layers here "
                f"include {layers[:4]}"
            )
            raise ValueError(msg)
    if config.trainable == "cores":
        names = [n for n, _ in model.named_modules()]
        for wanted in config.modules_to_save:
            if not any(n == wanted or n.endswith("." + wanted) for n in names):
                msg = f"`modules_to_save` name {wanted!r} matches no module of `model`"
                raise ValueError(msg)


def _fixed_ranks(plan: CompressionPlan, rank_pattern: Mapping[str, int]) -> dict[str, int]:
    """``rank_pattern`` resolved to planned layer names (the first matching key wins)."""
    out: dict[str, int] = {}
    for key, rank in rank_pattern.items():
        names = [n for n in (*plan.plans, *plan.fixed_dense) if _pattern_matches(key, n)]
        if not names:
            msg = (
                f"`rank_pattern` key {key!r} matches no compressed layer; layers here "
                f"include {list(plan.plans)[:4]}"
            )
            raise ValueError(msg)
        for name in names:
            if name in out:
                continue
            limit = plan.plans[name].max_rank if name in plan.plans else 0
            if rank > limit:
                msg = (
                    f"`rank_pattern[{key!r}]`={rank} exceeds layer `{name}`'s break-even "
                    f"rank {limit} (at that rank its factors hold as many numbers as the "
                    "dense weight); use a smaller rank, or `exclude_modules` to keep it dense"
                )
                raise ValueError(msg)
            out[name] = rank
    return out


def _plan_options(config: JactusConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`plan_compression` from ``config``."""
    options: dict[str, Any] = {
        "method": config.method,
        "task_fraction": config.task_fraction,
        "task_directions": config.task_directions,
        "grad_whitening": config.grad_whitening,
        "whitening": config.whitening,
        "dtype": config.dtype,
    }
    if config.damping is not None:  # else the method's default
        options["damping"] = config.damping
    return options


def add_dense_cores(
    model: nn.Module,
    plan: CompressionPlan,
    report: CompressionReport,
    bases: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    r"""Give every planned layer that ``report`` keeps dense a mergeable core, in place.

    The core sits in the layer's union subspaces at its break-even rank
    (:meth:`~jactus_linalg.LayerPlan.factorize`, then
    :func:`~jactus_linalg.orthonormal_factors` for orthonormal bases) and
    starts at zero. Each such :class:`LayerReport` records the core's shape
    in ``dense_core``. ``bases(name)`` gives those orthonormal bases
    (default :func:`_dense_core_bases`; :class:`PreparedCompression` reads
    them from its cache).
    """
    for layer in report.layers:
        if layer.rank is not None or layer.name not in plan.plans:
            continue  # factored, or too small to factor (no subspace planned)
        lp = plan.plans[layer.name]
        left, right = _dense_core_bases(lp) if bases is None else bases(layer.name)
        mod = model.get_submodule(layer.name)
        assert isinstance(mod, nn.Linear)  # planned layers are nn.Linear
        dtype = mod.weight.dtype
        new = MergeableLinear.from_linear(mod, left.to(dtype), right.to(dtype))
        _set_module(model, layer.name, new)
        layer.dense_core = new.rank


def compress(
    model: nn.Module,
    stats: CalibrationStats,
    config: JactusConfig | None = None,
    *,
    progress: bool = True,
    **fields: Any,
) -> CompressionReport:
    r"""Compress ``model`` in place to ``config.retain`` of its parameters, ready to tune.

    Parameters
    ----------
    model : nn.Module
        The dense model that ``stats`` were collected on.
    stats : CalibrationStats
        From :func:`jactus_linalg.torch.calibrate`.
    config : JactusConfig, optional
        Every choice (budget, method, targets, ranks, dtypes, what trains);
        see :class:`~jactus_linalg.torch.JactusConfig`. Default: its defaults.
    progress : bool, optional
        Show a progress bar while decomposing.
    **fields
        :class:`~jactus_linalg.torch.JactusConfig` fields, e.g.
        ``retain=0.8``: they build the config, or override those of
        ``config``.

    Returns
    -------
    CompressionReport
        ``layers`` (each with ``name``, ``rank``, ``None`` for a layer kept
        dense, and ``dense_core``, the shape of its mergeable core),
        ``params_after`` (as deployed, after :func:`~jactus_linalg.torch.merge`),
        the achieved retain fraction, the predicted loss increase
        :math:`\tfrac12\lVert S_g^\top \Delta W S_x\rVert_F^2` per layer and
        ``total_predicted_loss_increase`` (for every method, in the same
        K-FAC norm, when gradients were collected), and ``config``.

    Raises
    ------
    TypeError
        If ``model``, ``stats`` or ``config`` has the wrong type, or a
        field is unknown or of the wrong type.
    ValueError
        On a bad field value (named), ``retain`` too small for the
        non-target parameters, a model that is already compressed,
        statistics from another model or with missing layers, non-finite
        statistics, weights or biases, a singular covariance with
        ``damping=0``, a layer that no loss gradient reached (for ``"kfac"``
        and ``"jactus"``; ``"svd-llm"`` and ``"svd"`` compress it and note
        that its predicted loss is unavailable), a ``rank_pattern`` key that
        matches no layer or asks for more than the break-even rank, or
        factors that overflow the model's dtype. Every message names the
        layer or the argument and says what to do.

    Notes
    -----
    With ``trainable="cores"`` (default) the returned model trains only its
    cores: :math:`C` of each factored layer, :math:`\Delta C` of each
    mergeable core, plus ``modules_to_save``
    (:func:`~jactus_linalg.torch.mark_trainable`). After tuning,
    :func:`~jactus_linalg.torch.merge` folds the mergeable cores into their
    weights; :func:`~jactus_linalg.torch.save_compressed` then writes the
    model with its config (``model.jactus_config``).

    Each :class:`LayerReport` carries ``input_whitening`` and
    ``grad_whitening`` (:class:`~jactus_linalg.WhiteningInfo`: damping,
    effective rank, numerical rank, notes), also for layers kept dense.
    Factors are computed and orthonormalised in the working precision (at
    least float32) and rounded to the model's dtype once.
    """
    config = _resolve_config(config, fields)
    prepared = prepare_compression(model, stats, config, progress=progress)
    prepared.cache_factors = False  # one retain: each layer's factors at its own rank only
    return prepared.compress(model)


#: :class:`JactusConfig` fields that the decomposition depends on. A
#: :class:`PreparedCompression` fixes them; every other field (``retain``,
#: ``allocation``, ``min_rank``, ``rank_pattern``, ``basis``, ``dense_cores``,
#: ``trainable``, ``core_dtype``, ``modules_to_save``) may change from one
#: :meth:`PreparedCompression.compress` call to the next.
PLAN_FIELDS = (
    "method", "task_fraction", "task_directions", "damping", "target_modules",
    "exclude_modules", "grad_whitening", "whitening", "dtype",
)


class _FactorCache:
    r"""Each layer's factors at its break-even rank, computed once; every rank slices them.

    A helper of :class:`PreparedCompression`. At the plan's ``max_rank`` R,
    with :math:`a_R, b_R` columns, it keeps :math:`A_R = S_g^{-\top} U_{:a_R}`
    and :math:`B_R = S_x^{-\top} V_{:b_R}` (the solves of
    :func:`~jactus_linalg.lowrank.deployable_factors`) and, once an
    orthonormal basis or a dense core asks for them, the Householder QRs
    :math:`A_R = Q_A R_A`, :math:`B_R = Q_B R_B`. Both are prefix-stable:
    column :math:`i` of :math:`S^{-\top} X` depends only on column :math:`i`
    of :math:`X` (a triangular or eigen solve acts on each column), and
    columns :math:`\le i` of :math:`Q` and the leading :math:`i \times i`
    block of :math:`R` depend only on columns :math:`\le i` of the factored
    matrix. So at rank :math:`r` (:math:`a = a_r`, :math:`b = b_r`),

    .. math::

        A_r = (A_R)_{:, :a}, \qquad
        \operatorname{qr}(A_r) = \bigl((Q_A)_{:, :a},\ (R_A)_{:a, :a}\bigr),

    and the factors of :func:`~jactus_linalg.orthonormal_factors` are
    :math:`\bigl((Q_A)_{:,:a},\ (R_A)_{:a,:a} K_{:a,:b} (R_B)_{:b,:b}^\top,\
    (Q_B)_{:,:b}\bigr)`: what :func:`_extract_factors` computes at rank
    :math:`r`, to rounding (Householder QR is backward stable; the blocking
    of the two QRs differs). Layers are filled lazily, at the first rank
    that needs them; layers never factored cost nothing.

    Memory: per layer, :math:`A_R, B_R` and :math:`Q_A, Q_B` hold as much as
    the plan's bases :math:`U, V` each, in the working precision.
    """

    def __init__(self, plan: CompressionPlan) -> None:
        self.plan = plan
        self.full: dict[str, JactusLayer] = {}
        self.qr: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _full(self, name: str) -> JactusLayer:
        """The cut at ``max_rank`` (its left and right are :math:`A_R`, :math:`B_R`)."""
        if name not in self.full:
            lp = self.plan.plans[name]
            self.full[name] = _working_factorization(lp, lp.max_rank)
        return self.full[name]

    def _qr(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:math:`(Q_A, R_A, Q_B, R_B)`, as :func:`~jactus_linalg.orthonormal_factors` factors them."""
        if name not in self.qr:
            full = self._full(name)
            xp = namespace(full.left)
            q_a, r_a = qr_reduced(xp, full.left)
            q_b, r_b = qr_reduced(xp, full.right)
            self.qr[name] = (q_a, r_a, q_b, r_b)
        return self.qr[name]

    def factors(self, name: str, rank: int, basis: str) -> tuple[JactusLayer, tuple[torch.Tensor, ...]]:
        """What :func:`_extract_factors` gives at ``rank``, sliced from the cache."""
        lp = self.plan.plans[name]
        full = self._full(name)
        a, b = int(lp.left_counts[rank]), int(lp.right_counts[rank])
        # the cut's numbers (error, bounds, directions) from factorize itself, without its
        # solves (no operators: the factors stay U, V), then the cached solved prefixes
        cut = lp._replace(input_op=None, grad_op=None).factorize(rank, dtype=lp.core.dtype)
        cut = cut._replace(
            left=full.left[:, :a], right=full.right[:, :b],
            input_whitening=full.input_whitening, grad_whitening=full.grad_whitening,
        )
        if basis != "orthonormal":
            return cut, (cut.left, cut.core, cut.right)
        q_a, r_a, q_b, r_b = self._qr(name)
        core = r_a[:a, :a] @ cut.core @ r_b[:b, :b].T
        return cut, (q_a[:, :a], core, q_b[:, :b])

    def dense_bases(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What :func:`_dense_core_bases` gives: :math:`Q_A, Q_B` at the break-even rank."""
        q_a, _, q_b, _ = self._qr(name)
        return q_a, q_b


@dataclass
class PreparedCompression:
    r"""One model decomposed once: every target layer planned, ready to compress at any retain.

    Made by :func:`prepare_compression`. Each layer's plan
    (:class:`~jactus_linalg.LayerPlan`: whitening factors, the SVD of the
    whitened weight :math:`M = S_g^\top W S_x` in its union subspaces, the
    gains :math:`E(r) - E(r-1)` up to the break-even rank) holds every rank
    at once, so a budget costs only the allocation and the factor
    extraction :math:`A = S_g^{-\top} U_{:a}`, :math:`B = S_x^{-\top} V_{:b}`
    of the ranks it gets; with ``cache_factors`` (default) the solves and
    QRs of that extraction run once per layer, at the break-even rank, and
    every later budget slices them.

    Attributes
    ----------
    config : JactusConfig
        The configuration it was prepared with. Its :data:`PLAN_FIELDS` are
        fixed; the others are the defaults of :meth:`compress`.
    plan : CompressionPlan
        The per-layer plans, whitening operators and parameter counts.
    weights : dict of str -> (Tensor, Tensor or None)
        The prepared model's weight and bias of every planned layer.
    cache_factors : bool, default True
        Keep each layer's solved factors :math:`S_g^{-\top} U`,
        :math:`S_x^{-\top} V` and their QRs at the break-even rank, computed
        at the first :meth:`compress` that factors the layer or gives it a
        dense core, so that later retains slice them (:class:`_FactorCache`:
        the same factors to rounding, about the memory of the plan's bases
        again). ``False``: each call solves at the ranks it needs, as
        :func:`compress` (one retain) does.

    Notes
    -----
    It keeps references to the planned weights and biases (not copies), to
    check in :meth:`compress` that the model handed over holds the same
    values: a copy of the prepared model, or that model itself.
    """

    config: JactusConfig
    plan: CompressionPlan
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(repr=False)
    cache_factors: bool = True
    _cache: _FactorCache | None = field(default=None, init=False, repr=False, compare=False)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the prepared one (or a copy of it), naming what differs.

        Raises
        ------
        TypeError
            If ``model`` is not an ``nn.Module``.
        ValueError
            If ``model`` is already compressed, has another parameter count,
            or a planned layer whose weight or bias is missing, of another
            shape, dtype or device, or holds other values.
        """
        if not isinstance(model, nn.Module):
            msg = f"`model` must be a torch nn.Module; got {type(model).__name__}"
            raise TypeError(msg)
        _check_not_compressed(model)
        cored = [n for n, m in model.named_modules() if isinstance(m, MergeableLinear)]
        if cored:
            msg = (
                f"`model` is already compressed (it holds mergeable cores, e.g. `{cored[0]}`); "
                "hand over a fresh copy of the prepared dense model"
            )
            raise ValueError(msg)
        total = _model_params(model)
        if total != self.plan.total_params:
            msg = (
                f"`model` has {total} parameters, the prepared model {self.plan.total_params}: "
                "not the model that was prepared; compress a copy of that model, or prepare "
                "this one"
            )
            raise ValueError(msg)
        modules = dict(model.named_modules())
        for name, (weight, bias) in self.weights.items():
            mod = modules.get(name)
            if type(mod) is not nn.Linear:
                msg = (
                    f"`model` has no nn.Linear `{name}` (the prepared model has one): not the "
                    "model that was prepared"
                )
                raise ValueError(msg)
            for label, ours, theirs in (("weight", weight, mod.weight), ("bias", bias, mod.bias)):
                if ours is theirs:
                    continue
                if ours is None or theirs is None or not _same_tensor(ours, theirs):
                    msg = (
                        f"layer `{name}`: its {label} differs from the prepared model's (values, "
                        "shape, dtype or device): the plan would not describe it; compress a "
                        "copy of the prepared model, or prepare this one"
                    )
                    raise ValueError(msg)

    def ranks(self, retain: float | None = None, **fields: Any) -> dict[str, int | None]:
        """The ranks :meth:`compress` would give at ``retain`` (``None``: kept dense), without compressing.

        ``fields`` as in :meth:`compress`.
        """
        config = self._config(retain, fields)
        return allocate(
            self.plan, config.retain, allocation=config.allocation, min_rank=config.min_rank,
            fixed_ranks=_fixed_ranks(self.plan, config.rank_pattern),
        )

    def compress(
        self, model: nn.Module, retain: float | None = None, **fields: Any
    ) -> CompressionReport:
        """Compress ``model`` (the prepared model or a copy of it) in place at ``retain``.

        Parameters
        ----------
        model : nn.Module
            The model that was prepared, or a copy (``copy.deepcopy``) of it
            holding the same weights; it is changed in place, as by
            :func:`compress`.
        retain : float in (0, 1], optional
            Parameters after / parameters before; default ``config.retain``.
        **fields
            Other :class:`JactusConfig` fields that do not change the
            decomposition (``allocation``, ``min_rank``, ``rank_pattern``,
            ``basis``, ``dense_cores``, ``trainable``, ``core_dtype``,
            ``modules_to_save``).

        Returns
        -------
        CompressionReport
            What :func:`compress` returns with the same configuration: the
            same ranks and factors.

        Raises
        ------
        ValueError
            If a field of :data:`PLAN_FIELDS` asks for another value than the
            prepared one (prepare again), on a bad field value, or if
            ``model`` is not the prepared model (:meth:`check_model`).
        TypeError
            If a field is unknown or of the wrong type.
        """
        config = self._config(retain, fields)
        self.check_model(model)
        if config.rank_pattern != self.config.rank_pattern or (
            config.modules_to_save != self.config.modules_to_save
        ):
            _check_names_before_planning(model, list(self.plan.plans) + self.plan.fixed_dense, config)
        plan = self.plan
        ranks = allocate(
            plan, config.retain, allocation=config.allocation, min_rank=config.min_rank,
            fixed_ranks=_fixed_ranks(plan, config.rank_pattern),
        )
        cache = self._factor_cache()
        report = replace_layers(
            model, plan, ranks, retain=config.retain, allocation=config.allocation,
            basis=config.basis, extract=None if cache is None else cache.factors,
        )
        report.config = config
        if config.dense_cores:
            add_dense_cores(model, plan, report, None if cache is None else cache.dense_bases)
        if config.trainable == "cores":
            if core_parameters(model):
                core_dtype = None if config.core_dtype is None else getattr(torch, config.core_dtype)
                mark_trainable(model, extra=config.modules_to_save, core_dtype=core_dtype)
            else:
                report.notes.append("no layer has a core: nothing was marked trainable")
        model.jactus_config = config  # type: ignore[assignment]  # a plain attribute, like peft_config
        return report

    def _factor_cache(self) -> _FactorCache | None:
        """The factor cache (made at first use), or ``None`` when ``cache_factors`` is off."""
        if not self.cache_factors:
            return None
        if self._cache is None:
            self._cache = _FactorCache(self.plan)
        return self._cache

    def plan_for(self, model: nn.Module, **plan_fields: Any) -> CompressionPlan:
        """The plan, after checking ``model`` and that ``plan_fields`` are the prepared ones.

        For callers that allocate on their own
        (:func:`~jactus_linalg.torch.compress_then_lora`).
        """
        self._config(None, plan_fields)  # refuses a plan field other than the prepared one
        self.check_model(model)
        return self.plan

    def _config(self, retain: float | None, fields: dict[str, Any]) -> JactusConfig:
        """``config`` with ``retain`` and ``fields`` applied; plan fields must not change."""
        check_field_names(fields)
        if "retain" in fields:
            msg = "pass `retain` once, as the argument"
            raise TypeError(msg)
        if retain is not None:
            fields = {**fields, "retain": retain}
        config = self.config.replace(**fields) if fields else self.config
        for key in PLAN_FIELDS:
            if getattr(config, key) != getattr(self.config, key):
                msg = (
                    f"`{key}`={getattr(config, key)!r} changes the decomposition, prepared with "
                    f"{key}={getattr(self.config, key)!r}; prepare_compression again with it"
                )
                raise ValueError(msg)
        return config


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        and bool(torch.equal(a.detach(), b.detach()))
    )


def prepare_compression(
    model: nn.Module,
    stats: CalibrationStats,
    config: JactusConfig | None = None,
    *,
    progress: bool = True,
    **fields: Any,
) -> PreparedCompression:
    r"""Decompose every target layer of ``model`` once, to compress it at any retain afterwards.

    The expensive step of :func:`compress` on its own: per input group the
    factor :math:`S_x` of :math:`C_x`, per layer :math:`S_g`, the whitened
    weight :math:`M = S_g^\top W S_x` and its SVD in the union subspaces
    (:func:`plan_compression`). ``model`` is not changed.

    Parameters
    ----------
    model : nn.Module
        The dense model that ``stats`` were collected on.
    stats : CalibrationStats
        From :func:`jactus_linalg.torch.calibrate`.
    config : JactusConfig, optional
        As for :func:`compress`. Its :data:`PLAN_FIELDS` fix the
        decomposition; ``retain`` and the other fields are only defaults of
        :meth:`PreparedCompression.compress`.
    progress : bool, optional
        Show a progress bar while decomposing.
    **fields
        :class:`JactusConfig` fields that build the config or override those
        of ``config``.

    Returns
    -------
    PreparedCompression
        ``prepared.compress(copy.deepcopy(model), retain=r)`` compresses a
        copy at ``r``, with the ranks and factors of ``compress(copy, stats,
        config, retain=r)``, at the cost of the allocation and the factor
        extraction alone.

    Raises
    ------
    TypeError, ValueError
        As :func:`compress`, before any decomposition where it can.

    Examples
    --------
    >>> prepared = prepare_compression(model, stats, JactusConfig())  # doctest: +SKIP
    >>> for retain in (0.6, 0.7, 0.8, 0.9):  # doctest: +SKIP
    ...     student = copy.deepcopy(model)
    ...     report = prepared.compress(student, retain=retain)
    """
    config = _resolve_config(config, fields)
    _check_model_and_stats(model, stats)
    selected = _selected_stats(model, stats, config)
    _check_names_before_planning(model, list(selected.layers), config)
    plan = plan_compression(model, selected, progress=progress, **_plan_options(config))
    modules = dict(model.named_modules())
    weights = {}
    for name in plan.plans:
        mod = modules[name]
        weights[name] = (mod.weight, mod.bias)
    return PreparedCompression(config, plan, weights)


def compress_many(
    model: nn.Module,
    stats: CalibrationStats,
    retains: Sequence[float],
    config: JactusConfig | None = None,
    *,
    progress: bool = True,
    **fields: Any,
) -> list[tuple[nn.Module, CompressionReport]]:
    r"""Compress copies of ``model`` at each of ``retains`` from one decomposition per layer.

    :func:`prepare_compression` once, then for each retain a
    ``copy.deepcopy(model)`` compressed by
    :meth:`PreparedCompression.compress`. ``model`` is not changed.

    Parameters
    ----------
    model : nn.Module
        The dense model that ``stats`` were collected on.
    stats : CalibrationStats
        From :func:`jactus_linalg.torch.calibrate`.
    retains : sequence of float in (0, 1]
        The budgets, in the order of the result.
    config : JactusConfig, optional
        As for :func:`compress` (its ``retain`` is not used).
    progress : bool, optional
        Show a progress bar while decomposing.
    **fields
        :class:`JactusConfig` fields, as for :func:`compress`.

    Returns
    -------
    list of (nn.Module, CompressionReport)
        One compressed copy and its report per retain, equal (ranks and
        factors) to ``compress(copy.deepcopy(model), stats, config,
        retain=r)``. Each copy holds the model's uncompressed parameters
        too, so memory grows with ``len(retains)``.

    Raises
    ------
    ValueError
        If ``retains`` is empty, or as :func:`compress`.
    """
    import copy  # noqa: PLC0415

    retains = list(retains)
    if not retains:
        msg = "`retains` is empty: give at least one retain fraction in (0, 1]"
        raise ValueError(msg)
    config = _resolve_config(config, fields)
    for retain in retains:
        config.replace(retain=retain)  # every budget checked before the decomposition
    prepared = prepare_compression(model, stats, config, progress=progress)
    out = []
    for retain in retains:
        student = copy.deepcopy(model)
        out.append((student, prepared.compress(student, retain=retain)))
    return out
