"""LSQ's backward and the inverse block Hadamard in one pass: what ``lowbit.train.hq.lsq_backward`` followed by
``Rotation.inverse`` computes, reading the Hadamard-domain gradient and ``v = x / step`` once.

Per element: ``inside = qmin <= v <= qmax``, the input gradient ``g * inside`` (then inverse-rotated in registers
with the forward kernel's own butterflies, ``lowbit.kernels.quantize``) and the step-gradient term
``g * where(inside, round(v) - v, clamp(v))``. That term is written out and summed by torch (``.sum()`` /
``.sum(dim=-1)``) exactly as the reference sums it, so the step gradient is bit for bit the reference's too.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError

try:
    import triton
    import triton.language as tl

    from lowbit.kernels.quantize import _butterfly_all
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _lsq_inverse_kernel(g_ptr, v_ptr, signs_ptr, out_ptr, prod_ptr, M, K_in, K_out, stride_g, stride_v,
                            stride_o, stride_p, NORM, qmin, qmax, BM: tl.constexpr, BK: tl.constexpr,
                            BLOCK: tl.constexpr, HAS_SIGNS: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        for k0 in range(0, K_in, BK):
            cols = k0 + tl.arange(0, BK)
            mask = (rows[:, None] < M) & (cols[None, :] < K_in)
            g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
            v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=mask, other=0.0)
            inside = (v >= qmin * 1.0) & (v <= qmax * 1.0)
            r = (v + 12582912.0) - 12582912.0  # round half to even (only used where |v| <= qmax)
            clamped = tl.where(v < qmin * 1.0, qmin * 1.0, tl.where(v > qmax * 1.0, qmax * 1.0, v))  # NaN stays NaN
            dstep = tl.where(inside, r - v, clamped)
            tl.store(prod_ptr + rows[:, None] * stride_p + cols[None, :], g * dstep, mask=mask)
            y = g * inside.to(tl.float32)
            if BLOCK > 1:
                y = _butterfly_all(y, BM, BK, BLOCK) * NORM
            if HAS_SIGNS:
                y = y * tl.load(signs_ptr + cols, mask=cols < K_in, other=0.0)[None, :]
            tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y,
                     mask=(rows[:, None] < M) & (cols[None, :] < K_out))


def lsq_backward_inverse(grad: torch.Tensor, v: torch.Tensor, step: torch.Tensor, block: int,
                         signs: torch.Tensor | None, pad: int, qmin: int, qmax: int,
                         numel: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rot.inverse(grad * inside), grad_step)`` as ``lsq_backward`` + ``Rotation.inverse`` return them.

    ``grad`` and ``v`` are float32 (M x K, K a multiple of ``block``); ``step`` 0-dim (per tensor) or (M, 1)."""
    if triton is None:
        raise LowbitError("lsq_backward_inverse needs triton")
    if grad.dim() != 2 or grad.shape != v.shape or grad.dtype != torch.float32 or v.dtype != torch.float32:
        raise LowbitError(f"lsq_backward_inverse needs float32 (M x K) grad and v, got {tuple(grad.shape)} "
                          f"{grad.dtype} and {tuple(v.shape)} {v.dtype}")
    blk = max(block, 1)
    if blk > 256 or grad.shape[1] % blk:
        raise LowbitError(f"the fused LSQ backward needs a block up to 256 tiling the width, got {block}")
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    v = v if v.stride(1) == 1 else v.contiguous()
    m, k_in = grad.shape
    k_out = k_in - pad
    out = torch.empty(m, k_out, device=grad.device, dtype=torch.float32)
    prod = torch.empty(m, k_in, device=grad.device, dtype=torch.float32)
    if m and k_in:
        gpu = grad.is_cuda
        bk = max(blk, 64 if gpu else 32)
        bm = max(1, (4096 if gpu else 1024) // bk)
        norm = 1.0 / math.sqrt(block) if block > 1 else 1.0
        signs_arg = signs.float().contiguous() if signs is not None else out
        _lsq_inverse_kernel[(triton.cdiv(m, bm),)](
            grad, v, signs_arg, out, prod, m, k_in, k_out, grad.stride(0), v.stride(0), out.stride(0),
            prod.stride(0), norm, qmin, qmax, BM=bm, BK=bk, BLOCK=blk, HAS_SIGNS=signs is not None,
            **({"num_warps": 8, "enable_fp_fusion": False} if gpu else {"num_warps": 1}))
    if step.dim() == 0:
        grad_step = prod.sum() * (1.0 / math.sqrt((numel or v.numel()) * qmax))
    else:
        grad_step = prod.sum(dim=-1) * (1.0 / math.sqrt(v.shape[-1] * qmax))
    return out, grad_step
