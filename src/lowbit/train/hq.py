"""Hadamard quantizer (HQ) for the forward matmul, with LSQ learnable steps.

The forward of a converted layer is ``Y = Q(X T) Q(W T)^T`` with ``T`` the block Hadamard (orthogonal, so
without rounding this is ``X W^T``). ``Q`` is symmetric INT-b on ``[-2^(b-1), 2^(b-1)-1]``:
``q = round(clamp(v, qmin, qmax))``, ``v = x / s``, with ``s`` a learnable LSQ step (Esser et al.): the input
gradient passes straight through inside the range and is zero outside; the step gets
``sum(g * (round(v) - v))`` inside and ``sum(g * qmin|qmax)`` outside, times ``1/sqrt(numel * qmax)``.
Per-token activations (an option) use the shared dynamic absmax quantizer (nothing learned, no clipping).

The integer part of that math lives here as plain functions; ``linear.py`` wires them into autograd. On the
Triton backend (``lowbit.kernels.dispatch.backend_for``) the rotation and the rotate-then-quantize run as fused
kernels (``lowbit.kernels.quantize``) that equal these references bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lowbit.kernels.dispatch import backend_for
from lowbit.quant.hadamard import hadamard_transform, inverse_hadamard_transform
from lowbit.quant.quantizer import QuantSpec, quantize


class Rotation(NamedTuple):
    """How a layer's reduction dimension is rotated: block 0 means no Hadamard; ``pad`` zero columns added."""

    block: int
    pad: int
    signs: torch.Tensor | None

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the fused kernel takes this tensor (2-D float32 on the Triton backend, block up to 256)."""
        return x.dim() == 2 and x.dtype == torch.float32 and self.block <= 256 and backend_for(x) == "triton"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused(x):
            from lowbit.kernels.quantize import hadamard_rotate

            return hadamard_rotate(x, self.block, self.signs, self.pad)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        return hadamard_transform(x, self.block, self.signs) if self.block else x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.fused(y):
            from lowbit.kernels.quantize import hadamard_rotate

            return hadamard_rotate(y, self.block, self.signs, self.pad, inverse=True)
        x = inverse_hadamard_transform(y, self.block, self.signs) if self.block else y
        return x[..., : x.shape[-1] - self.pad] if self.pad else x


def lsq_init(v: torch.Tensor, qmax: int, dim: int | None = None) -> torch.Tensor:
    """Initial step, per tensor or per row (``dim=-1``): LSQ's ``2 mean|v| / sqrt(qmax)`` up to 4 bits (the paper).

    Above 4 bits that rule spans about +-18 sigma of a Gaussian and wastes most of the grid, so wider grids
    start from ``absmax / qmax`` (nothing clipped).
    """
    if qmax > 7:
        amax = v.abs().amax() if dim is None else v.abs().amax(dim=dim)
        return (amax / qmax).clamp_min(1e-8)
    mean_abs = v.abs().mean() if dim is None else v.abs().mean(dim=dim)
    return (2 * mean_abs / math.sqrt(qmax)).clamp_min(1e-8)


MSE_POINTS, MSE_OCTAVES = 80, 10  # candidate clipping points, geometric from absmax / 2^10 up to absmax
MSE_SAMPLE = 1 << 20  # about the elements a per-tensor search looks at (whole rows, an even stride through them)


def mse_init(v: torch.Tensor, qmin: int, qmax: int, dim: int | None = None) -> torch.Tensor:
    """Initial step minimising the rounding error ``||step * round(clamp(v / step)) - v||^2``, per tensor or row.

    LSQ's rule assumes a bell-shaped ``v``; trained encoders have outlier channels, and there it clips far too
    much (INT8) or too little (INT4): on MiniLM's SST-2 batches the encoder's hidden-state error at
    initialisation drops from 0.51 to 0.32 (HQ INT4, block 32) and from 0.18 to 0.045 (INT8). A plain search
    over clipping points ``absmax * 2^(-MSE_OCTAVES * k / MSE_POINTS)``; learning then starts from there.
    """
    v = v.float()
    if dim is None:  # absmax of the whole tensor; the error of every MSE_SAMPLE-th element's worth of whole rows
        amax = v.abs().amax().clamp_min(1e-8).reshape(1, 1)
        rows = v.reshape(-1, v.shape[-1]) if v.dim() > 1 else v.reshape(1, -1)
        v = rows[:: max(1, rows.numel() // MSE_SAMPLE)].reshape(1, -1)  # whole rows: every channel is seen
    else:
        amax = v.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)  # (rows, 1)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / (qmax + 0.5)
    for k in range(MSE_POINTS + 1):  # absmax at qmax + 0.5, the top level's rounding edge, never on the clip point
        step = amax * 2.0 ** (-MSE_OCTAVES * k / MSE_POINTS) / (qmax + 0.5)
        err = (torch.round((v / step).clamp(qmin, qmax)) * step - v).square().sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, step, best)
    return best.reshape(()) if dim is None else best.reshape(-1)


def initial_step(v: torch.Tensor, qmin: int, qmax: int, rule: str, dim: int | None = None) -> torch.Tensor:
    """The first-batch step by ``rule``: ``mse`` (least rounding error) or ``lsq`` (the LSQ paper's)."""
    return mse_init(v, qmin, qmax, dim) if rule == "mse" else lsq_init(v, qmax, dim)


class Quantized(NamedTuple):
    """An operand on the integer grid: ``q`` (float32 integers), its step(s) and the pre-rounding ``v = x/s``."""

    q: torch.Tensor
    step: torch.Tensor  # 0-dim (tensor) or (rows, 1)
    v: torch.Tensor | None  # None when nothing is learned (per-token dynamic)


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> Quantized:
    """``q = round(clamp(x / step))`` with ``step`` 0-dim or one per row of ``x``."""
    s = step.float().reshape(-1, 1) if step.numel() > 1 else step.float().reshape(())
    v = x / s
    return Quantized(torch.round(v.clamp(qmin, qmax)), s, v)


def dynamic_token_quantize(x: torch.Tensor, bits: int) -> Quantized:
    """Per-row absmax symmetric quantization through the shared quantizer (no clipping, no learned step)."""
    qt = quantize(x, QuantSpec(bits=bits, symmetric=True, granularity="token"))
    return Quantized(qt.q.reshape(x.shape), qt.scale.reshape(-1, 1), None)


def rotate_quantize(x: torch.Tensor, rot: Rotation, step: torch.Tensor | None, bits: int,
                    operand_dtype: torch.dtype = torch.int8) -> Quantized:
    """``lsq_quantize(rot.apply(x.float()), step)`` (or ``dynamic_token_quantize`` when ``step`` is None).

    On the Triton backend one fused pass that writes ``q`` directly as the GEMM's ``operand_dtype``; otherwise
    the reference composition (``q`` float32).
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if x.dim() == 2 and rot.block <= 256 and backend_for(x) == "triton":
        from lowbit.kernels.quantize import rotate_quantize as fused

        op = fused(x, rot.block, step, qmin, qmax, rot.signs, rot.pad, out_dtype=operand_dtype)
        return Quantized(op.q, op.step, op.v)
    xh = rot.apply(x.float())
    return dynamic_token_quantize(xh, bits) if step is None else lsq_quantize(xh, step, qmin, qmax)


def lsq_backward(
    grad: torch.Tensor, op: Quantized, qmin: int, qmax: int, numel: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``step * q`` w.r.t. the unquantized operand and the step, given ``grad`` w.r.t. ``step * q``.

    ``numel`` fixes the element count in a per-tensor step's gradient scale (LSQ uses the current tensor's);
    a constant count makes the step gradient a plain sum over tokens, so gradient accumulation over
    micro-batches equals one big batch.
    """
    if op.v is None:  # dynamic absmax: straight through everywhere, no step to learn
        return grad, None
    v = op.v
    inside = (v >= qmin) & (v <= qmax)
    grad_x = grad * inside
    dstep = torch.where(inside, torch.round(v) - v, v.clamp(qmin, qmax))
    if op.step.dim() == 0:
        scale = 1.0 / math.sqrt((numel or v.numel()) * qmax)
        grad_step = (grad * dstep).sum() * scale
    else:
        scale = 1.0 / math.sqrt(v.shape[-1] * qmax)
        grad_step = (grad * dstep).sum(dim=-1) * scale
    return grad_x, grad_step


def forward_error(x: torch.Tensor, w: torch.Tensor, rot: Rotation, bits: int, token: bool) -> torch.Tensor:
    """Relative squared error of the quantized product ``Q(xT) Q(wT)^T`` against ``x w^T`` at LSQ-init steps.

    What ``block_size="auto"`` minimises, and what conversion tests bound.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    xh, wh = rot.apply(x.float()), rot.apply(w.float())
    qx = dynamic_token_quantize(xh, bits) if token else lsq_quantize(xh, lsq_init(xh, qmax), qmin, qmax)
    qw = lsq_quantize(wh, lsq_init(wh, qmax), qmin, qmax)
    approx = (qx.q * qx.step) @ (qw.q * qw.step).T
    exact = x.float() @ w.float().T
    return ((approx - exact).pow(2).sum() / exact.pow(2).sum().clamp_min(1e-30)).reshape(())
