"""The integer GEMM behind ``wxax_linear``: int8 tensor cores, int32 accumulation per weight group, float epilogue.

y[m, n] = sx[m] * sum_g sw[g, n] * (sum_{k in g} a[m, k] b[n, k] + beta[g, n] Sa[g, m] + alpha[m] Sb[g, n]
                                      + G alpha[m] beta[g, n]) + bias[n]

with ``a`` the activation codes (int8), ``b`` the weight codes (int8, or 4-bit nibbles unpacked in the kernel),
``Sa``/``Sb`` their per-group sums and alpha/beta the zero-point offsets (see ``lowbit.kernels.w4a4``). The integer
sum is exact (int32: |a b| <= 2^14 per term, K < 2^17); the epilogue rounds in float32.

Packed 4-bit weights are split per K block: byte j of a block holds code j (low nibble) and code j + BLOCK_K/2
(high nibble), so the two halves multiply two contiguous halves of the activation tile and no interleaving is
needed; codes are unsigned (0..15), which int8 holds, so unpacking is one AND (and one shift) per four bytes.
On the GPU that is inline PTX on 32-bit registers; the CPU interpreter runs the same operations elementwise.
The weight is wgmma's left operand (out^T = W X^T), which Hopper reads from registers: the unpacked nibbles never
go back through shared memory, and small batches (decode) are wgmma's narrow N dimension (16 rows).

Known limit, read from the compiled TTGIR (Triton 3.9, sm_90): integer wgmma is not software-pipelined across
loop iterations (each dot waits for completion; bf16/fp8 dots get one in flight), so two CTAs per SM must hide
the gap.
"""

from __future__ import annotations

import torch

from lowbit.kernels.dispatch import interpreting
from lowbit.kernels.w4a16 import use_fixed_config

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

GROUP_M = 8  # programs along M that share weight tiles in L2


