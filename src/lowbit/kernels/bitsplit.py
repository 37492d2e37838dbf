"""Fused bit splitting of an output gradient into the stacked ``[hi; lo]`` INT4 rows, with their squared norms.

``split_rows(g, seed)`` computes, in one pass over ``g`` (N x C, any float dtype, read as it is: no float32
copy), what ``lowbit.train.sampling.bit_split`` + ``BitSplit.stacked`` + ``rows.norm(dim=1)`` compute in several:
``t = clamp(g s, -98, 98)``, ``hi = round(t / 14)``, ``lo = floor(t - 14 hi + u)`` (stochastic rounding), both
clamped to ``[-7, 7]``, written as rows ``0..N-1`` and ``N..2N-1`` of one 2N x C operand (float32, int8 or float8
e4m3), plus each row's sum of squares (an exact integer in float32, whatever the summation order; its ``sqrt`` is
the row norm leverage-score sampling weighs rows by), the scale ``s`` and the rows' weights ``14/s`` and ``1/s``.

The uniforms ``u`` are drawn in the kernel: ``u[r, c] = philox.uniform(seed, r * C + c)`` (``seed`` one int64 on
the device), so no N x C noise tensor is written and read back; ``split_rows_reference`` draws the same numbers
with ``philox.uniform_like_reference``, so the two can be compared exactly. ``max|g|`` is one reduction
(``linalg.vector_norm(g, inf)``, no ``abs`` copy); the scale, the gain and the weights follow from it inside the
kernel with the reference's float32 operations (the reference's ``isfinite`` branch becomes a ``where``), so
nothing waits for the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for
from lowbit.kernels.quantize import filling_rows

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SPLIT_BASE = 14.0
SPLIT_RANGE = 98.0
OUT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float32)
CPU_TILE = (64, 64)  # (rows, columns) per program on the interpreter; the GPU's rows come from split_tile_rows


class SplitRows(NamedTuple):
    """The 2N x C rows ``[hi; lo]``, each row's sum of squares (2N,), the 0-dim scale ``s`` and the rows'
    dequantization weights (2N,): ``14/s`` for the hi rows, ``1/s`` for the lo rows."""

    rows: torch.Tensor
    sq_norms: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor


def split_scale(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, gain)`` on the device: ``scale = 98 / max|g|`` (1 for a zero or denormal-tiny gradient) and the
    factor ``g`` is multiplied by (``scale``, or 0 where the reference zeroes a gradient whose scale overflows)."""
    amax = g.abs().amax().float() if g.numel() else torch.zeros((), device=g.device)
    raw = SPLIT_RANGE / amax.clamp_min(torch.finfo(torch.float32).tiny)  # torch: reciprocal, then * 98
    finite = torch.isfinite(raw)
    one = torch.ones_like(amax)
    scale = torch.where((amax > 0) & finite, raw, one)
    gain = torch.where(amax > 0, torch.where(finite, raw, torch.zeros_like(raw)), one)
    return scale, gain


def split_weights(scale: torch.Tensor, n: int) -> torch.Tensor:
    """The 2N row weights ``[14/s] * N + [1/s] * N`` (true divisions)."""
    return torch.cat([torch.full((n,), SPLIT_BASE, device=scale.device), torch.ones(n, device=scale.device)]) / scale


