"""Choosing the linear layers to compress, PEFT-style.

``targets`` is ``"all-linear"``, a list of module names (a name matches a
module whose qualified name equals it or ends with ``"." + name``), or a
regular expression matched against the full qualified name. The output head
(``model.get_output_embeddings()``, and modules named ``lm_head``,
``classifier``, ``score`` or ``head``) is excluded by default, as in PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

__all__ = ["HEAD_NAMES", "check_materialized", "find_targets"]

HEAD_NAMES = ("lm_head", "classifier", "score", "head")


def check_materialized(model: nn.Module, action: str) -> None:
    """Raise ``ValueError`` if ``model`` has parameters on the meta device (they hold no values).

    ``action`` (``"calibrate"``, ``"compress"``) says what to do once the weights are loaded.
    """
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        msg = (
            f"`model` has {len(meta)} parameter(s) on the meta device (e.g. `{meta[0]}`), "
            "which hold no values: load the weights first (from_pretrained without a meta "
            "`device_map`, or `model.to_empty(device=...)` then `load_state_dict`), then "
            f"{action}"
        )
        raise ValueError(msg)


def _head_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    # transformers' PreTrainedModel returns None for models without an output
    # embedding (ViT, encoders): they have no such head
    out = get_out() if callable(get_out) else None
    if out is not None:
        names.update(n for n, mod in model.named_modules() if mod is out)
    return names


def _matches(name: str, targets: str | re.Pattern | Sequence[str] | None) -> bool:
    if targets is None:
        return False
    if isinstance(targets, re.Pattern):
        return targets.fullmatch(name) is not None
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _compiled(spec: str | Sequence[str] | None, argument: str) -> re.Pattern | Sequence[str] | None:
    """A regex ``spec`` compiled once (a clear error if it is invalid); names pass through."""
    if not isinstance(spec, str) or spec == "all-linear":
        return spec
    try:
        return re.compile(spec)
    except re.error as err:
        msg = (
            f"`{argument}`={spec!r} is not a valid regular expression ({err}); pass "
            "'all-linear', a list of module names, or a regex that matches whole "
            "qualified names, e.g. r'.*\\.(q|v)_proj'"
        )
        raise ValueError(msg) from err


def find_targets(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    *,
    exclude: str | Sequence[str] | None = None,
    include_head: bool = False,
) -> dict[str, nn.Linear]:
    """Target ``nn.Linear`` modules of ``model`` by qualified name, in module order.

    Parameters
    ----------
    model : nn.Module
    targets : "all-linear", list of str, or str (regex)
    exclude : list of str or str (regex), optional
        Names to drop after matching (same rules as ``targets``).
    include_head : bool, optional
        Keep the output head among the targets. Default ``False``.

    Returns
    -------
    dict
        ``{qualified name: module}``.

    Raises
    ------
    TypeError
        If ``targets`` is neither a string nor a sequence of strings.
    ValueError
        If nothing matches (the message lists linear layers that exist), or
        ``targets`` or ``exclude`` is an invalid regular expression.
    """
    if not isinstance(targets, str) and not (
        isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets)
    ):
        msg = f"`targets` must be 'all-linear', a list of names or a regex; got {targets!r}"
        raise TypeError(msg)
    pattern, excluded = _compiled(targets, "targets"), _compiled(exclude, "exclude")
    heads = set() if include_head else _head_names(model)
    linear = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    if targets == "all-linear":
        chosen = {n: m for n, m in linear.items() if n not in heads}
    else:
        chosen = {n: m for n, m in linear.items() if _matches(n, pattern) and n not in heads}
    if excluded is not None:
        chosen = {n: m for n, m in chosen.items() if not _matches(n, excluded)}
    if not chosen:
        sample = ", ".join(list(linear)[:8]) or "none"
        msg = (
            f"`targets`={targets!r} matched no nn.Linear module (head excluded: "
            f"{sorted(heads) or 'none'}); linear layers here include: {sample}. Pass "
            "'all-linear', a list of these names (or their last parts, e.g. 'q_proj'), or "
            "a regex that matches a whole qualified name"
        )
        raise ValueError(msg)
    return chosen
