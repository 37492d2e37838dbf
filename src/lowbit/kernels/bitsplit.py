"""Fused bit splitting of an output gradient into the stacked ``[hi; lo]`` INT4 rows, with their squared norms.

``split_rows(g, noise)`` computes, in one pass over ``g`` (N x C, any float dtype), what
``lowbit.train.sampling.bit_split`` + ``BitSplit.stacked`` + ``rows.norm(dim=1)`` compute in several:
``t = clamp(g s, -98, 98)``, ``hi = round(t / 14)``, ``lo = floor(t - 14 hi + u)`` (stochastic rounding with the
caller's uniform ``noise``), both clamped to ``[-7, 7]``, written as rows ``0..N-1`` and ``N..2N-1`` of one
2N x C operand (float32, int8 or float8 e4m3), plus each row's sum of squares (an exact integer in float32,
whatever the summation order; its ``sqrt`` is the row norm leverage-score sampling weighs rows by).

The noise is a tensor drawn by the caller (``torch.rand(g.shape, generator=...)``, as the reference draws it), so
the kernel and the reference consume identical random numbers and can be compared exactly. The scale is computed
on the device without a host sync (the reference's ``isfinite`` branch becomes a ``where``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SPLIT_BASE = 14.0
SPLIT_RANGE = 98.0
OUT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float32)


class SplitRows(NamedTuple):
    """The 2N x C rows ``[hi; lo]``, each row's sum of squares (2N,), and the 0-dim scale ``s``."""

    rows: torch.Tensor
    sq_norms: torch.Tensor
    scale: torch.Tensor


def split_scale(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, gain)`` on the device: ``scale = 98 / max|g|`` (1 for a zero or denormal-tiny gradient) and the
    factor ``g`` is multiplied by (``scale``, or 0 where the reference zeroes a gradient whose scale overflows)."""
    amax = g.abs().amax().float() if g.numel() else torch.zeros((), device=g.device)
    raw = SPLIT_RANGE / amax.clamp_min(torch.finfo(torch.float32).tiny)
    finite = torch.isfinite(raw)
    one = torch.ones_like(amax)
    scale = torch.where((amax > 0) & finite, raw, one)
    gain = torch.where(amax > 0, torch.where(finite, raw, torch.zeros_like(raw)), one)
    return scale, gain


def split_rows_reference(g: torch.Tensor, noise: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> SplitRows:
    """The unfused math of ``sampling.bit_split`` with the noise given (same operations, same order)."""
    scale, gain = split_scale(g)
    t = (g.float() * gain).clamp(-SPLIT_RANGE, SPLIT_RANGE)
    hi = torch.round(t / t.new_full((), SPLIT_BASE)).clamp(-7, 7)  # a tensor divisor: a true division on CUDA
    lo = torch.floor((t - SPLIT_BASE * hi) + noise.float()).clamp(-7, 7)
    rows = torch.cat([hi, lo], 0) + 0.0  # canonical +0, as the kernel's rounding writes it
    return SplitRows(rows.to(out_dtype), rows.pow(2).sum(dim=1), scale)


if triton is not None:

    # tl.reduce with triton's own combine function instead of tl.sum: the interpreter maps it to numpy, and
    # it still works when triton was imported before TRITON_INTERPRET was set (tl.sum then does not).
    _SUM = tl.standard._sum_combine

    @triton.jit
    def _split_kernel(g_ptr, u_ptr, gain_ptr, rows_ptr, sq_ptr, N, C, stride_g, stride_u, stride_r,
                      BM: tl.constexpr, BC: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        gain = tl.load(gain_ptr)
        sq_hi = tl.full((BM,), 0.0, tl.float32)
        sq_lo = tl.full((BM,), 0.0, tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            mask = (rows[:, None] < N) & (cols[None, :] < C)
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = tl.minimum(tl.maximum(g * gain, -98.0), 98.0)
            hi = (tl.math.div_rn(t, 14.0) + 12582912.0) - 12582912.0  # round half to even
            hi = tl.minimum(tl.maximum(hi, -7.0), 7.0)
            lo = tl.floor((t - 14.0 * hi) + u)
            lo = tl.minimum(tl.maximum(lo, -7.0), 7.0)
            sq_hi += tl.reduce(hi * hi, 1, _SUM)
            sq_lo += tl.reduce(lo * lo, 1, _SUM)
            offs = rows[:, None] * stride_r + cols[None, :]
            tl.store(rows_ptr + offs, hi.to(rows_ptr.dtype.element_ty), mask=mask)
            tl.store(rows_ptr + N * stride_r + offs, lo.to(rows_ptr.dtype.element_ty), mask=mask)
        tl.store(sq_ptr + rows, sq_hi, mask=rows < N)
        tl.store(sq_ptr + N + rows, sq_lo, mask=rows < N)


def split_rows(g: torch.Tensor, noise: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> SplitRows:
    """Bit-split ``g`` into the stacked INT4 rows and their squared norms, fused when on Triton."""
    if g.dim() != 2:
        raise LowbitError(f"bit splitting takes a 2-D (tokens x channels) gradient, got shape {tuple(g.shape)}")
    if noise.shape != g.shape:
        raise LowbitError(f"noise must have the gradient's shape {tuple(g.shape)}, got {tuple(noise.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise LowbitError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if backend_for(g) == "reference" or g.numel() == 0:
        return split_rows_reference(g, noise, out_dtype)
    n, c = g.shape
    g = g if g.stride(1) == 1 else g.contiguous()
    noise = noise if noise.stride(1) == 1 else noise.contiguous()
    scale, gain = split_scale(g)
    rows = torch.empty(2 * n, c, device=g.device, dtype=out_dtype)
    sq = torch.empty(2 * n, device=g.device, dtype=torch.float32)
    bm, bc = (32, 128) if g.is_cuda else (64, 64)
    _split_kernel[(triton.cdiv(n, bm),)](g, noise, gain, rows, sq, n, c, g.stride(0), noise.stride(0),
                                         rows.stride(0), BM=bm, BC=bc, num_warps=4 if g.is_cuda else 1)
    return SplitRows(rows, sq, scale)
