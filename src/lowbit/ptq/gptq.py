"""GPTQ (Frantar et al., 2022): round a linear's weight column by column onto a *fixed* grid, pushing each column's
rounding error onto the columns not yet rounded through the inverse Hessian of the layer's inputs.

Round-to-nearest minimises ``|W - Q|`` element by element; what matters is the layer's output ``X Wᵀ``. GPTQ
minimises ``tr((W - Q) H (W - Q)ᵀ)`` with ``H = XᵀX / n`` greedily: after rounding column ``i`` the remaining
columns absorb ``err · H⁻¹[i, i:] / H⁻¹[i, i]``, which is the optimal correction given the columns already fixed.

The grid is chosen *before* rounding and never changes (scale and zero per output row and group, as
``lowbit.quant.quantizer.quantize`` computes them from the original weight and an optional clipping pair:
the learnt LWC factors after a calibrating method, or a small MSE clip search for GPTQ alone). This is the
reference's ``static_groups`` behaviour; it makes act-order a plain column permutation (each column keeps its own
group's scale), and the result is exactly on the grid the calibration learnt, so the packers find its codes.

Numerics: the Hessian, its Cholesky factors and the error propagation run in float64 (the engine keeps TF32
matmuls on while calibrating, and a 1,536-wide Hessian loses digits in float32); each column is snapped to the
grid in float32 with exactly the quantizer's operations, so the codes match what ``quantize`` would return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lowbit.quant.quantizer import QuantSpec, quantize

log = logging.getLogger(__name__)
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4  # the GPTQ reference's clip search (its ``mse=True`` defaults)


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ rounds: damping as a fraction of the mean Hessian diagonal, lazy-update block width, act-order
    (columns in decreasing Hessian diagonal), and the grid used where no learnt clipping exists."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    grid: str = "minmax"


@dataclass(frozen=True)
class Grid:
    """Per-column scale and zero point of one weight, shape (out, in): column ``j`` carries its group's values."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    qmin: int
    qmax: int

    @classmethod
    def of(cls, weight: torch.Tensor, spec: QuantSpec,
           clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> Grid:
        """The grid ``quantize(weight, spec, clip)`` rounds onto, spread over the columns."""
        out, width = weight.shape
        qt = quantize(weight.detach(), spec, clip=clip)
        group = spec.group_size if spec.granularity == "group" else width
        spread = lambda t: t.reshape(out, width // group).repeat_interleave(group, dim=1)  # noqa: E731
        return cls(spread(qt.scale), None if qt.zero is None else spread(qt.zero), spec.qmin, spec.qmax)

    def snap(self, w: torch.Tensor, cols: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """Round ``w`` (the columns ``cols`` of the weight) to the nearest grid point, in float32, exactly as
        ``quantize`` then ``dequantize`` do."""
        scale = self.scale[:, cols]
        w = w.float()
        if w.dim() == 1:
            scale = scale.squeeze(1)
        q = (w / scale).round()
        if self.zero is None:
            return q.clamp(self.qmin, self.qmax) * scale
        zero = self.zero[:, cols].reshape(scale.shape)
        return (q + zero).clamp(self.qmin, self.qmax).sub(zero).mul(scale)

    def permuted(self, perm: torch.Tensor) -> Grid:
        return Grid(self.scale[:, perm], None if self.zero is None else self.zero[:, perm], self.qmin, self.qmax)


@torch.no_grad()
def mse_clip(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row/group shrink factor of the min-max range minimising ``Σ|RTN(w) - w|^2.4`` (GPTQ's ``mse`` grid),
    as a clipping pair for ``quantize``. Deterministic: a fixed ladder of factors from 1 down to 0.21."""
    w = weight.detach().float()
    best_err, best = None, None
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1.0 - i / MSE_GRID
        factor = torch.full((1,), p, device=w.device)
        qt = quantize(w, spec, clip=(factor, factor))
        rows = qt.q.shape[0]
        err = (qt.dequantize() - w.reshape(rows, -1)).abs().pow(MSE_NORM).sum(-1)
        if best is None:
            best_err, best = err, torch.full_like(err, p)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, p), best)
    return best, best


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error ``tr(D H Dᵀ) / out`` with ``D = W - Q`` and ``H = XᵀX / tokens``: the squared
    error of ``X Wᵀ`` per token and output channel."""
    d = (weight.double() - rounded.double())
    return float(((d @ hessian.double()) * d).sum() / weight.shape[0])


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = damp · mean diag H``; the damping grows tenfold (up to
    three times) if ``H`` is still not positive definite (too few tokens for a wide layer)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h + damp * 10**attempt * mean_diag * eye)
        if int(info) == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g of its mean diagonal", damp * 10**attempt)
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise RuntimeError(f"GPTQ: the layer-input Hessian is not positive definite even with damping {damp * 1000:.3g} "
                       "of its mean diagonal")


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, options: GPTQOptions = GPTQOptions()) -> torch.Tensor:
    """``weight`` (out, in) rounded onto ``grid`` by GPTQ with ``hessian`` (in, in); float32, same device.

    Input channels the calibration never saw (zero Hessian diagonal) are rounded to nearest and pass no error on;
    unlike the reference their weights are kept, not zeroed, since a later input may use them.
    """
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    perm = None
    if options.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)  # ties (dead channels) alike everywhere
        w, h, grid = w[:, perm], h[perm][:, perm], grid.permuted(perm)
    hinv = _inverse_cholesky(h, options.damp)
    columns = w.shape[1]
    q = torch.zeros_like(w, dtype=torch.float32)
    for i1 in range(0, columns, options.block_size):
        i2 = min(i1 + options.block_size, columns)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = grid.snap(w1[:, i], slice(i1 + i, i1 + i + 1))
            q[:, i1 + i] = col
            e = (w1[:, i] - col.double()) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q
