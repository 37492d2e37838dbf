"""An invertible transform ``T`` (plus an optional shift ``δ``) between a producer and the linears that read it.

The producer's output ``X`` becomes ``(X - δ) T⁻¹`` and every consumer weight ``W`` becomes ``W Tᵀ`` (its bias
absorbs ``W δ``), so the product is unchanged: ``(X - δ) T⁻¹ (W Tᵀ)ᵀ + b + W δ = X Wᵀ + b``. Quantizing the
transformed ``X`` and ``W`` is what the methods optimise.

``T`` is either a diagonal (SmoothQuant / OmniQuant's LET scales) or block-diagonal matrices (AffineQuant), one
``block × block`` matrix per head for per-head pairs or one full matrix for norm pairs. Both are learnt in
relative units: ``T = diag(s) (I + M ⊙ B)`` with ``s = exp(log_s)`` and ``B`` the off-diagonal part, starting at 0,
weighted by the gradual mask ``M`` (sf inside the opening band). The reference learns ``s`` and ``A = diag(s) + …``
in absolute units with one learning rate, so a channel with a small initial scale (SmolLM2 has many below 0.1)
takes huge relative steps and can cross zero; here a step is the same relative change for every channel, ``s``
stays positive, and row ``i`` is strictly diagonally dominant exactly when ``Σ_j |M_ij B_ij| < 1``. Inverses are
computed in float64, where float32 loses digits on ill-conditioned matrices. Consumers that read several copies
of each block (the query heads of grouped-query attention reading one KV head) take the matching block for each
copy (``group``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.transforms.mask import band_width, gradual_mask

log = logging.getLogger(__name__)
SCALE_MIN = 1e-5


class PairTransform(nn.Module):
    """Learnable ``T`` (diagonal or block-diagonal) and optional shift ``δ`` over ``dim`` producer features."""

    def __init__(
        self,
        init_scale: torch.Tensor,
        block: int | None = None,
        use_matrix: bool = False,
        shift: torch.Tensor | None = None,
        sf: float = 1e-2,
    ) -> None:
        """``block``: size of the per-head blocks (None: the whole width is one block); ``use_matrix``: learn
        block matrices rather than a diagonal."""
        super().__init__()
        dim = init_scale.numel()
        block = block or dim
        if dim % block:
            raise ValueError(f"block {block} does not divide the width {dim}")
        self.dim, self.block, self.sf = dim, block, sf
        self.log_scale = nn.Parameter(init_scale.detach().float().clamp(min=SCALE_MIN).log())
        if use_matrix:
            self.offdiag = nn.Parameter(torch.zeros(dim // block, block, block, device=init_scale.device))
            self.register_buffer("mask", torch.eye(block, device=init_scale.device), persistent=False)
        else:
            self.offdiag = None
        self.shift = nn.Parameter(shift.clone().float()) if shift is not None else None

    @property
    def is_diagonal(self) -> bool:
        return self.offdiag is None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Open the gradual mask's band for this epoch (matrices only)."""
        if self.offdiag is not None:
            width = band_width(epoch, epochs, self.block)
            # in place: a captured CUDA graph keeps reading this buffer's memory
            self.mask.copy_(gradual_mask(self.block, width, self.sf, device=self.offdiag.device))

    # ---------------------------------------------------------------------------------------------- values

    def diag(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(min=SCALE_MIN)  # the floor keeps 1/s finite after any step

    def _relative(self) -> torch.Tensor:
        """``I + M ⊙ B`` with the mask's diagonal removed: unit diagonal, masked off-diagonals."""
        eye = torch.eye(self.block, device=self.offdiag.device)
        return eye + (self.mask - eye) * self.offdiag

    def effective(self) -> torch.Tensor:
        """The block matrices actually applied, ``diag(s) (I + M ⊙ B)``: shape (blocks, block, block)."""
        return self.diag().view(-1, self.block, 1) * self._relative()

    def inverse(self) -> torch.Tensor:
        """``T⁻¹`` as (blocks, block, block); a diagonal ``T`` as ``dim`` blocks of 1 × 1."""
        if self.offdiag is None:
            return (1.0 / self.diag()).view(-1, 1, 1)
        t = self.effective()
        # inv_ex: no error check, hence no host sync (the dominance check guarantees invertibility)
        return torch.linalg.inv_ex(t.double())[0].to(t.dtype)

    def _offdiag_sums(self) -> torch.Tensor:
        rel = self._relative().detach().abs()
        return rel.sum(-1) - 1.0

    def dominance_margin(self) -> torch.Tensor:
        """Smallest row margin ``(|T_ii| - Σ_{j≠i} |T_ij|) / |T_ii|``; > 0 means strictly diagonally dominant."""
        if self.offdiag is None:
            return torch.ones((), device=self.log_scale.device)
        return (1.0 - self._offdiag_sums()).min()

    @torch.no_grad()
    def restore_dominance(self, target: float = 0.05) -> int:
        """Shrink off-diagonal entries of rows that lost dominance until their margin is ``target``; returns
        how many rows were repaired (0 if none needed it)."""
        if self.offdiag is None:
            return 0
        off = self._offdiag_sums()
        bad = (1.0 - off) <= target
        if not bad.any():
            return 0
        factor = torch.where(bad, (1 - target) / off.clamp(min=1e-12), torch.ones_like(off))
        self.offdiag.mul_(factor.unsqueeze(-1))
        return int(bad.sum())

    # ---------------------------------------------------------------------------------------- application

    def _shift_expanded(self, group: int) -> torch.Tensor | None:
        if self.shift is None:
            return None
        return self.shift.view(-1, self.block).repeat_interleave(group, 0).reshape(-1) if group > 1 else self.shift

    def apply_to_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - δ) T⁻¹`` along the last dimension: what a producer that cannot absorb ``T`` emits (online op)."""
        if self.shift is not None:
            x = x - self.shift.to(x.dtype)
        if self.offdiag is None:
            return x / self.diag().to(x.dtype)
        inv = self.inverse().to(x.dtype)
        shape = x.shape
        x = x.reshape(*shape[:-1], -1, self.block)
        return torch.einsum("...ni,nij->...nj", x, inv).reshape(shape)

    def consumer(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int = 1):
        """``W Tᵀ`` and ``b + W δ`` for a consumer reading ``group`` copies of each block."""
        new_bias = bias
        shift = self._shift_expanded(group)
        if shift is not None:
            new_bias = (0 if bias is None else bias) + weight @ shift.to(weight.dtype)
        if self.offdiag is None:
            scale = self.diag()
            scale = scale.view(-1, self.block).repeat_interleave(group, 0).reshape(-1) if group > 1 else scale
            return weight * scale.to(weight.dtype), new_bias
        t = self.effective().to(weight.dtype).repeat_interleave(group, 0)
        out = weight.shape[0]
        w = torch.einsum("onb,nkb->onk", weight.reshape(out, t.shape[0], self.block), t)
        return w.reshape(out, -1), new_bias

    def producer_linear(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """Weights of a linear producer so that it emits ``(X - δ) T⁻¹`` directly (v_proj for v→o)."""
        if self.shift is not None and bias is None:
            raise ValueError("a shift needs a producer bias to absorb it")
        if self.offdiag is None:
            scale = self.diag().to(weight.dtype)
            new_bias = None if bias is None else (bias - (self.shift if self.shift is not None else 0)) / scale
            return weight / scale[:, None], new_bias
        inv = self.inverse().to(weight.dtype)
        n = inv.shape[0]
        w = torch.einsum("nij,nia->nja", inv, weight.reshape(n, self.block, -1)).reshape(weight.shape)
        new_bias = None
        if bias is not None:
            b = bias - (self.shift if self.shift is not None else 0)
            new_bias = torch.einsum("ni,nij->nj", b.reshape(n, self.block), inv).reshape(-1)
        return w, new_bias

    def producer_norm(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """Norm affine parameters that emit ``(X - δ) / s``; only a diagonal ``T`` can be folded into a norm."""
        if self.offdiag is not None:
            raise ValueError("a full matrix cannot be folded into a norm's elementwise weight")
        scale = self.diag().to(weight.dtype)
        if self.shift is not None and bias is None:
            raise ValueError("a shift needs a norm bias to absorb it")
        new_bias = None if bias is None else (bias - (self.shift if self.shift is not None else 0)) / scale
        return weight / scale, new_bias
