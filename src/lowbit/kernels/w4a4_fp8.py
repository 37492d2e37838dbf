"""W4A4 at large M on FP8 tensor cores: 4-bit codes are exact FP8 e4m3 values, so cuBLAS's FP8 GEMM does the work.

Why: the H100 has no INT4 tensor cores, its FP8 and INT8 tensor cores have the same peak, and cuBLAS's row-scaled
FP8 GEMM (``torch._scaled_mm``) reaches 1.47-1.65x bf16 on the LLaMA shapes where our INT8 Triton GEMM reaches
1.19-1.26x (Triton does not pipeline integer wgmma). Every integer in [-16, 16] is exact in e4m3.

For a per-channel 4-bit weight (group = K) and per-token activations, ``wxax_linear_reference`` is

    y[m, n] = sx[m] sw[n] sum_k (q[m, k] - zx[m]) (c[n, k] - zw[n]) + bias[n]

which is exactly a row-scaled GEMM of the codes ``q - zx`` and ``c - zw`` when both are integers in [-16, 16]:

1. ``quantize_activations_fp8``: per-token quantization (the same kernel as the INT8 path, bit for bit the
   quantizer), writing e4m3 codes ``q - zx`` and the scale sx. A row whose codes could leave [-16, 16] (zero point
   outside [qmax - 16, qmin + 16]: all-positive or constant rows, never seen in LLM activations but allowed) gets
   codes ``q - shift`` instead and a nonzero ``offset = shift - zx``.
2. ``unpack_fp8``: the packed weight to e4m3 ``c - zw`` (N, K) by a Triton kernel, **every call by default**: the
   timed W4A4 path pays for it. ``cache_weight=True`` keeps the FP8 copy on the ``PackedWeight`` instead (1 byte per
   weight on top of the 0.5 packed bytes), an explicit choice of memory for speed. The weight's zero points are
   checked once (``prepare_fp8``): a weight whose ``c - zw`` could leave [-16, 16] never takes this path.
3. ``torch._scaled_mm(codes, weight.T, scale_a=sx (M, 1), scale_b=sw (1, N), bias, use_fast_accum=False)``.
   Exactness: |products| <= 256, K <= 65536, so every partial sum is an integer below 2^24, exact in float32.
   Hopper's FP8 tensor cores keep only ~14 significant bits inside one accumulation chain (DeepSeek-V3 report,
   SageAttention2); cuBLAS with ``use_fast_accum=False`` adds each chain into float32 registers, and a chain of
   128 products of typical codes (|q - zx|, |c - zw| <= 8) stays below 2^14. Measured on the H100 (2026-11-24,
   ``benchmarks/fp8_accum_bounds.py``): random-sign codes in [-16, 16], codes in [0, 16] and all-16 codes give
   exact sums up to K = 14336; codes 9..16 of one sign do not, off by at most 7.8e-4 of sum |a| |w|. The stated
   tolerance is 1e-3 of sum |a| |w| (tested): below half a bf16 ulp of the output unless the sum cancels. (An earlier session read the GPU tests'
   failures as accumulation errors; they came from ``unpack_fp8``, whose byte-packed stores were wrong on the GPU.)
4. ``_fixup_rows_kernel``: rows with a nonzero offset are recomputed exactly (int8 dot of the FP8 codes, plus
   ``offset * sum_k (c - zw)``) and overwritten; for every other row the kernel only reads the offsets and exits.

Dispatch (``use_fp8``, consulted when ``w4a4.FP8_AUTO`` is True): CUDA with FP8 tensor cores, M >= ``FP8_MIN_TOKENS`` (2048), 4-bit per-channel weight,
act_bits <= 4, K and N multiples of 16 (``_scaled_mm``), fp16/bf16 activations, bias absent or of x's dtype (it
then enters cuBLAS's float32 epilogue unrounded). Below that the per-call unpack (1.5 bytes per weight
moved, plus the GEMM's 1 byte) is a large share of a short GEMM, and the INT8 kernel reading 0.5 bytes per weight
wins (M = 1-16 it is 1.1-2.5x bf16); at M = 1024 the two paths tie (FP8 0.90-1.04x, INT8 0.87-1.04x), at M = 2048 FP8 wins or ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for, interpreting
from lowbit.kernels.w4a4 import ACT_CHUNK, act_shift, launch_quantize_rows
from lowbit.kernels.weights import PackedWeight
from lowbit.quant.quantizer import QuantSpec, quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

FP8_MIN_TOKENS = 2048
FP8 = torch.float8_e4m3fn
EXACT = 16  # every integer in [-EXACT, EXACT] is an e4m3 value


class FP8Activations(NamedTuple):
    """e4m3 codes (M, K): q - zx, or q - shift where ``offset`` (M,) = shift - zx is nonzero; per-token scale (M,)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


