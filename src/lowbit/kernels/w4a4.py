"""WxAx linear (W4A4 first): activations quantized per token on the fly, integer GEMM, scales in the epilogue.

``wxax_linear(x, weight, act_bits, act_symmetric, bias)`` is, by definition (``wxax_linear_reference``),
``F.linear(fake_quantize(x, QuantSpec(act_bits, act_symmetric, "token")), weight.dequantize(), bias)`` in float32,
cast to x.dtype. Two GPU paths compute it on integer codes and round in the epilogue:

- The INT8 Triton GEMM (below): exact integer sums. The default below ``w4a4_fp8.FP8_MIN_TOKENS`` tokens, for
  grouped weights and for act_bits > 4.
- From 2048 tokens, for 4-bit per-channel weights and act_bits <= 4: FP8 codes and cuBLAS's FP8 GEMM
  (``lowbit.kernels.w4a4_fp8``), 0.98-1.44x bf16 on an H100 against the INT8 path's 0.97-1.21x (BENCHMARKS.md).
  Its sums are exact except where long chains of large same-sign codes meet Hopper's short FP8 accumulator; there
  they stay within 1e-3 of sum |a| |w| (measured 7.8e-4 at worst): below half a bf16 ulp of the output unless the
  sum cancels.
  ``path="int8"`` forces the exact path.

The INT8 path:

1. ``quantize_activations``: one Triton program per token row computes the row's scale and zero point with the
   quantizer's float32 operations (correctly rounded divisions, round-half-to-even), and writes int8 codes
   ``a = q - shift`` (shift = 2^(bits-1) for asymmetric codes, 0 for symmetric), plus per-group row sums of ``a``.
   The same kernel writes the FP8 path's codes; it reads a row in chunks (``launch_quantize_rows`` says why).
2. ``lowbit.kernels.int8_gemm``: for every weight group g, ``sum_k (q - zx)(c - zw)`` with ``q - zx = a + alpha``
   and ``c - zw = b + beta`` expands into ``sum a b`` (int8 tensor cores, int32 accumulation, 4-bit weights
   unpacked from nibbles in the kernel) ``+ beta sum a + alpha sum b + G alpha beta`` (rank-1 corrections from
   row sums); then y = sx * sum_g sw_g * (that) + bias in float32.

The integer part is exact; the float32 epilogue differs from the reference's float32 matmul by rounding only:
tests allow 2e-5 relative to sum |x_q| |w| (plus one rounding of the output dtype). All act_bits 2..8 and weight
bits 2..8 run the same int8 kernel (4-bit weights stay packed, other widths are stored as int8 codes in the
prepared layout). Group sizes not divisible by 64 run the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for, interpreting
from lowbit.kernels.w4a16 import check_linear_inputs
from lowbit.kernels.weights import PackedWeight
from lowbit.quant.quantizer import MAX_BITS, MIN_BITS, SCALE_MAX, SCALE_MIN, QuantSpec, fake_quantize, quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None


def check_act_bits(act_bits: int) -> None:
    if not isinstance(act_bits, int) or not MIN_BITS <= act_bits <= MAX_BITS:
        raise LowbitError(f"act_bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {act_bits!r}")


def wxax_linear_reference(x: torch.Tensor, weight: PackedWeight, act_bits: int, act_symmetric: bool = False,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: per-token fake quantization of x, dequantized weight, float32 linear, cast to x.dtype."""
    xq = fake_quantize(x.float(), QuantSpec(act_bits, act_symmetric, "token"))
    y = F.linear(xq, weight.dequantize(torch.float32), None if bias is None else bias.float())
    return y.to(x.dtype)


PATHS = ("auto", "fp8", "int8")
# chunk of a row the activation quantizer reads at once: 2048 (4 warps) beat 4096 (8 warps) by 14-21% on the H100
# (benchmarks/act_quant_sweep.py: K = 4096 and 11008, M = 2048 and 8192; 1.1-1.5 -> 1.3-1.9 TB/s)
ACT_CHUNK = 2048
FP8_AUTO = True  # "auto" takes FP8 where w4a4_fp8.use_fp8 says (M >= 2048, per-channel 4-bit weights)


