"""LSQ's backward and the inverse block Hadamard in one pass: what ``lowbit.train.hq.lsq_backward`` followed by
``Rotation.inverse`` computes, reading the Hadamard-domain gradient and ``v = x / step`` once.

Per element: ``inside = qmin <= v <= qmax``, the input gradient ``g * inside`` (then inverse-rotated in registers
with the forward kernel's own butterflies, ``lowbit.kernels.quantize``, and stored in the caller's dtype: bf16
for a bf16 input, so no float32 copy is written and converted after) and the step-gradient term
``g * where(inside, round(v) - v, clamp(v))``, summed per row in the kernel. The input gradient equals the
reference bit for bit; the step gradient is a float sum of M x K terms in another order than torch's (writing
the terms out for torch to sum cost an extra M x K float32 write and read: ~40% of this pass), so it matches to
float32 rounding, not bit for bit.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError

try:
    import triton
    import triton.language as tl

    from lowbit.kernels.quantize import _butterfly_all, row_tiles
except ImportError:
    triton = None

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:
    _SUM = tl.standard._sum_combine  # see lowbit.kernels.bitsplit

    @triton.jit
    def _round_to_bf16(y):
        """float32 rounded to the nearest bfloat16 value, ties to even (torch's ``.to(bfloat16)``; NaN stays NaN)."""
        bits = y.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(y != y, y, r.to(tl.float32, bitcast=True))

    @triton.jit
    def _lsq_inverse_kernel(g_ptr, v_ptr, signs_ptr, out_ptr, rowsum_ptr, M, K_in, K_out, stride_g, stride_v,
                            stride_o, NORM, qmin, qmax, BM: tl.constexpr, BK: tl.constexpr,
                            BLOCK: tl.constexpr, HAS_SIGNS: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        acc = tl.full((BM,), 0.0, tl.float32)
        for k0 in range(0, K_in, BK):
            cols = k0 + tl.arange(0, BK)
            mask = (rows[:, None] < M) & (cols[None, :] < K_in)
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0)
            inside = (v >= qmin * 1.0) & (v <= qmax * 1.0)
            r = (v + 12582912.0) - 12582912.0  # round half to even (only used where |v| <= qmax)
            clamped = tl.where(v < qmin * 1.0, qmin * 1.0, tl.where(v > qmax * 1.0, qmax * 1.0, v))  # NaN stays NaN
            dstep = tl.where(inside, r - v, clamped)
            acc += tl.reduce(g * dstep, 1, _SUM)  # masked entries are 0 * 0
            y = g * inside.to(tl.float32)
            if BLOCK > 1:
                y = _butterfly_all(y, BM, BK, BLOCK) * NORM
            if HAS_SIGNS:
                y = y * tl.load(signs_ptr + cols, mask=cols < K_in, other=0.0)[None, :]
            if out_ptr.dtype.element_ty == tl.bfloat16:
                y = _round_to_bf16(y)  # then the cast is exact (the interpreter's cast truncates)
            tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=(rows[:, None] < M) & (cols[None, :] < K_out))
        tl.store(rowsum_ptr + rows, acc, mask=rows < M)


def lsq_backward_inverse(grad: torch.Tensor, v: torch.Tensor, step: torch.Tensor, block: int,
                         signs: torch.Tensor | None, pad: int, qmin: int, qmax: int,
                         numel: float | None = None, out_dtype: torch.dtype = torch.float32,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rot.inverse(grad * inside), grad_step)`` as ``lsq_backward`` + ``Rotation.inverse`` return them, the
    first cast to ``out_dtype`` (the layer input's dtype).

    ``grad`` and ``v`` are float32 (M x K, K a multiple of ``block``); ``step`` 0-dim (per tensor) or (M, 1)."""
    if triton is None:
        raise LowbitError("lsq_backward_inverse needs triton")
    if grad.dim() != 2 or grad.shape != v.shape or grad.dtype != torch.float32 or v.dtype != torch.float32:
        raise LowbitError(f"lsq_backward_inverse needs float32 (M x K) grad and v, got {tuple(grad.shape)} "
                          f"{grad.dtype} and {tuple(v.shape)} {v.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise LowbitError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    blk = max(block, 1)
    if blk > 256 or grad.shape[1] % blk:
        raise LowbitError(f"the fused LSQ backward needs a block up to 256 tiling the width, got {block}")
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    v = v if v.stride(1) == 1 else v.contiguous()
    m, k_in = grad.shape
    k_out = k_in - pad
    out = torch.empty(m, k_out, device=grad.device, dtype=out_dtype)
    rowsum = torch.empty(m, device=grad.device, dtype=torch.float32)  # every row is written
    if m and k_in:
        tiles = row_tiles(m, k_in, blk, grad.device)
        norm = 1.0 / math.sqrt(block) if block > 1 else 1.0
        signs_arg = signs.float().contiguous() if signs is not None else out
        _lsq_inverse_kernel[(triton.cdiv(m, tiles.rows),)](
            grad, v, signs_arg, out, rowsum, m, k_in, k_out, grad.stride(0), v.stride(0), out.stride(0),
            norm, qmin, qmax, BM=tiles.rows, BK=tiles.cols, BLOCK=blk, HAS_SIGNS=signs is not None,
            num_warps=tiles.warps, **({"enable_fp_fusion": False} if grad.is_cuda else {}))
    if step.dim() == 0:
        grad_step = rowsum.sum() * (1.0 / math.sqrt((numel or v.numel()) * qmax))
    else:
        grad_step = rowsum * (1.0 / math.sqrt(v.shape[-1] * qmax))
    return out, grad_step