def split_math(g: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bit split's arithmetic for given uniforms: the float32 rows ``[hi; lo]`` and the scale (the reference
    training path's ``sampling.bit_split`` runs exactly this with its own noise)."""
    scale, gain = split_scale(g)
    t = (g.float() * gain).clamp(-SPLIT_RANGE, SPLIT_RANGE)  # only float rounding can leave the range
    hi = torch.round(t / t.new_full((), SPLIT_BASE)).clamp(-7, 7)  # a tensor divisor: a true division on CUDA
    lo = torch.floor((t - SPLIT_BASE * hi) + noise.float()).clamp(-7, 7)
    return torch.cat([hi, lo], 0) + 0.0, scale  # canonical +0, as the kernel's rounding writes it


def split_rows_reference(g: torch.Tensor, seed: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> SplitRows:
    """``split_math`` with the kernel's Philox uniforms for ``seed``, the norms and the weights."""
    from lowbit.kernels.philox import uniform_like_reference

    rows, scale = split_math(g, uniform_like_reference(seed, tuple(g.shape)))
    return SplitRows(rows.to(out_dtype), rows.pow(2).sum(dim=1), scale, split_weights(scale, g.shape[0]))


if triton is not None:
    from lowbit.kernels.philox import uniform

    # tl.reduce with triton's own combine function instead of tl.sum: the interpreter maps it to numpy, and
    # it still works when triton was imported before TRITON_INTERPRET was set (tl.sum then does not).
    _SUM = tl.standard._sum_combine

    @triton.jit
    def _split_kernel(g_ptr, seed_ptr, amax_ptr, rows_ptr, sq_ptr, scale_ptr, w_ptr, N, C, stride_g, stride_r,
                      BM: tl.constexpr, BC: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        # split_scale: torch's 98 / a is 98 * reciprocal(a); tiny = float32's smallest normal
        amax = tl.load(amax_ptr).to(tl.float32)
        raw = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.maximum(amax, 1.1754943508222875e-38)) * 98.0
        finite = raw <= 3.4028234663852886e38  # not inf (raw > 0)
        scale = tl.where((amax > 0) & finite, raw, 1.0)
        gain = tl.where(amax > 0, tl.where(finite, raw, 0.0), 1.0)
        seed = tl.load(seed_ptr)
        sq_hi = tl.full((BM,), 0.0, tl.float32)
        sq_lo = tl.full((BM,), 0.0, tl.float32)
        for c0 in range(0, C, BC):
            cols = c0 + tl.arange(0, BC)
            mask = (rows[:, None] < N) & (cols[None, :] < C)
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            u = uniform(seed, rows[:, None].to(tl.int64) * C + cols[None, :])
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
        ok = rows < N
        tl.store(sq_ptr + rows, sq_hi, mask=ok)
        tl.store(sq_ptr + N + rows, sq_lo, mask=ok)
        tl.store(w_ptr + rows, tl.math.div_rn(tl.full((BM,), 14.0, tl.float32), scale), mask=ok)
        tl.store(w_ptr + N + rows, tl.math.div_rn(tl.full((BM,), 1.0, tl.float32), scale), mask=ok)
        if tl.program_id(0) == 0:
            tl.store(scale_ptr, scale)


def split_tile_rows(n: int, multiprocessors: int) -> int:
    """Rows per CTA on the GPU: 32, halved (down to 4) until the grid has 4 CTAs per SM. ncu (H100, 2026-11-24):
    32-row tiles gave 8192 tokens 256 CTAs at 12% occupancy, compute stalls unhidden. The rows' sums of squares
    are exact integers, so the tile changes no result."""
    return filling_rows(n, 32, 4, multiprocessors)


def split_rows(g: torch.Tensor, seed: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> SplitRows:
    """Bit-split ``g`` into the stacked INT4 rows, their squared norms and weights, fused when on Triton.

    ``seed``: one int64 (device tensor, ``philox.draw_seed``) naming the rounding noise."""
    if g.dim() != 2:
        raise LowbitError(f"bit splitting takes a 2-D (tokens x channels) gradient, got shape {tuple(g.shape)}")
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise LowbitError(f"seed must be one int64, got {seed.numel()} x {seed.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise LowbitError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if backend_for(g) == "reference" or g.numel() == 0:
        return split_rows_reference(g, seed, out_dtype)
    n, c = g.shape
    g = g if g.stride(1) == 1 else g.contiguous()
    amax = torch.linalg.vector_norm(g, float("inf"))  # one reduction (max|g| is exact in g's dtype)
    rows = torch.empty(2 * n, c, device=g.device, dtype=out_dtype)
    sq = torch.empty(2 * n, device=g.device, dtype=torch.float32)
    weight = torch.empty(2 * n, device=g.device, dtype=torch.float32)
    scale = torch.empty((), device=g.device, dtype=torch.float32)
    bm, bc = (split_tile_rows(n, torch.cuda.get_device_properties(g.device).multi_processor_count), 128) \
        if g.is_cuda else CPU_TILE
    _split_kernel[(triton.cdiv(n, bm),)](g, seed, amax, rows, sq, scale, weight, n, c, g.stride(0), rows.stride(0),
                                         BM=bm, BC=bc, num_warps=4 if g.is_cuda else 1)
    return SplitRows(rows, sq, scale, weight)