@dataclass(frozen=True, eq=False)
class FP8Layout:
    """What the FP8 path needs of a weight besides its codes: scales (1, N), zero points (N,), sum_k (c - zw) (N,)."""

    scale_b: torch.Tensor
    zeros: torch.Tensor
    row_sums: torch.Tensor
    codes_fit: bool  # every c - zw is an integer in [-16, 16]


# ------------------------------------------------------------------------------------------------ references
def quantize_activations_fp8_reference(x: torch.Tensor, bits: int, symmetric: bool) -> FP8Activations:
    """``lowbit.quant.quantizer.quantize`` per token, in the FP8 form (see the module docstring)."""
    spec = QuantSpec(bits, symmetric, "token")
    qt = quantize(x.float(), spec)
    zero = torch.zeros_like(qt.scale) if qt.zero is None else qt.zero
    fits = (spec.qmin - zero >= -EXACT) & (spec.qmax - zero <= EXACT)
    sub = torch.where(fits, zero, float(act_shift(bits, symmetric)))
    offset = torch.where(fits, 0.0, act_shift(bits, symmetric) - zero)
    return FP8Activations((qt.q - sub).to(FP8), qt.scale.reshape(-1).contiguous(), offset.reshape(-1).contiguous())


def unpack_fp8_reference(weight: PackedWeight) -> torch.Tensor:
    """The e4m3 codes c - zw (N, K) of a per-channel weight whose codes fit (``prepare_fp8``)."""
    return (weight.codes().float() - weight.zeros).to(FP8)


def prepare_fp8(weight: PackedWeight) -> FP8Layout:
    """Scales, zero points and code sums of a per-channel weight, built once and cached on it (one host sync)."""

    def build() -> FP8Layout:
        if weight.groups != 1:
            raise LowbitError(f"the FP8 W4A4 path needs a per-channel weight, got group size {weight.group_size}")
        zeros = weight.zeros.reshape(-1).contiguous()
        lo, hi = -zeros, (2**weight.bits - 1) - zeros
        fits = bool(((lo >= -EXACT) & (hi <= EXACT)).all())
        row_sums = (weight.codes().float() - weight.zeros).sum(1)
        return FP8Layout(weight.scales.reshape(1, -1).contiguous(), zeros, row_sums.contiguous(), fits)

    return weight.prepared(("wxax_fp8",), build)


# ---------------------------------------------------------------------------------------------------- kernels
def quantize_activations_fp8(x: torch.Tensor, bits: int, symmetric: bool, max_chunk: int = ACT_CHUNK,
                             num_warps: int | None = None) -> FP8Activations:
    """Per-token quantization of a contiguous (M, K) x to the FP8 form: the Triton kernel or the reference."""
    if backend_for(x) == "reference":
        return quantize_activations_fp8_reference(x, bits, symmetric)
    m, k = x.shape
    codes = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    offset = torch.empty(m, dtype=torch.float32, device=x.device)
    launch_quantize_rows(x, codes, scale, offset, None, bits, symmetric, 0, max_chunk, num_warps)
    return FP8Activations(codes, scale, offset)


