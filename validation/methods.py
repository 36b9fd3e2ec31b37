"""The methods compared by the paper runner, built from the package and peft.

Every method starts from the same base model (deep-copied), is tuned with
the same steps, data order and seed (:mod:`validation.train`), and is
evaluated on the same test items. Only the learning rate differs between
method kinds (cores vs LoRA adapters), each set on the tune split.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from jactus_linalg.torch import (
    CalibrationStats,
    compress,
    compress_then_lora,
    count_parameters,
    lora_model,
    mark_trainable,
)

__all__ = ["BuiltMethod", "Method", "build_method", "method_grid"]

KINDS = ("jactus", "ctf", "lora", "dora", "none")


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
        ``task_fraction``, ``grad_whitening``, ``allocation``, ``keep_dense``
        (jactus); ``compression`` (ctf: ``"svd-llm"`` or ``"svd"``);
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
    keep_dense: bool = True,
    untuned: bool = False,
) -> list[Method]:
    """The standard comparison: JACTUS and compress-then-LoRA at each retain, LoRA/DoRA at 100%.

    ``keep_dense`` is JACTUS's rule for layers whose allocation reaches the
    break-even rank; the ablations include the opposite rule. ``untuned``
    adds JACTUS and SVD-LLM+LoRA at retain 0.8 (or the first retain)
    evaluated straight after compression, before any tuning step: what each
    compression keeps of the task on its own (the LoRA adapter starts at
    zero, so the second is the SVD-LLM-compressed model itself).
    """
    tau = (() if task_fraction is None else (("task_fraction", task_fraction),)) + (
        ("keep_dense", keep_dense),
    )
    methods: list[Method] = []
    if base:
        methods.append(Method("base (untuned)", "base", "none"))
    if peft_baselines:
        methods.append(Method("LoRA@1.0", "LoRA", "lora"))
        methods.append(Method("DoRA@1.0", "DoRA", "dora"))
    for r in retains:
        methods.append(Method(f"JACTUS@{r}", "JACTUS", "jactus", r, tau))
        methods.append(
            Method(f"SVD-LLM+LoRA@{r}", "SVD-LLM+LoRA", "ctf", r, (("compression", "svd-llm"),))
        )
        if svd_ctf:
            methods.append(Method(f"SVD+LoRA@{r}", "SVD+LoRA", "ctf", r, (("compression", "svd"),)))
    r = 0.8 if 0.8 in retains else retains[0]
    if untuned:
        methods.append(Method(f"JACTUS@{r} untuned", "untuned: JACTUS", "jactus", r,
                              (*tau, ("tune", False))))
        methods.append(Method(f"SVD-LLM+LoRA@{r} untuned", "untuned: SVD-LLM+LoRA", "ctf", r,
                              (("compression", "svd-llm"), ("tune", False))))
    if ablations:
        methods.append(Method(f"JACTUS tau=0@{r}", "ablation: tau=0", "jactus", r,
                              (("task_fraction", 0.0), ("keep_dense", keep_dense))))
        methods.append(
            Method(f"JACTUS no-Cg@{r}", "ablation: no grad whitening", "jactus", r,
                   (*tau, ("grad_whitening", False)))
        )
        methods.append(
            Method(f"JACTUS uniform@{r}", "ablation: uniform ranks", "jactus", r,
                   (*tau, ("allocation", "uniform")))
        )
        flipped = (*(kv for kv in tau if kv[0] != "keep_dense"), ("keep_dense", not keep_dense))
        label = "keep-dense" if not keep_dense else "no-dense"
        methods.append(Method(f"JACTUS {label}@{r}", f"ablation: {label}", "jactus", r, flipped))
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
) -> BuiltMethod:
    """A fresh copy of ``base`` prepared for ``method``: compressed and/or wrapped, trainables set."""
    model = copy.deepcopy(base)
    total_before = count_parameters(model)[1]
    opts = method.opts
    damp = {} if damping is None else {"damping": damping}
    if method.kind == "jactus":
        report = compress(
            model, stats, retain=method.retain, method="jactus", progress=progress,
            task_fraction=opts.get("task_fraction", _default_tau()),
            grad_whitening=opts.get("grad_whitening", True),
            allocation=opts.get("allocation", "global"), dtype=dtype, **damp,
        )  # an option "keep_dense" is ignored: the package removed it (dense layers get cores)
        half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        # float32 cores on a half-precision model, like peft's float32 adapters
        mark_trainable(model, extra=head, core_dtype=torch.float32 if half else None)
        trainable, total = count_parameters(model)
        return BuiltMethod(model, trainable, total, total / total_before, report)
    if method.kind == "ctf":
        res = compress_then_lora(
            model, stats, retain=method.retain, lora_rank=lora_rank,
            method=opts.get("compression", "svd-llm"), modules_to_save=head or None,
            dtype=dtype, progress=progress, **damp,
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