def wxax_linear(x: torch.Tensor, weight: PackedWeight, act_bits: int, act_symmetric: bool = False,
                bias: torch.Tensor | None = None, *, path: str = "auto", cache_weight: bool = False) -> torch.Tensor:
    """y = fake_quantize_per_token(x) @ dequantize(weight).T + bias, computed in integers on the GPU path.

    ``path="auto"`` takes the FP8 path where ``w4a4_fp8.use_fp8`` says so, else the INT8 Triton GEMM; ``"int8"``
    forces the INT8 GEMM (the previous path, kept for benchmarks), ``"fp8"`` the FP8 path (an error where it does
    not apply). ``cache_weight`` keeps the FP8 path's unpacked weight on ``weight`` (1 byte per weight) instead of
    unpacking it at every call, the default."""
    check_linear_inputs(x, weight, bias, "wxax_linear")
    check_act_bits(act_bits)
    if path not in PATHS:
        raise LowbitError(f"wxax_linear path must be one of {', '.join(PATHS)}, got {path!r}")
    if backend_for(x) == "reference":
        return wxax_linear_reference(x, weight, act_bits, act_symmetric, bias)
    from lowbit.kernels import w4a4_fp8
    from lowbit.kernels.int8_gemm import wxax_gemm

    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*lead, weight.out_features))
    if path == "fp8" and not w4a4_fp8.fp8_applies(x2, weight, act_bits, bias):
        raise LowbitError("wxax_linear path='fp8' needs a 4-bit per-channel weight whose codes minus zero point fit "
                          "[-16, 16], act_bits <= 4, K and N multiples of 16, fp16/bf16 x and bias of x's dtype")
    if path == "fp8" or (path == "auto" and FP8_AUTO and w4a4_fp8.use_fp8(x2, weight, act_bits, bias)):
        y = w4a4_fp8.wxax_fp8_linear(x2, weight, act_bits, act_symmetric, bias, cache_weight)
    elif gemm_block_k(weight.group_size) is None:
        return wxax_linear_reference(x, weight, act_bits, act_symmetric, bias)
    else:
        acts = quantize_activations(x2, act_bits, act_symmetric, weight.group_size)
        y = wxax_gemm(acts, prepare_wxax(weight), None if bias is None else bias.float().contiguous(), x.dtype)
    return y.reshape(*lead, weight.out_features)


# ------------------------------------------------------------------------------------- activation quantization
class QuantizedActivations(NamedTuple):
    """int8 codes a = q - shift (M, K); per-token scale and alpha = shift - zero (M,); row sums of a (groups, M)."""

    codes: torch.Tensor
    scale: torch.Tensor
    alpha: torch.Tensor
    row_sums: torch.Tensor


def act_shift(bits: int, symmetric: bool) -> int:
    """What is subtracted from the quantizer's codes to make them int8: 2^(bits-1) for unsigned (asymmetric) codes."""
    return 0 if symmetric else 2 ** (bits - 1)


