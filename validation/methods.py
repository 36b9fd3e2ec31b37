"""The methods compared by the paper runner, built from the package and peft.

Every method starts from the same base model (deep-copied), is tuned with
the same steps, data order and seed (:mod:`validation.train`), and is
evaluated on the same test items. Only the learning rate differs between
method families (:func:`lr_family`), each chosen on dev items by
:mod:`validation.sweep`; a new head trains at one rate for every method.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from jactus_linalg.torch import (
    CalibrationStats,
    JactusConfig,
    PreparedCompression,
    compress_then_lora,
    count_parameters,
    lora_model,
    mark_trainable,
    prepare_compression,
)

__all__ = ["BuiltMethod", "Method", "build_method", "lr_family", "method_grid", "prepare_method",
           "reseed_adapters", "save_tuned"]

KINDS = ("jactus", "ctf", "lora", "dora", "none")

#: Learning-rate family of each trainable kind: ablations of JACTUS train
#: at JACTUS's rate, SVD+LoRA at compress-then-finetune's.
LR_FAMILIES = {"jactus": "JACTUS", "ctf": "SVD-LLM+LoRA", "lora": "LoRA", "dora": "DoRA"}


def lr_family(kind: str) -> str:
    """The family whose chosen learning rate a method of ``kind`` trains with."""
    if kind not in LR_FAMILIES:
        msg = f"method kind {kind!r} has no learning rate; expected one of {sorted(LR_FAMILIES)}"
        raise ValueError(msg)
    return LR_FAMILIES[kind]


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes
    ----------
    name : str
        Display name, unique within a part (e.g. ``"JACTUS@0.8"``).
    family : str
        Line in the accuracy-vs-retain plot (e.g. ``"JACTUS"``).
    kind : {"jactus", "ctf", "lora", "dora", "none"}
        ``jactus``: compress with the package, train cores (+ head).
        ``ctf``: compress-then-finetune (SVD-LLM or SVD, then peft LoRA), the
        adapter counted in the budget. ``lora`` / ``dora``: peft at 100%.
        ``none``: the base model, untuned (reference).
    retain : float
    options : dict
        ``task_fraction``, ``grad_whitening``, ``allocation``,
        ``task_directions`` (jactus); ``compression`` (ctf: ``"svd-llm"`` or ``"svd"``);
        ``tune`` (jactus, ctf: ``False`` evaluates right after compression).
    """

    name: str
    family: str
    kind: str
    retain: float = 1.0
    options: tuple = ()

    @property
    def opts(self) -> dict:
        return dict(self.options)

    def key(self) -> str:
        """File-name-safe identifier, used to resume."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        return safe

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = self.opts
        return d

    def build_signature(self) -> tuple:
        """What the built (untrained) model depends on: two methods with one signature share it."""
        return (self.kind, self.retain, tuple(kv for kv in self.options if kv[0] != "tune"))

    def plan_signature(self) -> tuple | None:
        """What the decomposition depends on (``None``: nothing to decompose).

        Methods with one signature (one family at several retains, and the
        uniform-allocation ablation beside JACTUS) can share one
        :func:`prepare_method` of a base model.
        """
        if self.kind not in ("jactus", "ctf"):
            return None
        skip = ("tune", "allocation")
        return (self.kind, tuple(kv for kv in self.options if kv[0] not in skip))


@dataclass
class BuiltMethod:
    model: nn.Module
    trainable_params: int
    total_params: int
    retain_achieved: float
    report: Any = None
    notes: list[str] = field(default_factory=list)


def method_grid(
    retains: tuple[float, ...] = (0.8,),
    *,
    ablations: bool = False,
    peft_baselines: bool = True,
    base: bool = False,
    task_fraction: float | None = None,
    svd_ctf: bool = False,
    untuned: bool = False,
) -> list[Method]:
    """The standard comparison: JACTUS and compress-then-LoRA at each retain, LoRA/DoRA at 100%.

    JACTUS is the package's final configuration (covariance task
    directions, mergeable cores on the layers kept dense). ``untuned`` adds
    JACTUS and SVD-LLM+LoRA at every retain evaluated straight after
    compression, before any tuning step: what each compression keeps of the
    task on its own (the LoRA adapter starts at zero, so the second is the
    SVD-LLM-compressed model itself). The ablations (at retain 0.8, or the
    first retain) change one choice each: no task directions (tau = 0),
    the gradient task directions, no gradient whitening, uniform ranks.
    """
    tau = () if task_fraction is None else (("task_fraction", task_fraction),)
    methods: list[Method] = []
    if base:
        methods.append(Method("base (untuned)", "base", "none"))
    if peft_baselines:
        methods.append(Method("LoRA@1.0", "LoRA", "lora"))
        methods.append(Method("DoRA@1.0", "DoRA", "dora"))
    for r in retains:
        # an untuned row right after its tuned row: the runner builds the compression once
        methods.append(Method(f"JACTUS@{r}", "JACTUS", "jactus", r, tau))
        if untuned:
            methods.append(Method(f"JACTUS@{r} untuned", "untuned: JACTUS", "jactus", r,
                                  (*tau, ("tune", False))))
        methods.append(
            Method(f"SVD-LLM+LoRA@{r}", "SVD-LLM+LoRA", "ctf", r, (("compression", "svd-llm"),))
        )
        if untuned:
            methods.append(Method(f"SVD-LLM+LoRA@{r} untuned", "untuned: SVD-LLM+LoRA", "ctf", r,
                                  (("compression", "svd-llm"), ("tune", False))))
        if svd_ctf:
            methods.append(Method(f"SVD+LoRA@{r}", "SVD+LoRA", "ctf", r, (("compression", "svd"),)))
    r = 0.8 if 0.8 in retains else retains[0]
    if ablations:
        methods.append(Method(f"JACTUS tau=0@{r}", "ablation: tau=0", "jactus", r,
                              (("task_fraction", 0.0),)))
        methods.append(Method(f"JACTUS gradient-directions@{r}", "ablation: gradient directions",
                              "jactus", r, (*tau, ("task_directions", "gradient"))))
        methods.append(
            Method(f"JACTUS no-Cg@{r}", "ablation: no grad whitening", "jactus", r,
                   (*tau, ("grad_whitening", False)))
        )
        methods.append(
            Method(f"JACTUS uniform@{r}", "ablation: uniform ranks", "jactus", r,
                   (*tau, ("allocation", "uniform")))
        )
    return methods


def build_method(
    method: Method,
    base: nn.Module,
    stats: CalibrationStats | None,
    *,
    head: list[str],
    lora_rank: int,
    damping: float | tuple[float, float] | None = None,
    dtype: str | None = None,
    progress: bool = False,
    prepared: PreparedCompression | None = None,
) -> BuiltMethod:
    """A fresh copy of ``base`` prepared for ``method``: compressed and/or wrapped, trainables set.

    ``prepared`` (:func:`prepare_method` of ``base`` for a method with the
    same :meth:`Method.plan_signature`) skips the decomposition; the result
    is the same.
    """
    model = copy.deepcopy(base)
    total_before = count_parameters(model)[1]
    opts = method.opts
    damp = {} if damping is None else {"damping": damping}
    if method.kind == "jactus":
        if prepared is None:
            prepared = prepare_method(method, model, stats, damping=damping, dtype=dtype,
                                      progress=progress)
        report = prepared.compress(model, retain=method.retain,
                                   allocation=opts.get("allocation", "global"))
        half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        # float32 cores on a half-precision model, like peft's float32 adapters
        mark_trainable(model, extra=head, core_dtype=torch.float32 if half else None)
        trainable, _ = count_parameters(model)
        # deployed size: after merge the mergeable cores hold no extra numbers
        total = report.params_after + (total_before - report.params_before)
        return BuiltMethod(model, trainable, total, total / total_before, report)
    if method.kind == "ctf":
        res = compress_then_lora(
            model, stats, retain=method.retain, lora_rank=lora_rank,
            method=opts.get("compression", "svd-llm"), modules_to_save=head or None,
            dtype=dtype, progress=progress, prepared=prepared, **damp,
        )
        trainable, total = count_parameters(res.model)
        total = _count_peft_total(res.model)
        return BuiltMethod(res.model, trainable, total, total / total_before, res.report,
                           [f"compressed to {res.compress_retain:.4f} before adapters"])
    if method.kind in ("lora", "dora"):
        wrapped = lora_model(model, rank=lora_rank, dora=method.kind == "dora",
                             modules_to_save=head or None)
        trainable, _ = count_parameters(wrapped)
        total = _count_peft_total(wrapped)
        return BuiltMethod(wrapped, trainable, total, total / total_before)
    if method.kind == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        return BuiltMethod(model, 0, total_before, 1.0)
    msg = f"unknown method kind {method.kind!r}; expected one of {KINDS}"
    raise ValueError(msg)


def prepare_method(
    method: Method,
    base: nn.Module,
    stats: CalibrationStats,
    *,
    damping: float | tuple[float, float] | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> PreparedCompression:
    """Decompose ``base`` once for ``method`` (a ``jactus`` or ``ctf`` kind), at any retain.

    :func:`build_method` with the result as ``prepared`` builds any method of
    the same :meth:`Method.plan_signature` at its own retain without
    decomposing again (:func:`~jactus_linalg.torch.prepare_compression`).
    """
    opts = method.opts
    damp = {} if damping is None else {"damping": damping}
    if method.kind == "jactus":
        config = JactusConfig(
            method="jactus", task_fraction=opts.get("task_fraction", _default_tau()),
            task_directions=opts.get("task_directions", "covariance"),
            grad_whitening=opts.get("grad_whitening", True), dtype=dtype, **damp,
        )
    elif method.kind == "ctf":
        config = JactusConfig(method=opts.get("compression", "svd-llm"), dtype=dtype, **damp)
    else:
        msg = f"method kind {method.kind!r} decomposes nothing; expected 'jactus' or 'ctf'"
        raise ValueError(msg)
    return prepare_compression(base, stats, config, progress=progress)


def reseed_adapters(model: nn.Module, seed: int) -> int:
    """Re-initialise every peft LoRA adapter of ``model`` from ``seed`` (A random, B zero).

    Lets one compression serve several seeds: the compressed weights are
    the same, only the adapters' initialisation changes. Returns the number
    of layers re-initialised.
    """
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "reset_lora_parameters"):
                for adapter in list(module.lora_A.keys()):
                    module.reset_lora_parameters(adapter, True)
                    count += 1
    return count


def save_tuned(model: nn.Module, kind: str, folder, tokenizer=None) -> str:
    """Write a tuned model so it can be evaluated again without tuning; returns the format.

    * ``jactus``: :func:`~jactus_linalg.torch.merge` (the mergeable cores
      fold into their weights), then :func:`~jactus_linalg.torch.save_compressed`.
    * ``ctf``: peft's ``merge_and_unload`` folds the adapters into the
      factors, then ``save_compressed``.
    * ``lora``, ``dora``, ``none``: ``merge_and_unload`` (peft models), then
      ``save_pretrained`` (safetensors).

    The tokenizer, if any, is saved beside the weights.
    """
    from pathlib import Path  # noqa: PLC0415

    from jactus_linalg.torch import merge, save_compressed  # noqa: PLC0415

    folder = Path(folder)
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if kind in ("jactus", "ctf"):
        merge(model)
        save_compressed(model, folder)
        fmt = "save_compressed"
    elif kind in ("lora", "dora", "none"):
        model.save_pretrained(folder, safe_serialization=True)
        fmt = "save_pretrained"
    else:
        msg = f"unknown method kind {kind!r}; expected one of {KINDS}"
        raise ValueError(msg)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return fmt


def _count_peft_total(model: nn.Module) -> int:
    """Deployed parameters of a peft model: the base plus adapters, not modules_to_save copies."""
    total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue  # peft keeps the untouched original head beside the trained copy
        total += p.numel()
    return total


def _default_tau() -> float:
    from jactus_linalg import DEFAULT_TASK_FRACTION  # noqa: PLC0415

    return DEFAULT_TASK_FRACTION


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_head(model: nn.Module, head: list[str]) -> None:
    """Train only the modules named in ``head`` (the linear-probe warm-up)."""
    freeze_all(model)
    for name, mod in model.named_modules():
        if any(name == h or name.endswith("." + h) for h in head):
            for p in mod.parameters():
                p.requires_grad_(True)


def no_grad_eval(fn):
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