def unpack_fp8(weight: PackedWeight) -> torch.Tensor:
    """``unpack_fp8_reference`` by a Triton kernel: reads the canonical packed bytes once, writes the e4m3 codes."""
    if backend_for(weight.packed) == "reference":
        return unpack_fp8_reference(weight)
    n, k = weight.out_features, weight.in_features
    if k % 2:  # the kernel reads k / 2 whole bytes per row; the FP8 path itself needs k % 16 == 0
        raise LowbitError(f"unpack_fp8 needs an even input width, got {k}")
    out = torch.empty((n, k), dtype=FP8, device=weight.device)
    bn, bkb = (4, 32) if interpreting() else (32, 128)
    grid = (triton.cdiv(n, bn), triton.cdiv(k // 2, bkb))
    _unpack_kernel[grid](weight.packed, prepare_fp8(weight).zeros, out, n, k // 2,
                         BLOCK_N=bn, BLOCK_KB=bkb, num_warps=1 if interpreting() else 4)
    return out


if triton is not None:

    @triton.jit
    def _unpack_kernel(p_ptr, z_ptr, o_ptr, N, KB, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
        ok = (rn < N)[:, None] & (rk < KB)[None, :]
        p = tl.load(p_ptr + rn.to(tl.int64)[:, None] * KB + rk[None, :], mask=ok, other=0).to(tl.int32)
        z = tl.load(z_ptr + rn, mask=rn < N, other=0)[:, None]
        lo = (p & 15).to(tl.float32) - z
        hi = (p >> 4).to(tl.float32) - z
        # code 2j, then 2j + 1: interleaved in registers and stored as e4m3 (a bitcast of e4m3 to bytes, packed
        # into 16-bit words, came out wrong on the H100 with Triton 3.6)
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_KB)).to(tl.float8e4nv)
        ck = tl.program_id(1) * 2 * BLOCK_KB + tl.arange(0, 2 * BLOCK_KB)
        c_ok = (rn < N)[:, None] & (ck < 2 * KB)[None, :]
        tl.store(o_ptr + rn.to(tl.int64)[:, None] * (2 * KB) + ck[None, :], codes, mask=c_ok)

    @triton.jit
    def _e4m3_to_int8(bits):
        """e4m3 bytes (loaded as uint8, so masked lanes can be 0) holding integers, as int8."""
        return bits.to(tl.float8e4nv, bitcast=True).to(tl.float16).to(tl.int8)

    @triton.jit
    def _fixup_rows_kernel(a_ptr, sx_ptr, off_ptr, w_ptr, sw_ptr, rs_ptr, bias_ptr, y_ptr, M, N, K,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        """Rows with a nonzero offset: y = sx sw (sum_k a (c - zw) + offset sum_k (c - zw)) + bias, in int32 and
        float32, overwriting what the FP8 GEMM wrote there. Programs whose rows all have offset 0 exit at once."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        off = tl.load(off_ptr + rm, mask=m_ok, other=0)
        bad = off != 0
        if tl.reduce(bad.to(tl.int32), 0, tl.standard._elementwise_max) > 0:
            sx = tl.load(sx_ptr + rm, mask=m_ok, other=0)
            kk = tl.arange(0, BLOCK_K)
            for n0 in range(tl.program_id(1) * BLOCK_N, N, tl.num_programs(1) * BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                n_ok = rn < N
                acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
                for k0 in range(0, K, BLOCK_K):
                    k_ok = (k0 + kk < K)[None, :]
                    a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * K + k0 + kk[None, :], mask=bad[:, None] & k_ok,
                                other=0)
                    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * K + k0 + kk[None, :], mask=n_ok[:, None] & k_ok,
                                other=0)
                    acc = tl.dot(_e4m3_to_int8(a), tl.trans(_e4m3_to_int8(w)), acc, out_dtype=tl.int32)
                sw = tl.load(sw_ptr + rn, mask=n_ok, other=0)
                rs = tl.load(rs_ptr + rn, mask=n_ok, other=0)
                y = sx[:, None] * sw[None, :] * (acc.to(tl.float32) + off[:, None] * rs[None, :])
                if HAS_BIAS:
                    y += tl.load(bias_ptr + rn, mask=n_ok, other=0).to(tl.float32)[None, :]
                tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
                         mask=bad[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------- the path
def use_fp8(x2: torch.Tensor, weight: PackedWeight, act_bits: int, bias: torch.Tensor | None) -> bool:
    """The dispatch rule of the module docstring, for a 2-D x: where FP8 applies and is faster."""
    return (x2.is_cuda and x2.shape[0] >= FP8_MIN_TOKENS and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(x2.device) >= (8, 9) and fp8_applies(x2, weight, act_bits, bias))


def fp8_applies(x2: torch.Tensor, weight: PackedWeight, act_bits: int, bias: torch.Tensor | None) -> bool:
    """Whether the FP8 path applies to this call (any device, any M): codes and sums within the range its design
    needs to be exact (the H100 still rounds inside its FP8 accumulation: module docstring)."""
    n, k = weight.out_features, weight.in_features
    return (weight.bits == 4 and act_bits <= 4 and weight.groups == 1 and k % 16 == 0 and n % 16 == 0
            and k * EXACT * EXACT < 2**24 and x2.dtype in (torch.float16, torch.bfloat16)
            and (bias is None or bias.dtype == x2.dtype) and prepare_fp8(weight).codes_fit)


def fp8_weight(weight: PackedWeight, cache: bool) -> torch.Tensor:
    """The e4m3 weight codes: unpacked now (default), or once and kept on ``weight`` when ``cache``."""
    return weight.prepared(("wxax_fp8_codes",), lambda: unpack_fp8(weight)) if cache else unpack_fp8(weight)


def scaled_mm(a: torch.Tensor, w: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """sa[m] sb[n] sum_k a w + bias, rounded once to ``out_dtype``: cuBLAS on CUDA; elsewhere (the CPU interpreter
    tests) an exact emulation, since CPU ``_scaled_mm`` rounds differently and is not what runs in production."""
    if a.is_cuda:
        return torch._scaled_mm(a, w.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                                use_fast_accum=False)
    exact = (a.double() @ w.double().T).float()  # integer sums below 2^24: exact in float32
    y = scale_a * scale_b * exact
    return (y if bias is None else y + bias.float()).to(out_dtype)


def wxax_fp8_linear(x2: torch.Tensor, weight: PackedWeight, act_bits: int, act_symmetric: bool,
                    bias: torch.Tensor | None, cache_weight: bool = False) -> torch.Tensor:
    """``wxax_linear`` of a contiguous (M, K) x on the FP8 path; the caller checked ``fp8_applies``."""
    m, n, k = x2.shape[0], weight.out_features, weight.in_features
    acts = quantize_activations_fp8(x2, act_bits, act_symmetric)
    layout = prepare_fp8(weight)
    w8 = fp8_weight(weight, cache_weight)
    y = scaled_mm(acts.codes, w8, acts.scale[:, None], layout.scale_b, bias, x2.dtype)
    if act_symmetric:  # offsets are all zero: symmetric codes always fit
        return y
    bm, bn, bk = (16, 16, 32) if interpreting() else (64, 128, 64)
    row_blocks = triton.cdiv(m, bm)
    split_n = 1 if interpreting() else max(1, min(8, 256 // row_blocks))  # one wave of programs up to M = 16384
    _fixup_rows_kernel[(row_blocks, split_n)](
        acts.codes.view(torch.uint8), acts.scale, acts.offset, w8.view(torch.uint8), layout.scale_b, layout.row_sums,
        y if bias is None else bias, y, m, n, k, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=1 if interpreting() else 4,
    )
    return y
