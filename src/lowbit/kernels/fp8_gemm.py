"""A row-scaled FP8 GEMM in Triton whose float32 promotion interval is a knob, for exact integer sums on Hopper.

Why: the W4A4 FP8 path (``lowbit.kernels.w4a4_fp8``) feeds 4-bit integer codes (exact e4m3 values in [-16, 16]) to
an FP8 GEMM and needs the exact integer sums. Hopper's FP8 tensor cores keep only ~14 significant bits inside one
wgmma accumulation chain, and cuBLAS ``torch._scaled_mm(..., use_fast_accum=False)`` was measured inexact on the
H100 (integer sums ~2e6 off). Triton's ``tl.dot(a, b, acc, max_num_imprecise_acc=N)`` makes its Hopper backend add
the wgmma partial accumulator into a separate float32 accumulator every N elements of K (sm_90 default: 2**30, never).
With N = 32 (one fp8 wgmma) a chain holds 32 products of |value| <= 256, at most 2^13: exact. Larger N (64, 128) is
faster but exact only while the chains stay small; ``benchmarks/fp8_accum_probe.py`` measures both on the GPU.

Measured on the H100 (2026-11-24, ``benchmarks/results/fp8_accum_probe.json``, M = 2048/8192 on the LLaMA shapes):
N = 32, 64 and 128 all returned exact sums for codes uniform in [-16, 16], at 0.71-0.77x, 0.94-1.07x and
1.00-1.20x bf16; N = None (never promote) ran 1.32-1.64x and missed by up to 409. cuBLAS ``_scaled_mm`` without
fast accumulation was exact on those codes at 1.38-1.64x, and within 7.8e-4 of sum |a||w| on same-sign large codes
(``tests/kernels/test_w4a4_fp8.py``). So exact promotion costs Triton more than the whole FP8 advantage; this
kernel is not on any default path, and ``w4a4_fp8`` uses cuBLAS.

    y[m, n] = scale_a[m] * scale_b[n] * sum_k a[m, k] b[n, k] + bias[n]

a (M, K) and b (N, K) are float8_e4m3fn, contiguous along K (the weight is passed as (N, K), like ``_scaled_mm``'s
``b.T``). The epilogue computes ``acc * (scale_a * scale_b) + bias`` in float32 and rounds once to ``out_dtype``; the
reference does the same operations in the same order, so on the CPU interpreter (numpy, no fused multiply-add) the
two are equal bit for bit; compiled, the GPU may fuse the multiply-add (1 float32 rounding fewer). bfloat16 output
is rounded to nearest even by bit arithmetic before the cast (the interpreter's own cast truncates).

Triton's CPU interpreter (3.9) supports ``tl.dot`` on float8e4nv tiles (it widens them to float16 and multiplies
with float32 accumulation, exact for these values), so the kernel dots the fp8 tiles directly everywhere: no fp16
fallback is needed. ``max_num_imprecise_acc`` has no effect there. Only plain masked ``tl.load``/``tl.store`` and
pointer arithmetic are used (no TMA descriptors), so the kernel compiles on Triton 3.6 and 3.9 alike.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for
from lowbit.kernels.w4a16 import use_fixed_config

try:
    import triton
    import triton.language as tl

    from lowbit.kernels.int_gemm import grouped_tile
except ImportError:  # the reference path needs no Triton
    triton = None

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
WGMMA_K = 32  # K of one fp8 wgmma instruction: the smallest promotion interval Triton keeps on wgmma
MAX_IMPRECISE = 128  # the largest BLOCK_K below; Triton requires max_num_imprecise_acc <= the dot's K
GROUP_M = 8  # programs along M that share b tiles in L2
FIXED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)  # interpreter / LOWBIT_AUTOTUNE=0


def _check(a, b, scale_a, scale_b, bias, out_dtype, imprecise_acc) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments; returns the scales flattened to (M,) and (N,)."""
    name = "fp8_scaled_gemm"
    for t, what in ((a, "a"), (b, "b")):
        if t.dtype != FP8 or t.dim() != 2:
            raise LowbitError(f"{name}: {what} must be a 2-D float8_e4m3fn tensor, got {t.dtype} {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise LowbitError(f"{name}: {what} must be contiguous along K (pass the weight as (N, K)), "
                              f"got strides {t.stride()}")
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise LowbitError(f"{name}: K differs: a is (M, K) = {tuple(a.shape)}, b is (N, K) = {tuple(b.shape)}")
    for s, count, what in ((scale_a, m, "scale_a"), (scale_b, n, "scale_b")):
        if s.dtype != torch.float32 or s.numel() != count or s.dim() > 2 or (s.dim() == 2 and count not in s.shape):
            raise LowbitError(f"{name}: {what} must be float32 with {count} values ((M,) / (N,)), got {s.dtype} "
                              f"{tuple(s.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise LowbitError(f"{name}: bias must be a floating-point ({n},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    if any(t.device != a.device for t in (b, scale_a, scale_b) + (() if bias is None else (bias,))):
        raise LowbitError(f"{name}: all tensors must be on {a.device}")
    if out_dtype not in OUT_DTYPES:
        raise LowbitError(f"{name}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if imprecise_acc is not None and (isinstance(imprecise_acc, bool) or not isinstance(imprecise_acc, int)
                                      or imprecise_acc % WGMMA_K or not WGMMA_K <= imprecise_acc <= MAX_IMPRECISE):
        raise LowbitError(f"{name}: imprecise_acc must be None or a multiple of {WGMMA_K} in [{WGMMA_K}, "
                          f"{MAX_IMPRECISE}], got {imprecise_acc!r}")
    return scale_a.reshape(-1), scale_b.reshape(-1)


def fp8_scaled_gemm_reference(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                              imprecise_acc: int | None = 32) -> torch.Tensor:
    """``fp8_scaled_gemm`` in PyTorch: float64 matmul of the codes (exact), then scales and bias in float32."""
    sa, sb = _check(a, b, scale_a, scale_b, bias, out_dtype, imprecise_acc)
    y = (a.double() @ b.double().T).float() * (sa[:, None] * sb[None, :])
    return (y if bias is None else y + bias.float()).to(out_dtype)


def fp8_scaled_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                    imprecise_acc: int | None = 32) -> torch.Tensor:
    """y (M, N) = scale_a[:, None] * scale_b[None, :] * (a @ b.T) + bias, float32 accumulation.

    ``imprecise_acc``: products accumulated in the tensor cores' reduced precision before each promotion into the
    float32 accumulator (a multiple of 32, at most 128), or None for Triton's default (never on sm_90)."""
    sa, sb = _check(a, b, scale_a, scale_b, bias, out_dtype, imprecise_acc)
    if backend_for(a) == "reference":
        return fp8_scaled_gemm_reference(a, b, scale_a, scale_b, bias, out_dtype, imprecise_acc)
    (m, k), n = a.shape, b.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return y
    bias_arg = y if bias is None else bias.contiguous()  # the kernel reads the bias with unit stride
    args = (a, b, sa.contiguous(), sb.contiguous(), bias_arg, y, m, n, k, a.stride(0), b.stride(0))
    flags = dict(HAS_BIAS=bias is not None, IMPRECISE=imprecise_acc, GROUP_M=GROUP_M)
    if use_fixed_config():
        grid = (triton.cdiv(m, FIXED["BLOCK_M"]) * triton.cdiv(n, FIXED["BLOCK_N"]),)
        _fp8_gemm_fixed[grid](*args, **flags, **FIXED)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _fp8_gemm_tuned[grid](*args, **flags)
    return y


def integer_sums(a: torch.Tensor, b: torch.Tensor, imprecise_acc: int | None = 32) -> torch.Tensor:
    """The raw float32 sums a @ b.T of the same kernel (unit scales, no bias): what exactness checks compare with
    an exact integer matmul. Exact when every partial sum the hardware keeps is an integer below 2^24."""
    ones_a = torch.ones(a.shape[0], dtype=torch.float32, device=a.device)
    ones_b = torch.ones(b.shape[0], dtype=torch.float32, device=a.device)
    return fp8_scaled_gemm(a, b, ones_a, ones_b, None, torch.float32, imprecise_acc)


def tuned_config() -> str | None:
    """The launch configuration the autotuner used in the last autotuned call (None before any)."""
    best = getattr(_fp8_gemm_tuned, "best_config", None) if triton is not None else None
    return None if best is None else str(best)


if triton is not None:

    @triton.jit
    def _round_to_bf16(y):
        """float32 rounded to the nearest bfloat16, ties to even, as float32 (the interpreter's cast truncates; after
        this the cast is exact everywhere)."""
        bits = y.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(y != y, y, r.to(tl.float32, bitcast=True))

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr, M, N, K, stride_am, stride_bn,
                         HAS_BIAS: tl.constexpr, IMPRECISE: tl.constexpr, EVEN_K: tl.constexpr,
                         GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # grouped launch order: GROUP_M row-blocks reuse each b tile while it is in L2
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows past M (N) read a valid row instead (never stored), so only K needs a load mask, and only if ragged
        a_ptrs = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + (rn % N).to(tl.int64)[:, None] * stride_bn + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = (k0 + rk < K)[None, :]
                a = tl.load(a_ptrs, mask=k_ok, other=0.0)
                b = tl.load(b_ptrs, mask=k_ok, other=0.0)
            # b^T of a K-contiguous tile is K-major: what fp8 wgmma needs for its right operand
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=IMPRECISE)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        m_ok = rm < M
        n_ok = rn < N
        sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=n_ok, other=0.0)
        y = acc * (sa[:, None] * sb[None, :])
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if y_ptr.dtype.element_ty == tl.bfloat16:
            y = _round_to_bf16(y)
        tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    _even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
    _fp8_gemm_fixed = _even_k(_fp8_gemm_kernel)

    _CONFIGS = [  # H100: 128-wide fp8 K rows (one 128-byte swizzle line); accumulators of 64-128 registers/thread
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in (
            (128, 128, 128, 8, 4), (128, 128, 128, 4, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
            (128, 256, 64, 8, 4),
        )
    ]

    def _prune(configs, named_args, **kwargs):
        """Triton requires max_num_imprecise_acc <= BLOCK_K: drop the configs with a shorter K tile."""
        imprecise = kwargs.get("IMPRECISE")
        keep = [c for c in configs if imprecise is None or c.kwargs["BLOCK_K"] >= imprecise]
        return keep or configs

    _fp8_gemm_tuned = triton.autotune(_CONFIGS, key=["M", "N", "K", "IMPRECISE"],
                                      prune_configs_by={"early_config_prune": _prune})(_even_k(_fp8_gemm_kernel))
