"""Grad-weight of the sampled INT4 backward as one Triton INT8 GEMM that gathers along its reduction dimension.

``grad_weight_gemm`` computes, for the kept rows of the bit-split gradient sorted into three groups (saturated hi
rows, saturated lo rows, sampled rows; ``ends`` holds the device-side group ends, so no host sync), the C x K

    out = (hi^T qx[tok]) * w_hi + (lo^T qx[tok]) * w_lo + (smp^T q3) / scale

where ``hi``/``lo``/``smp`` are the groups' rows of ``rows`` (2N x C, int8, read in place through ``index``) and
``tok = index mod N``. The sampled rows' right operand ``q3`` is never materialised: each tile re-quantizes
``qx[tok] * f`` on the fly (``q3 = clamp(floor(clamp(qx f gain, -7, 7) + u), -7, 7)``, ``u`` the caller's noise row
of the kept row). Integer products accumulate exactly in int32; the float32 epilogue runs the reference's
operations in the reference's order (``lowbit.train.backward``), with fp contraction off so no multiply-add is
fused, and a correctly rounded division: the result equals the reference bit for bit.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _kept_rows_tile(rows_ptr, x_ptr, index_ptr, j0, end, cm, kn, C, K, N, stride_r, stride_x,
                        BK: tl.constexpr):
        """The (BM x BK) gradient tile and (BK x BN) activation tile of kept positions ``j0..j0+BK`` (< end)."""
        pos = j0 + tl.arange(0, BK)
        ok = pos < end
        src = tl.load(index_ptr + pos, mask=ok, other=0).to(tl.int64)
        tok = src % N
        a = tl.load(rows_ptr + src[None, :] * stride_r + cm[:, None], mask=ok[None, :] & (cm[:, None] < C), other=0)
        b = tl.load(x_ptr + tok[:, None] * stride_x + kn[None, :], mask=ok[:, None] & (kn[None, :] < K), other=0)
        return a, b, pos, ok, src

    @triton.jit
    def _grad_weight_kernel(rows_ptr, x_ptr, index_ptr, ends_ptr, w_ptr, f_ptr, gain_ptr, scale_ptr, noise_ptr,
                            out_ptr, C, K, N, stride_r, stride_x, stride_u, stride_o,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            SAMPLED: tl.constexpr):
        pid = tl.program_id(0)
        grid_m, grid_n = (C + BM - 1) // BM, (K + BN - 1) // BN
        group = pid // (GROUP_M * grid_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
        pid_n = (pid % (GROUP_M * grid_n)) // size_m
        cm = pid_m * BM + tl.arange(0, BM)
        kn = pid_n * BN + tl.arange(0, BN)
        e0 = tl.load(ends_ptr).to(tl.int32)
        e1 = tl.load(ends_ptr + 1).to(tl.int32)
        acc = tl.full((BM, BN), 0, tl.int32)
        for j0 in range(0, e0, BK):  # saturated hi rows: the forward's own qx, weight 14/s
            a, b, pos, ok, src = _kept_rows_tile(rows_ptr, x_ptr, index_ptr, j0, e0, cm, kn, C, K, N,
                                                 stride_r, stride_x, BK)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        y = acc.to(tl.float32) * tl.load(w_ptr)
        acc = tl.full((BM, BN), 0, tl.int32)
        for j0 in range(e0, e1, BK):  # saturated lo rows: weight 1/s
            a, b, pos, ok, src = _kept_rows_tile(rows_ptr, x_ptr, index_ptr, j0, e1, cm, kn, C, K, N,
                                                 stride_r, stride_x, BK)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        y = y + acc.to(tl.float32) * tl.load(w_ptr + 1)
        if SAMPLED:  # rows kept with p < 1: x~ = qx f re-quantized by stochastic rounding, one scale
            e2 = tl.load(ends_ptr + 2).to(tl.int32)
            gain = tl.load(gain_ptr)
            acc = tl.full((BM, BN), 0, tl.int32)
            for j0 in range(e1, e2, BK):
                a, b, pos, ok, src = _kept_rows_tile(rows_ptr, x_ptr, index_ptr, j0, e2, cm, kn, C, K, N,
                                                     stride_r, stride_x, BK)
                f = tl.load(f_ptr + pos, mask=ok, other=0.0)
                u = tl.load(noise_ptr + src[:, None] * stride_u + kn[None, :],
                            mask=ok[:, None] & (kn[None, :] < K), other=0.0)
                t = (b.to(tl.float32) * f[:, None]) * gain
                t = tl.minimum(tl.maximum(t, -7.0), 7.0)
                q = tl.minimum(tl.maximum(tl.floor(t + u), -7.0), 7.0)
                acc = tl.dot(a, q.to(tl.int8), acc, out_dtype=tl.int32)
            y = y + tl.math.div_rn(acc.to(tl.float32), tl.load(scale_ptr))
        mask = (cm[:, None] < C) & (kn[None, :] < K)
        tl.store(out_ptr + cm[:, None].to(tl.int64) * stride_o + kn[None, :], y, mask=mask)


def grad_weight_gemm(rows: torch.Tensor, qx: torch.Tensor, index: torch.Tensor, ends: torch.Tensor,
                     w: torch.Tensor, f: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """C x K float32 grad-weight from ``rows`` (2N x C int8), ``qx`` (N x K int8) and the sorted kept ``index``.

    ``ends``: the three group ends (device int tensor); ``w``: the hi and lo row weights (2 elements); ``f``
    (per sorted position), ``gain``, ``scale`` and ``noise`` (2N x K float32, indexed by row) describe the
    sampled group's re-quantization; ``noise=None`` means no sampled group (sampling off)."""
    if triton is None:
        raise LowbitError("grad_weight_gemm needs triton")
    if rows.dtype != torch.int8 or qx.dtype != torch.int8 or rows.shape[0] != 2 * qx.shape[0]:
        raise LowbitError(f"grad_weight_gemm needs int8 rows (2N x C) and qx (N x K), got {rows.dtype} "
                          f"{tuple(rows.shape)} and {qx.dtype} {tuple(qx.shape)}")
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    qx = qx if qx.stride(1) == 1 else qx.contiguous()
    n, k = qx.shape
    c = rows.shape[1]
    out = torch.empty(c, k, device=rows.device, dtype=torch.float32)
    if c == 0 or k == 0:
        return out
    sampled = noise is not None
    dummy = out
    gpu = rows.is_cuda
    bm, bn, bk = (128, 128, 64) if gpu else (32, 32, 32)
    grid = (triton.cdiv(c, bm) * triton.cdiv(k, bn),)
    _grad_weight_kernel[grid](
        rows, qx, index, ends, w.float().contiguous(), f if sampled else dummy, gain if sampled else dummy,
        scale if sampled else dummy, noise if sampled else dummy, out, c, k, n, rows.stride(0), qx.stride(0),
        noise.stride(0) if sampled else 0, out.stride(0), BM=bm, BN=bn, BK=bk, GROUP_M=8, SAMPLED=sampled,
        **({"num_warps": 8, "num_stages": 3, "enable_fp_fusion": False} if gpu else {"num_warps": 1}))
    return out
