"""``JactusLinear``: a linear layer stored as frozen factors around a trainable core.

:math:`y = A\\,C\\,B^\\top x + b`, computed as three small linear maps
``left_proj(core(right_proj(x)))``:

* ``right_proj``: ``n -> b`` with weight :math:`B^\\top` (frozen);
* ``core``: ``b -> a`` with weight :math:`C` (trainable);
* ``left_proj``: ``a -> m`` with weight :math:`A` and the original bias
  (frozen).

Each piece is a plain ``nn.Linear``, so PEFT can put LoRA adapters on the
frozen factors for compress-then-finetune baselines. It stores
:math:`am + bn + ab` numbers (plus the bias) instead of :math:`mn`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["JactusLinear"]


class JactusLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding ``left @ core @ right.T``.

    Parameters
    ----------
    in_features, out_features : int
        ``n`` and ``m`` of the original layer.
    left_rank, right_rank : int
        ``a`` and ``b``: columns of ``left`` and ``right``.
    bias : bool
        Keep a bias (the original one is copied by :meth:`from_factors`).
    device, dtype : optional
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        left_rank: int,
        right_rank: int,
        *,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.right_proj = nn.Linear(in_features, right_rank, bias=False, **kw)
        self.core = nn.Linear(right_rank, left_rank, bias=False, **kw)
        self.left_proj = nn.Linear(left_rank, out_features, bias=bias, **kw)
        self.right_proj.weight.requires_grad_(False)
        self.left_proj.weight.requires_grad_(False)
        if self.left_proj.bias is not None:
            self.left_proj.bias.requires_grad_(False)

    @classmethod
    def from_factors(
        cls,
        left: torch.Tensor,
        core: torch.Tensor,
        right: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> JactusLinear:
        """Build from ``left`` (m x a), ``core`` (a x b), ``right`` (n x b) and a bias (m,).

        Raises
        ------
        ValueError
            If the factor shapes do not chain or ``bias`` is not of shape ``(m,)``.
        """
        (m, a), (a2, b), (n, b2) = left.shape, core.shape, right.shape
        if a != a2 or b != b2:
            msg = (
                f"factor shapes do not chain: left {tuple(left.shape)}, core "
                f"{tuple(core.shape)}, right {tuple(right.shape)}"
            )
            raise ValueError(msg)
        if bias is not None and tuple(bias.shape) != (m,):
            msg = (
                f"`bias` must have shape ({m},), one entry per output (the rows of `left`); "
                f"got {tuple(bias.shape)}"
            )
            raise ValueError(msg)
        layer = cls(n, m, a, b, bias=bias is not None, device=core.device, dtype=core.dtype)
        with torch.no_grad():
            layer.left_proj.weight.copy_(left)
            layer.core.weight.copy_(core)
            layer.right_proj.weight.copy_(right.T)
            if bias is not None:
                layer.left_proj.bias.copy_(bias)
        return layer

    @property
    def rank(self) -> tuple[int, int]:
        """``(a, b)``: the core's shape."""
        return self.core.out_features, self.core.in_features

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``A C Bᵀ`` (computed on demand; for inspection, not used in ``forward``)."""
        return self.left_proj.weight @ self.core.weight @ self.right_proj.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.left_proj.bias

    def dense(self) -> nn.Linear:
        r"""A plain ``nn.Linear`` with weight :math:`A\,C\,B^\top` and this layer's bias.

        The product is formed in at least float32 (a float32 core between
        half-precision factors included) and rounded to the factors' dtype
        once; this layer is left as it is. The result stores :math:`mn`
        numbers: it is for tools that read only standard ``nn.Linear``
        checkpoints (``jactus merge`` writes such a model).
        """
        dtype = self.left_proj.weight.dtype
        work = torch.promote_types(torch.promote_types(dtype, self.core.weight.dtype), torch.float32)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.core.weight.device, dtype=dtype)
        with torch.no_grad():
            product = self.left_proj.weight.to(work) @ self.core.weight.to(work) @ self.right_proj.weight.to(work)
            out.weight.copy_(product.to(dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def n_params(self) -> int:
        """Stored numbers: ``am + bn + ab`` plus the bias."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the core may be kept in float32 while the frozen factors are half precision
        # (see mark_trainable(core_dtype=...)); the casts are no-ops otherwise
        h = self.right_proj(x)
        h = self.core(h.to(self.core.weight.dtype))
        return self.left_proj(h.to(self.left_proj.weight.dtype))

    def extra_repr(self) -> str:
        a, b = self.rank
        return f"in_features={self.in_features}, out_features={self.out_features}, core={a}x{b}"