def quantize_activations_reference(x: torch.Tensor, bits: int, symmetric: bool, group_size: int
                                   ) -> QuantizedActivations:
    """``lowbit.quant.quantizer.quantize`` per token, in the integer form the GEMM consumes."""
    m, k = x.shape
    qt = quantize(x.float(), QuantSpec(bits, symmetric, "token"))
    shift = act_shift(bits, symmetric)
    codes = (qt.q - shift).to(torch.int8)
    alpha = torch.zeros(m, device=x.device) if qt.zero is None else shift - qt.zero.reshape(m)
    sums = codes.to(torch.int32).reshape(m, k // group_size, group_size).sum(-1).T.float().contiguous()
    return QuantizedActivations(codes, qt.scale.reshape(m).contiguous(), alpha.float().contiguous(), sums)


def quantize_activations(x: torch.Tensor, bits: int, symmetric: bool, group_size: int, max_chunk: int = ACT_CHUNK
                         ) -> QuantizedActivations:
    """Per-token quantization of a 2-D x: the Triton kernel or the reference, equal bit for bit. ``max_chunk``: see
    ``launch_quantize_rows`` (tests make it small to run several chunks per row)."""
    if x.dim() != 2 or x.shape[1] % group_size:
        raise LowbitError(f"quantize_activations needs (M, K) with K divisible by {group_size}, got {tuple(x.shape)}")
    check_act_bits(bits)
    if backend_for(x) == "reference":
        return quantize_activations_reference(x, bits, symmetric, group_size)
    m, k = x.shape
    groups = k // group_size
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    alpha = torch.empty(m, dtype=torch.float32, device=x.device)
    sums = torch.empty((groups, m), dtype=torch.float32, device=x.device)
    pow2_groups = group_size & (group_size - 1) == 0
    launch_quantize_rows(x, codes, scale, alpha, sums, bits, symmetric,
                         group_size if (groups > 1 and pow2_groups) else 0, max_chunk)
    if groups > 1 and not pow2_groups:  # the kernel sums whole rows only; split them here
        sums = codes.to(torch.int32).reshape(m, groups, group_size).sum(-1).T.float().contiguous()
    return QuantizedActivations(codes, scale, alpha, sums)


def launch_quantize_rows(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, alpha: torch.Tensor,
                         sums: torch.Tensor | None, bits: int, symmetric: bool, group: int, max_chunk: int = ACT_CHUNK,
                         num_warps: int | None = None) -> None:
    """Run ``_quantize_rows_kernel`` on a contiguous (M, K) x: int8 codes (with row sums per ``group``, 0 for whole
    rows) or, when ``codes`` is float8_e4m3fn, the FP8 form of ``lowbit.kernels.w4a4_fp8`` (no sums).

    One program per row, reading the row in chunks of at most ``max_chunk`` elements (16 per thread, 4 warps, at
    2048, the default): K is not padded to a power of two (11008 was padded to 16384 before, and 16 warps held one row, which
    made K = 11008 cost twice its bytes' share), and registers stay light enough for several rows per SM. A group
    wider than a chunk widens the chunk, so group sums never straddle two chunks. ``num_warps`` None: one warp per
    512 elements of a chunk, at most 8 (``benchmarks/act_quant_sweep.py`` times the alternatives)."""
    m, k = x.shape
    fp8 = codes.dtype == torch.float8_e4m3fn
    chunk, warps = act_launch(k, max_chunk, group, num_warps)
    _quantize_rows_kernel[(m,)](
        x.contiguous(), codes, scale, alpha, codes if sums is None else sums, m, k,
        QMIN=-(2 ** (bits - 1)) if symmetric else 0, QMAX=2 ** (bits - 1) - 1 if symmetric else 2**bits - 1,
        SHIFT=act_shift(bits, symmetric), SYMMETRIC=symmetric, GROUP=group, FP8=fp8, CHUNK=chunk,
        num_warps=1 if interpreting() else warps,
    )


def act_launch(k: int, max_chunk: int = ACT_CHUNK, group: int = 0, num_warps: int | None = None) -> tuple[int, int]:
    """The chunk width and warps per row ``launch_quantize_rows`` uses for rows of width ``k``."""
    chunk = max(min(1 << max(k - 1, 0).bit_length(), 1 << max(max_chunk - 1, 0).bit_length()), group)
    return chunk, num_warps or max(1, min(8, chunk // 512))


if triton is not None:
    _SCALE_MIN = tl.constexpr(SCALE_MIN)
    _SCALE_MAX = tl.constexpr(SCALE_MAX)
    # triton's own combine functions (not tl.max/tl.sum): the interpreter maps them to numpy even when triton was
    # imported before TRITON_INTERPRET was set (the tests reload this module under the interpreter)
    _MAX, _MIN, _SUM = tl.standard._elementwise_max, tl.standard._elementwise_min, tl.standard._sum_combine

    @triton.jit
    def _round_half_even(v):
        """torch.round in float32: below 2^23 adding and removing 2^23 rounds to an integer (ties to even)."""
        big = tl.where(v >= 0, 8388608.0, -8388608.0)
        return tl.where(tl.abs(v) < 8388608.0, (v + big) - big, v)

    @triton.jit
    def _quantize_chunk(g, ok, k0, cols, row, M, K, scale, zero, sub, codes_ptr, sums_ptr, QMIN: tl.constexpr,
                        QMAX: tl.constexpr, GROUP: tl.constexpr, FP8: tl.constexpr, CHUNK: tl.constexpr):
        """Codes q - sub of the chunk at k0 of a row (stored as FP8 or int8); returns them as int32 (row sums)."""
        offs = row.to(tl.int64) * K + k0 + cols
        q = _round_half_even(tl.math.div_rn(g, scale)) + zero
        q = tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0)
        c = tl.where(ok, q - sub, 0.0)
        if FP8:
            tl.store(codes_ptr + offs, c.to(tl.float8e4nv), mask=ok)
        else:
            tl.store(codes_ptr + offs, c.to(tl.int8), mask=ok)
        a = c.to(tl.int32)
        if GROUP > 0:  # chunks hold whole groups: CHUNK is a multiple of GROUP and starts on a group boundary
            per_group = tl.reduce(tl.reshape(a, (CHUNK // GROUP, GROUP)), 1, _SUM)
            gidx = k0 // GROUP + tl.arange(0, CHUNK // GROUP)
            tl.store(sums_ptr + gidx * M + row, per_group.to(tl.float32), mask=gidx < K // GROUP)
        return a

    @triton.jit
    def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, alpha_ptr, sums_ptr, M, K, QMIN: tl.constexpr,
                              QMAX: tl.constexpr, SHIFT: tl.constexpr, SYMMETRIC: tl.constexpr,
                              GROUP: tl.constexpr, FP8: tl.constexpr, CHUNK: tl.constexpr):
        """One row per program, in CHUNK-wide pieces: pass 1 finds the range (the first chunk stays in registers),
        pass 2 writes the codes (later chunks are read again, from L1/L2: the row was just read)."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * K
        cols = tl.arange(0, CHUNK)
        ok0 = cols < K
        g0 = tl.load(x_ptr + base + cols, mask=ok0, other=0).to(tl.float32)
        if SYMMETRIC:
            hi = tl.where(ok0, tl.abs(g0), 0.0)
        else:
            hi = tl.where(ok0, g0, float("-inf"))
        lo = tl.where(ok0, g0, float("inf"))
        for k0 in range(CHUNK, K, CHUNK):
            ok = k0 + cols < K
            g = tl.load(x_ptr + base + k0 + cols, mask=ok, other=0).to(tl.float32)
            if SYMMETRIC:
                hi = tl.maximum(hi, tl.where(ok, tl.abs(g), 0.0))
            else:
                hi = tl.maximum(hi, tl.where(ok, g, float("-inf")))
                lo = tl.minimum(lo, tl.where(ok, g, float("inf")))
        if SYMMETRIC:
            amax = tl.reduce(hi, 0, _MAX)
            scale = tl.minimum(tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), _SCALE_MIN), _SCALE_MAX)
            zero = scale * 0.0
        else:
            xmax = tl.reduce(hi, 0, _MAX)
            xmin = tl.reduce(lo, 0, _MIN)
            scale = tl.minimum(tl.maximum(tl.math.div_rn(xmax - xmin, QMAX * 1.0), _SCALE_MIN), _SCALE_MAX)
            zero = _round_half_even(tl.math.div_rn(-xmin, scale))
        if FP8:  # q - zero when every code of the row is an integer in [-16, 16], else q - SHIFT and an offset
            fits = (QMIN - zero >= -16.0) & (QMAX - zero <= 16.0)
            sub = tl.where(fits, zero, SHIFT * 1.0)
            tl.store(alpha_ptr + row, tl.where(fits, 0.0, SHIFT - zero))
        else:
            sub = zero * 0.0 + SHIFT
            tl.store(alpha_ptr + row, SHIFT - zero)
        tl.store(scale_ptr + row, scale)
        total = _quantize_chunk(g0, ok0, 0, cols, row, M, K, scale, zero, sub, codes_ptr, sums_ptr, QMIN, QMAX,
                                GROUP, FP8, CHUNK)
        for k0 in range(CHUNK, K, CHUNK):
            ok = k0 + cols < K
            g = tl.load(x_ptr + base + k0 + cols, mask=ok, other=0).to(tl.float32)
            total += _quantize_chunk(g, ok, k0, cols, row, M, K, scale, zero, sub, codes_ptr, sums_ptr,
                                     QMIN, QMAX, GROUP, FP8, CHUNK)
        if not FP8 and GROUP == 0:
            tl.store(sums_ptr + row, tl.reduce(total, 0, _SUM).to(tl.float32))


# ---------------------------------------------------------------------------------------------- prepared weight
@dataclass(frozen=True, eq=False)
class WXAXLayout:
    """The GEMM's view of a weight: int8-ready codes b = c - shift and per-group epilogue terms, (groups, N)."""

    qweight: torch.Tensor  # uint8 (N, K/2) nibbles split per BLOCK_K block if packed, else int8 (N, K)
    packed: bool
    block_k: int
    scales: torch.Tensor  # float32 (groups, N)
    beta: torch.Tensor  # float32 (groups, N): shift - zero
    code_sums: torch.Tensor  # float32 (groups, N): sum of b over the group
    group_size: int
    in_features: int
    out_features: int


def gemm_block_k(group_size: int) -> int | None:
    """The GEMM's K block: 128 or 64 dividing the group size (a block never spans two groups)."""
    return next((b for b in (128, 64) if group_size % b == 0), None)


def split_nibbles(codes: torch.Tensor, block_k: int) -> torch.Tensor:
    """uint8 (N, K/2): in each block of ``block_k`` codes, byte j holds code j (low) and code j + block_k/2 (high)."""
    n, k = codes.shape
    halves = codes.to(torch.uint8).reshape(n, k // block_k, 2, block_k // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def prepare_wxax(weight: PackedWeight, unpacked: bool = False) -> WXAXLayout:
    """The GEMM layout of ``weight``, built once and cached on it. ``unpacked`` stores 4-bit codes as int8 too (twice
    the bytes, no unpacking in the kernel): what ``benchmarks/inference_kernels.py`` compares against."""

    def build() -> WXAXLayout:
        block_k = gemm_block_k(weight.group_size)
        if block_k is None:
            raise LowbitError(f"the integer GEMM needs a group size divisible by 64, got {weight.group_size}")
        n, k, g = weight.out_features, weight.in_features, weight.group_size
        codes = weight.codes().to(torch.int32)
        packed = weight.bits == 4 and not unpacked
        shift = 0 if weight.bits < 8 else 128  # unsigned codes below 8 bits already fit int8
        b = codes - shift
        qweight = split_nibbles(codes, block_k) if packed else b.to(torch.int8).contiguous()
        code_sums = b.reshape(n, k // g, g).sum(-1).float()
        return WXAXLayout(
            qweight, packed, block_k, weight.scales.T.contiguous(), (shift - weight.zeros).T.contiguous(),
            code_sums.T.contiguous(), g, k, n,
        )

    return weight.prepared(("wxax", unpacked), build)
