r"""Mergeable cores: layers kept dense adapt too, and fold back into their weight.

A target layer whose allocation reaches its break-even rank stays dense (a
factored form would hold as many numbers and lose information). It still
gets a trainable core in its union subspace:

.. math::

    y = W x + b + A\,\Delta C\,B^\top x ,

with :math:`A` (m x a) and :math:`B` (n x b) orthonormal bases of the
layer's union subspaces at its break-even rank (frozen) and :math:`\Delta C`
(a x b) trainable, zero at the start, so the layer starts exactly at the
dense output. Because :math:`A` and :math:`B` have orthonormal columns, a
step on :math:`\Delta C` moves the weight by exactly as much (an isometry),
like the cores of the factored layers.

After tuning, :func:`merge` folds :math:`A\,\Delta C\,B^\top` into
:math:`W` and puts back a plain ``nn.Linear``: the deployed model holds no
extra numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MergeableLinear", "has_unmerged_cores", "merge", "merged_state_dict"]


class MergeableLinear(nn.Linear):
    r"""``nn.Linear`` plus a trainable core in a frozen subspace: :math:`Wx + b + A\,\Delta C\,B^\top x`.

    Built by :meth:`from_linear`, which reuses the dense layer's own
    ``weight`` and ``bias`` parameters (no copy). The extra pieces are plain
    ``nn.Linear`` maps, as in :class:`~jactus_linalg.torch.JactusLinear`:

    * ``right_proj``: ``n -> b``, weight :math:`B^\top` (frozen);
    * ``core``: ``b -> a``, weight :math:`\Delta C` (trainable, zero at start);
    * ``left_proj``: ``a -> m``, weight :math:`A` (frozen, no bias).
    """

    right_proj: nn.Linear
    core: nn.Linear
    left_proj: nn.Linear

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, left: torch.Tensor, right: torch.Tensor
    ) -> MergeableLinear:
        """Wrap ``linear`` (m x n) with bases ``left`` (m x a) and ``right`` (n x b).

        Raises
        ------
        ValueError
            If the bases do not fit the layer, or are not finite.
        """
        m, n = linear.out_features, linear.in_features
        if left.ndim != 2 or right.ndim != 2 or left.shape[0] != m or right.shape[0] != n:
            msg = (
                f"`left` must be ({m}, a) and `right` ({n}, b) for a {m}x{n} layer; got "
                f"{tuple(left.shape)} and {tuple(right.shape)}"
            )
            raise ValueError(msg)
        for label, basis in (("left", left), ("right", right)):
            if not bool(torch.isfinite(basis).all()):
                msg = f"`{label}` basis contains non-finite values (NaN or Inf)"
                raise ValueError(msg)
        layer = cls(n, m, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        weight = linear.weight
        kw = {"device": weight.device, "dtype": weight.dtype}
        a, b = int(left.shape[1]), int(right.shape[1])
        layer.right_proj = nn.Linear(n, b, bias=False, **kw)
        layer.core = nn.Linear(b, a, bias=False, **kw)
        layer.left_proj = nn.Linear(a, m, bias=False, **kw)
        with torch.no_grad():
            layer.right_proj.weight.copy_(right.T)
            layer.left_proj.weight.copy_(left)
            layer.core.weight.zero_()
        layer.right_proj.weight.requires_grad_(False)
        layer.left_proj.weight.requires_grad_(False)
        return layer

    @property
    def rank(self) -> tuple[int, int]:
        """``(a, b)``: the core's shape."""
        return self.core.out_features, self.core.in_features

    def delta_weight(self) -> torch.Tensor:
        r""":math:`A\,\Delta C\,B^\top` (m x n), computed in at least float32."""
        work = torch.promote_types(self.core.weight.dtype, torch.float32)
        left = self.left_proj.weight.to(work)
        right_t = self.right_proj.weight.to(work)
        return left @ self.core.weight.to(work) @ right_t

    def merged(self) -> nn.Linear:
        r"""A plain ``nn.Linear`` with weight :math:`W + A\,\Delta C\,B^\top` (rounded once)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            delta = self.delta_weight()
            weight = (self.weight.to(delta.dtype) + delta).to(self.weight.dtype)
        out.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        out.bias = self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        # the core may be kept in float32 on a half-precision model
        # (mark_trainable(core_dtype=...)); the casts are no-ops otherwise
        h = self.right_proj(x)
        h = self.core(h.to(self.core.weight.dtype))
        return y + self.left_proj(h.to(self.left_proj.weight.dtype))

    def extra_repr(self) -> str:
        a, b = self.rank
        return f"{super().extra_repr()}, mergeable core={a}x{b}"


def has_unmerged_cores(model: nn.Module) -> list[str]:
    """Names of the :class:`MergeableLinear` layers in ``model``."""
    return [name for name, mod in model.named_modules() if isinstance(mod, MergeableLinear)]


def merge(model: nn.Module) -> nn.Module:
    r"""Fold every mergeable core into its weight, in place; return ``model``.

    Each :class:`MergeableLinear` becomes a plain ``nn.Linear`` with weight
    :math:`W + A\,\Delta C\,B^\top` (computed in at least float32, rounded
    to the weight's dtype once) and the same bias. Factored layers
    (:class:`~jactus_linalg.torch.JactusLinear`) are already deployable and
    stay as they are. The result is an ordinary model that
    :func:`~jactus_linalg.torch.save_compressed` writes, and that runs
    without this package's layers where nothing was factored.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    nn.Module
        ``model`` itself, merged.
    """
    if not isinstance(model, nn.Module):
        msg = f"`model` must be a torch nn.Module; got {type(model).__name__}"
        raise TypeError(msg)
    for name in has_unmerged_cores(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).merged())
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as :func:`merge` would leave it, without changing ``model``."""
    state = dict(model.state_dict())
    for name in has_unmerged_cores(model):
        mod = model.get_submodule(name)
        assert isinstance(mod, MergeableLinear)
        prefix = f"{name}." if name else ""
        for part in ("left_proj", "core", "right_proj"):
            del state[f"{prefix}{part}.weight"]
        state[f"{prefix}weight"] = mod.merged().weight.detach()
    return state
