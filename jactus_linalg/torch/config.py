"""``JactusConfig``: every choice of :func:`~jactus_linalg.torch.compress`, validated once.

Modelled on PEFT's ``LoraConfig``: a frozen dataclass whose
``__post_init__`` checks every field and names the bad one, so a typo fails
before any decomposition runs. Numbers may be Python, numpy or 0-d torch
scalars; they are stored as Python numbers, and the config round-trips
through JSON (:meth:`JactusConfig.to_dict`, :meth:`JactusConfig.from_dict`),
which is how :func:`~jactus_linalg.torch.save_compressed` records it in
``jactus.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..jactus import DEFAULT_TASK_FRACTION
from ..whitening import SVD_LLM

__all__ = ["METHODS", "JactusConfig", "MethodSpec"]


class MethodSpec(NamedTuple):
    """Which statistics a compression method uses."""

    input_cov: bool  # whiten by the input covariance C_x
    grad_cov: bool  # whiten by the output-gradient covariance C_g
    task_directions: bool  # add task directions to the weight subspace (tau > 0)


#: The compression methods, each a special case of the projected low-rank
#: approximation (see the special-cases page of the docs).
METHODS: dict[str, MethodSpec] = {
    "svd": MethodSpec(input_cov=False, grad_cov=False, task_directions=False),
    "svd-llm": MethodSpec(input_cov=True, grad_cov=False, task_directions=False),
    "kfac": MethodSpec(input_cov=True, grad_cov=True, task_directions=False),
    "jactus": MethodSpec(input_cov=True, grad_cov=True, task_directions=True),
}

_CHOICES = {
    "task_directions": ("covariance", "gradient"),
    "allocation": ("global", "uniform"),
    "whitening": ("cholesky", "eigh"),
    "basis": ("orthonormal", "whitened"),
    "trainable": ("cores", "none"),
}
_COMPUTE_DTYPES = ("float32", "float64")
_CORE_DTYPES = ("float32", "float64", "bfloat16", "float16")
_REMOVED = {
    "keep_dense": (
        "`keep_dense` was removed: a layer whose allocation reaches its break-even rank "
        "now always stays dense, and gets a trainable mergeable core instead "
        "(`dense_cores=True`, folded into its weight by `merge`)"
    ),
}


def _scalar(value: object, name: str) -> float:
    """A real number from a Python, numpy or 0-d torch scalar (not a bool), as ``float``."""
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()  # a Python number (a bool tensor gives a bool, refused below)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        msg = f"`{name}` must be a real number; got {value!r} ({type(value).__name__})"
        raise TypeError(msg)
    out = float(value)
    if not math.isfinite(out):
        msg = f"`{name}` must be finite; got {out!r}"
        raise ValueError(msg)
    return out


def _integer(value: object, name: str, *, minimum: int) -> int:
    """A whole number ``>= minimum`` from a Python, numpy or 0-d torch integer."""
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        msg = f"`{name}` must be an integer; got {value!r} ({type(value).__name__})"
        raise TypeError(msg)
    out = int(value)
    if out < minimum:
        msg = f"`{name}` must be at least {minimum}; got {out}"
        raise ValueError(msg)
    return out


def _choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        msg = f"`{name}` must be one of {list(choices)}; got {value!r}"
        raise ValueError(msg)
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        msg = f"`{name}` must be True or False; got {value!r}"
        raise TypeError(msg)
    return bool(value)


Damping = float | str | tuple[float | str, float | str]


def _damping(value: object) -> Damping | None:
    """``None`` (the method's default), a relative damping ``>= 0`` or ``"svd-llm"``, or a pair."""
    if value is None:
        return None
    if isinstance(value, str):
        return _damping_value(value, "damping")
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim != 0:
        msg = (
            "`damping` must be a number >= 0, 'svd-llm', or a pair (input side, gradient "
            f"side) of them; got an array of shape {tuple(value.shape)}"
        )
        raise ValueError(msg)
    if isinstance(value, Sequence):
        if len(value) != 2:
            msg = (
                "`damping` must be a number >= 0 or a pair (input side, gradient side); "
                f"got a sequence of {len(value)}: {value!r}"
            )
            raise ValueError(msg)
        pair = (_damping_value(value[0], "damping[0]"), _damping_value(value[1], "damping[1]"))
        return pair
    return _damping_value(value, "damping")


def _damping_value(value: object, name: str) -> float | str:
    if isinstance(value, str):
        if value != SVD_LLM:
            msg = f"`{name}` must be a number >= 0 or {SVD_LLM!r}; got {value!r}"
            raise ValueError(msg)
        return value
    out = _scalar(value, name)
    if out < 0:
        msg = f"`{name}` must be >= 0 (relative to the mean diagonal); got {out!r}"
        raise ValueError(msg)
    return out


def _names(value: object, name: str, *, allow_all: bool) -> str | tuple[str, ...] | None:
    """``None``, ``"all-linear"`` (if allowed), a regex, or a list of module names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear":
            if not allow_all:
                msg = f"`{name}` cannot be 'all-linear'; give names or a regex"
                raise ValueError(msg)
            return value
        if len(value) > 1000:
            msg = f"`{name}` regex is {len(value)} characters long; at most 1000 are accepted"
            raise ValueError(msg)
        try:
            re.compile(value)
        except re.error as err:
            msg = f"`{name}` is not a valid regular expression ({err}): {value!r}"
            raise ValueError(msg) from err
        return value
    if isinstance(value, Sequence) and all(isinstance(t, str) and t for t in value):
        if not value:
            msg = f"`{name}` is an empty list; pass None for the default"
            raise ValueError(msg)
        return tuple(value)
    msg = f"`{name}` must be None, a regex or a list of module names; got {value!r}"
    raise TypeError(msg)


def _rank_pattern(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        msg = f"`rank_pattern` must be a dict of layer name -> rank; got {value!r}"
        raise TypeError(msg)
    out = {}
    for key, rank in value.items():
        if not isinstance(key, str) or not key:
            msg = f"`rank_pattern` keys must be layer names; got {key!r}"
            raise TypeError(msg)
        _names(key, "rank_pattern key", allow_all=False)  # a valid regex
        out[key] = _integer(rank, f"rank_pattern[{key!r}]", minimum=1)
    return out  # a copy: the caller's dict can change without changing the config


def _dtype_name(value: object, name: str, choices: Sequence[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    return _choice(value, name, choices)


@dataclass(frozen=True)
class JactusConfig:
    r"""How to compress a model (see :func:`~jactus_linalg.torch.compress`).

    Every field is checked in ``__post_init__``; a bad value raises
    ``TypeError`` or ``ValueError`` naming the field and what was seen.

    Attributes
    ----------
    retain : float in (0, 1]
        Parameters after / parameters before, over the whole model. ``1``
        keeps every layer dense (each with a mergeable core if
        ``dense_cores``).
    method : {"jactus", "kfac", "svd-llm", "svd"}
        ``"svd"``: truncated SVD; ``"svd-llm"``: input whitening only;
        ``"kfac"``: two-sided whitening; ``"jactus"``: two-sided whitening
        plus the union with task directions.
    task_fraction : float in [0, 1]
        :math:`\tau`: the share of each layer's rank spent on task
        directions (``method="jactus"`` only).
    task_directions : {"covariance", "gradient"}
        Where the task directions come from: the top eigenvectors of
        :math:`C_g` and :math:`C_x` (default), or the top singular vectors
        of the whitened mean gradient :math:`\Gamma` (ablation).
    damping : None, float >= 0, "svd-llm", or a pair of them
        Relative damping of the (input, gradient) covariances,
        :math:`\delta = \text{damping}\cdot\operatorname{mean}\operatorname{diag} C`;
        ``"svd-llm"`` is SVD-LLM's own policy (see
        :func:`~jactus_linalg.whiten`). ``None`` uses the method's default
        (SVD-LLM's policy for ``method="svd-llm"``).
    target_modules : None, "all-linear", regex or list of names
        Layers to compress, among those the statistics hold (``None``: all
        of them). Names match a qualified name or its last parts; a regex
        must match a whole qualified name.
    exclude_modules : None, regex or list of names
        Layers dropped from ``target_modules`` (they stay as they are).
    rank_pattern : dict of name -> int
        Fixed ranks for named layers (names match like ``target_modules``);
        the rest of the budget is allocated over the other layers.
    min_rank : int >= 1
        Smallest rank a factored layer gets.
    allocation : {"global", "uniform"}
        Greedy global allocation by gain per parameter, or the same
        parameter fraction in every layer (ablation).
    grad_whitening : bool
        ``False`` drops :math:`C_g` from the factorization (ablation).
    whitening : {"cholesky", "eigh"}
        How covariances are factored (same norm, different cost).
    basis : {"orthonormal", "whitened"}
        How the frozen factors of a factored layer are stored: orthonormal
        (the core trains isometrically) or :math:`A = S_g^{-\top}U`,
        :math:`B = S_x^{-\top}V`.
    dtype : None, "float32" or "float64"
        Decomposition dtype (``None``: the statistics' dtype, float64 on CPU).
    core_dtype : None or a floating dtype name
        Keep the trainable cores in this dtype (e.g. ``"float32"`` on a
        bf16 model); ``None`` keeps the model's dtype.
    dense_cores : bool
        Give every target layer that stays dense a mergeable core
        :math:`y = Wx + b + A\,\Delta C\,B^\top x` (:math:`\Delta C = 0`),
        folded into :math:`W` by :func:`~jactus_linalg.torch.merge`.
    trainable : {"cores", "none"}
        ``"cores"``: the returned model trains only its cores (and
        ``modules_to_save``), as PEFT's ``get_peft_model`` freezes the base;
        ``"none"`` leaves ``requires_grad`` as it was.
    modules_to_save : list of str
        Modules that train in full, such as a new classification head.
    """

    retain: float = 0.8
    method: str = "jactus"
    task_fraction: float = DEFAULT_TASK_FRACTION
    task_directions: str = "covariance"
    damping: Damping | None = None
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    min_rank: int = 1
    allocation: str = "global"
    grad_whitening: bool = True
    whitening: str = "cholesky"
    basis: str = "orthonormal"
    dtype: str | None = None
    core_dtype: str | None = None
    dense_cores: bool = True
    trainable: str = "cores"
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        retain = _scalar(self.retain, "retain")
        if not 0 < retain <= 1:
            msg = (
                f"`retain` must lie in (0, 1] (parameters after / before); got {retain!r}"
            )
            raise ValueError(msg)
        tau = _scalar(self.task_fraction, "task_fraction")
        if not 0 <= tau <= 1:
            msg = f"`task_fraction` must lie in [0, 1]; got {tau!r}"
            raise ValueError(msg)
        save = self.modules_to_save
        save = (save,) if isinstance(save, str) else save
        if not isinstance(save, Sequence) or not all(isinstance(s, str) and s for s in save):
            msg = f"`modules_to_save` must be a list of module names; got {self.modules_to_save!r}"
            raise TypeError(msg)
        values = {
            "retain": retain,
            "method": _choice(self.method, "method", list(METHODS)),
            "task_fraction": tau,
            "damping": _damping(self.damping),
            "target_modules": _names(self.target_modules, "target_modules", allow_all=True),
            "exclude_modules": _names(self.exclude_modules, "exclude_modules", allow_all=False),
            "rank_pattern": _rank_pattern(self.rank_pattern),
            "min_rank": _integer(self.min_rank, "min_rank", minimum=1),
            "grad_whitening": _flag(self.grad_whitening, "grad_whitening"),
            "dtype": _dtype_name(self.dtype, "dtype", _COMPUTE_DTYPES),
            "core_dtype": _dtype_name(self.core_dtype, "core_dtype", _CORE_DTYPES),
            "dense_cores": _flag(self.dense_cores, "dense_cores"),
            "modules_to_save": tuple(save),
            **{key: _choice(getattr(self, key), key, options) for key, options in _CHOICES.items()},
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **fields: Any) -> JactusConfig:
        """A copy with ``fields`` changed (validated again)."""
        check_field_names(fields)
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JactusConfig:
        """The config :meth:`to_dict` wrote (lists become tuples; every field validated)."""
        if not isinstance(data, Mapping):
            msg = f"a JactusConfig record must be a JSON object; got {type(data).__name__}"
            raise ValueError(msg)
        check_field_names(data)
        return cls(**data)


def check_field_names(fields: Mapping[str, Any]) -> None:
    """Refuse names that are not :class:`JactusConfig` fields, saying what exists."""
    known = {f.name for f in dataclasses.fields(JactusConfig)}
    for key in fields:
        if key in _REMOVED:
            raise TypeError(_REMOVED[key])
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        msg = f"unknown JactusConfig field(s) {unknown}; the fields are {sorted(known)}"
        raise TypeError(msg)