if triton is not None:
    _GROUP_M = tl.constexpr(GROUP_M)

    @triton.jit
    def _low_nibbles(p, USE_ASM: tl.constexpr):
        if USE_ASM:
            return tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [p], dtype=tl.int8,
                                             is_pure=True, pack=4)
        else:
            return (p & 15).to(tl.int8)

    @triton.jit
    def _high_nibbles(p, USE_ASM: tl.constexpr):
        if USE_ASM:
            return tl.inline_asm_elementwise("shr.u32 $0, $1, 4;\n\tand.b32 $0, $0, 0x0F0F0F0F;", "=r,r", [p],
                                             dtype=tl.int8, is_pure=True, pack=4)
        else:
            return (p >> 4).to(tl.int8)

    @triton.jit
    def _block_dot(a_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, acc, PACKED: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_ASM: tl.constexpr):
        """acc (BLOCK_N, BLOCK_M) += b[rn, k0:k0+BLOCK_K] @ a[rm, k0:k0+BLOCK_K].T in int32.

        The weight is the left operand (swap AB): Hopper's wgmma takes its left operand from registers, so the
        unpacked nibbles go straight from the inline PTX to the tensor cores, and the row count of the
        activations (the decode batch) is wgmma's narrow N dimension. ``out_dtype=tl.int32`` is spelled out:
        Triton 3.6 defaults it to float32 even for int8 operands with an int32 accumulator (and asserts)."""
        if PACKED:
            HALF: tl.constexpr = BLOCK_K // 2
            h = tl.arange(0, HALF)
            p = tl.load(w_ptr + rn[:, None] * (K // 2) + k0 // 2 + h[None, :], mask=n_ok[:, None], other=0)
            a_lo = tl.load(a_ptr + rm[:, None] * K + k0 + h[None, :], mask=m_ok[:, None], other=0)
            a_hi = tl.load(a_ptr + rm[:, None] * K + k0 + HALF + h[None, :], mask=m_ok[:, None], other=0)
            acc = tl.dot(_low_nibbles(p, USE_ASM), tl.trans(a_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(_high_nibbles(p, USE_ASM), tl.trans(a_hi), acc, out_dtype=tl.int32)
        else:
            kk = tl.arange(0, BLOCK_K)
            b = tl.load(w_ptr + rn[:, None] * K + k0 + kk[None, :], mask=n_ok[:, None], other=0)
            a = tl.load(a_ptr + rm[:, None] * K + k0 + kk[None, :], mask=m_ok[:, None], other=0)
            acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)
        return acc

    @triton.jit
    def _group_epilogue(acc, g, rm, rn, m_ok, n_ok, M, N, alpha, sa_ptr, sw_ptr, beta_ptr, sb_ptr, GROUP_SIZE):
        """sw * (sum a b + beta Sa + alpha Sb + G alpha beta) for group g, in float32, shaped (BLOCK_N, BLOCK_M)."""
        sa = tl.load(sa_ptr + g * M + rm, mask=m_ok, other=0)
        sw = tl.load(sw_ptr + g * N + rn, mask=n_ok, other=0)
        beta = tl.load(beta_ptr + g * N + rn, mask=n_ok, other=0)
        sb = tl.load(sb_ptr + g * N + rn, mask=n_ok, other=0)
        exact = (acc.to(tl.float32) + beta[:, None] * sa[None, :]
                 + alpha[None, :] * (sb[:, None] + GROUP_SIZE * beta[:, None]))
        return sw[:, None] * exact

    @triton.jit
    def _wxax_kernel(a_ptr, sx_ptr, alpha_ptr, sa_ptr, w_ptr, sw_ptr, beta_ptr, sb_ptr, bias_ptr, y_ptr,
                     M, N, K, GROUPS, GROUP_SIZE, M_BUCKET, BLOCKS_PER_GROUP: tl.constexpr, PACKED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        # grouped launch order: GROUP_M row-blocks reuse each weight tile while it is in L2
        pid = tl.program_id(0)
        grid_m = (M + BLOCK_M - 1) // BLOCK_M
        grid_n = (N + BLOCK_N - 1) // BLOCK_N
        width = _GROUP_M * grid_n
        first_m = (pid // width) * _GROUP_M
        rows_here = tl.minimum(grid_m - first_m, _GROUP_M)
        pid_m = first_m + (pid % width) % rows_here
        pid_n = (pid % width) // rows_here
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        alpha = tl.load(alpha_ptr + rm, mask=m_ok, other=0)
        if BLOCKS_PER_GROUP == 0:  # per channel, one group: a single int32 sum over K, the epilogue once
            acc = tl.full((BLOCK_N, BLOCK_M), 0, tl.int32)
            for k0 in range(0, K, BLOCK_K):
                acc = _block_dot(a_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, acc, PACKED, BLOCK_K, USE_ASM)
            out = _group_epilogue(acc, 0, rm, rn, m_ok, n_ok, M, N, alpha, sa_ptr, sw_ptr, beta_ptr, sb_ptr,
                                  GROUP_SIZE)
        else:  # the blocks of a group unrolled, so the loop over groups is the one Triton pipelines
            out = tl.full((BLOCK_N, BLOCK_M), 0, tl.float32)
            for g in range(0, GROUPS):
                acc = tl.full((BLOCK_N, BLOCK_M), 0, tl.int32)
                for kb in tl.static_range(BLOCKS_PER_GROUP):
                    acc = _block_dot(a_ptr, w_ptr, rm, rn, m_ok, n_ok, g * GROUP_SIZE + kb * BLOCK_K, K, acc,
                                     PACKED, BLOCK_K, USE_ASM)
                out += _group_epilogue(acc, g, rm, rn, m_ok, n_ok, M, N, alpha, sa_ptr, sw_ptr, beta_ptr, sb_ptr,
                                       GROUP_SIZE)
        out = out * tl.load(sx_ptr + rm, mask=m_ok, other=0)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=n_ok, other=0)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], out.to(y_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])

    _CONFIGS = [  # (BLOCK_N: wgmma's M, a multiple of 64; BLOCK_M: the activation rows, wgmma's N)
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bm, bn, nw, ns in (
            (128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4),
            (128, 64, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 3),
        )
    ]

    def _prune(configs, named_args, **kwargs):
        """Small M keeps the small row tiles, large M the large ones (saves autotuning time)."""
        m = named_args["M"]
        keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == (m <= 32)]
        return keep or configs

    _wxax_tuned = triton.autotune(_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCKS_PER_GROUP", "PACKED"],
                                  prune_configs_by={"early_config_prune": _prune})(_wxax_kernel)


def wxax_gemm(acts, layout, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the GEMM for ``QuantizedActivations`` ``acts`` and a ``WXAXLayout``; bias float32 or None."""
    m, k = acts.codes.shape
    n = layout.out_features
    y = torch.empty((m, n), dtype=out_dtype, device=acts.codes.device)
    args = (acts.codes, acts.scale, acts.alpha, acts.row_sums, layout.qweight, layout.scales, layout.beta,
            layout.code_sums, y if bias is None else bias, y, m, n, k, k // layout.group_size, layout.group_size,
            min(triton.next_power_of_2(m), 4096))
    per_channel = layout.group_size == k
    flags = dict(BLOCKS_PER_GROUP=0 if per_channel else layout.group_size // layout.block_k, PACKED=layout.packed,
                 HAS_BIAS=bias is not None,
                 USE_ASM=not interpreting(), BLOCK_K=layout.block_k)
    if use_fixed_config():
        bm, bn = 16, 64
        _wxax_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _wxax_tuned[grid](*args, **flags)
    return y
