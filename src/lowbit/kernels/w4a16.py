"""W4A16 linear: packed 4-bit weights, fp16/bf16/fp32 activations, dequantization inside the kernel.

``w4a16_linear(x, weight, bias)`` equals ``F.linear(x, weight.dequantize(x.dtype), bias)`` up to floating-point
rounding: the kernels accumulate in float32 and keep 16-bit scales when x is 16-bit (tests: |error| <= 2e-6, 2e-3,
1e-2 of sum |x||w| for float32, float16, bfloat16). Two paths, chosen by the number of rows M:

- M == 1 (decode), a GEMV on CUDA cores: one shift and one mask-or per weight put the nibble c in the top
  mantissa bits of 1.0, giving 1 + c/16 exactly; one FMA per weight accumulates it against x, and per group
  sum (c - z) x = 16 sum (1 + c/16) x - (16 + z) sum x removes the 1 (cancelling ~4 of float32's 24 bits).
  It lives in ``w4a16_gemv`` (one launch: row tiles, K split only for narrow N and reduced in-kernel, 16-byte loads).
- M >= 2, one tiled GEMM for decode batches and prefill alike: each weight tile is read packed and dequantized in
  registers with the GEMV's trick (1 + c/16 from a shift and a mask-or, then one FMA with 16 s and -(16 + z) s;
  float32 activations use (c - z) s rounded once, as ``weight.dequantize`` does), cast to x.dtype and fed to
  ``tl.dot`` as the left operand (out^T = W X^T) with float32 accumulation. Small M tunes narrow weight tiles
  and several chunks per step (memory-bound: many CTAs, many bytes in flight); large M tunes 128-256 wide tiles
  (compute-bound). ``_dequantize`` (dequantize the whole weight; bit for bit ``weight.dequantize``) stays as a
  building block for comparisons (the benchmark times it + cuBLAS as a yardstick).

Prepared layout (``W4A16Layout``, built once per weight, device and dtype): int32 words of 8 nibbles; within each
chunk of C = 8*KW codes (C the largest of 128/64/32/16 dividing the group size) word j holds codes j, KW+j, ...,
7KW+j, so the activations a nibble plane multiplies are contiguous; the words of 4 consecutive rows at one
position are adjacent (one 16-byte load). Scales and zeros are stored (groups, N) in x.dtype when every zero point
is exact in it, else float32. Weights of other widths, or group sizes not divisible by 16, run the reference.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for, interpreting
from lowbit.kernels.weights import PackedWeight

if "lowbit.kernels.w4a16_gemv" in sys.modules:  # this module is being reloaded (tests turn the interpreter on):
    importlib.reload(sys.modules["lowbit.kernels.w4a16_gemv"])  # define the GEMV's kernels again as well
from lowbit.kernels import w4a16_gemv  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 1
FUSED_GEMM_MAX_ROWS = 64  # above this, dequantize the weight and call cuBLAS (BENCHMARKS.md)
CHUNK_CHOICES = (128, 64, 32, 16)
# bits 19..22 of a float32: a nibble there is 1/16 of a unit of 1.0. Passed to the GEMV as a runtime argument so
# the compiler keeps it in a register instead of re-materialising the constant before every use.
NIBBLE_MASK = 0x780000
# 16-bit floats whose mantissa unit is 1.0: OR a nibble into the low bits and the value is BASE + nibble, exactly
SIXTEEN_BIT_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def check_linear_inputs(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, op: str) -> None:
    """One clear line for every way the inputs of a quantized linear can be wrong."""
    if not isinstance(weight, PackedWeight):
        raise LowbitError(f"{op} needs a lowbit.kernels.PackedWeight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise LowbitError(f"{op} needs float16, bfloat16 or float32 activations, got {got}")
    if x.dim() < 1 or x.shape[-1] != weight.in_features:
        raise LowbitError(
            f"{op}: activations end in {x.shape[-1] if x.dim() else 'nothing'} features but the weight expects "
            f"{weight.in_features} (shape {tuple(x.shape)} vs weight {weight.out_features}x{weight.in_features})"
        )
    if x.device != weight.device:
        raise LowbitError(f"{op}: activations on {x.device} but weight on {weight.device}; move one with .to()")
    if bias is not None and (bias.shape != (weight.out_features,) or not bias.is_floating_point()):
        raise LowbitError(f"{op}: bias must be a float tensor of shape ({weight.out_features},), got {tuple(bias.shape)}")


def w4a16_linear_reference(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: dequantize to x.dtype, then a plain linear."""
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


def w4a16_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(weight).T + bias for activations (..., K) in fp16/bf16/fp32; result in x.dtype."""
    check_linear_inputs(x, weight, bias, "w4a16_linear")
    if backend_for(x) == "reference" or weight.bits != 4 or chunk_size(weight.group_size) is None:
        return w4a16_linear_reference(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).contiguous()
    layout = prepare_w4a16(weight, x.dtype)
    b = None if bias is None else bias.to(x.dtype).contiguous()
    m = x2.shape[0]
    if m == 0:
        y = x2.new_empty((0, weight.out_features))
    elif m <= GEMV_MAX_ROWS:
        y = w4a16_gemv.gemv(x2, layout, b)
    elif m <= FUSED_GEMM_MAX_ROWS:
        y = _gemm(x2, layout, b)
    else:  # measured on the H100: dequantize + cuBLAS is 0.8-0.95x bf16 at M >= 2048, the fused GEMM only 0.1x
        y = F.linear(x2, _dequantize(weight, layout, x.dtype), b)
    return y.reshape(*lead, weight.out_features)


# ------------------------------------------------------------------------------------------------ prepared layout
ROWS = 4  # rows whose words at one K position are stored together (one 16-byte load; x reused across them)


@dataclass(frozen=True, eq=False)
class W4A16Layout:
    """The kernel's view of a 4-bit weight: planar words interleaved by ROWS rows, metadata (groups, N) in ``meta``."""

    words: torch.Tensor  # int32 (ceil(N / ROWS), K // 8, ROWS), padding rows all zero
    scales: torch.Tensor  # (groups, padded N), meta dtype
    zeros: torch.Tensor  # (groups, padded N), meta dtype, integer-valued
    chunk: int  # C: codes per planar chunk (8 * KW)
    group_size: int
    in_features: int
    out_features: int

    @property
    def padded_rows(self) -> int:
        return self.words.shape[0] * ROWS


def chunk_size(group_size: int) -> int | None:
    """The planar chunk: the largest of 128/64/32/16 dividing the group size (so a chunk lies in one group)."""
    return next((c for c in CHUNK_CHOICES if group_size % c == 0), None)


def planar_words(codes: torch.Tensor, chunk: int) -> torch.Tensor:
    """int32 (ceil(N/ROWS), K/8, ROWS): in each chunk of ``chunk`` codes word j holds codes i*KW + j in nibble i;
    the words of ROWS consecutive rows at one position are adjacent."""
    n, k = codes.shape
    kw = chunk // 8
    c = codes.to(torch.int64).reshape(n, k // chunk, 8, kw).transpose(2, 3)  # (N, chunks, j, i)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * 4
    words = (c << shifts).sum(-1)  # < 2^32, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n, k // 8)
    words = F.pad(words, (0, 0, 0, -n % ROWS))
    return words.reshape(-1, ROWS, k // 8).transpose(1, 2).contiguous()


def meta_dtype(weight: PackedWeight, dtype: torch.dtype) -> torch.dtype:
    """Scales and zeros in the activation dtype (half the bytes of float32) when every zero point is exact in it.

    A 16-bit scale changes each group's contribution by at most one rounding of that dtype, the same order as the
    reference's own rounding of the dequantized weight to x.dtype.
    """
    if dtype == torch.float32:
        return torch.float32
    info, s, z = torch.finfo(dtype), weight.scales, weight.zeros
    normal = bool((s >= info.tiny).all()) and bool((s <= info.max).all())  # no subnormal or infinite scale
    return dtype if normal and torch.equal(z.to(dtype).float(), z) else torch.float32


def prepare_w4a16(weight: PackedWeight, dtype: torch.dtype) -> W4A16Layout:
    """The planar layout of ``weight`` for activations of ``dtype``, built once and cached on the weight."""

    def build() -> W4A16Layout:
        chunk = chunk_size(weight.group_size)
        if weight.bits != 4 or chunk is None:
            raise LowbitError(
                f"the W4A16 kernel needs 4-bit weights with a group size divisible by 16, got {weight.bits}-bit "
                f"weights with group size {weight.group_size}"
            )
        meta = meta_dtype(weight, dtype)
        pad = -weight.out_features % ROWS

        def by_group(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t.T, (0, pad)).to(meta).contiguous()

        return W4A16Layout(
            planar_words(weight.codes(), chunk), by_group(weight.scales), by_group(weight.zeros), chunk,
            weight.group_size, weight.in_features, weight.out_features,
        )

    return weight.prepared(("w4a16", dtype), build)


def use_fixed_config() -> bool:
    """One fixed launch configuration instead of Triton's autotuning: always on the CPU interpreter, and on the GPU
    when ``LOWBIT_AUTOTUNE=0`` (tests of many small shapes, where tuning would cost more than it saves)."""
    return interpreting() or os.environ.get("LOWBIT_AUTOTUNE", "1").strip() == "0"


# ----------------------------------------------------------------------------------------------------- kernels
if triton is not None:
    # tl.reduce with triton's own combine function rather than tl.sum: the interpreter maps it to numpy even when
    # triton was imported before TRITON_INTERPRET was set (the tests reload this module under the interpreter)
    _SUM = tl.standard._sum_combine

    @triton.jit
    def _nibble_float(words, POS: tl.constexpr):
        """Nibble POS (0..4) of int32 words ORed into the low mantissa bits of a float whose mantissa unit is 1.0
        there: the float is exactly nibble + _nibble_base(POS)."""
        bits = (words & (15 << (4 * POS))) | ((150 - 4 * POS) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _nibble_base(POS: tl.constexpr):
        return tl.full([], (150 - 4 * POS) << 23, tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def _nibble(words, POS: tl.constexpr):
        """Nibble POS (0..4) of int32 words as an exact float32."""
        return _nibble_float(words, POS) - _nibble_base(POS)

    @triton.jit
    def _word_offsets(rows, pos, K, R: tl.constexpr):
        """Offsets of the words of ``rows`` at word positions ``pos`` along K (broadcast shapes)."""
        return (rows // R) * (K // 8 * R) + pos * R + rows % R

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, NP, K, M_BUCKET, NIBBLE_MASK,
                     HAS_BIAS: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, CPG: tl.constexpr,
                     EXACT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     KCH: tl.constexpr):
        # out^T = W X^T: the dequantized weight tile is the dot's left operand, which Hopper's wgmma reads from
        # registers (no shared-memory round trip for it), and the rows of x are the narrow N side (decode batches).
        # Per step KCH chunks: the words (BLOCK_N, KCH, KW) unpack plane by plane to (BLOCK_N, KCH, 8, KW), which
        # is the natural K order of the chunk, so the activation tile is one contiguous (BLOCK_M, KCH*C) load.
        C: tl.constexpr = 8 * KW
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        n_ok = rn < NP
        u = tl.arange(0, KCH)
        j = tl.arange(0, KW)
        kk = tl.arange(0, KCH * C)
        shifts = (tl.arange(0, 8) * 4)[None, None, :, None]
        n_chunks = K // C
        acc = tl.full((BLOCK_N, BLOCK_M), 0, tl.float32)
        for c0 in range(0, n_chunks, KCH):
            chunk = c0 + u
            c_ok = chunk < n_chunks
            pos = (chunk[:, None] * KW + j[None, :])[None, :, :]
            w = tl.load(w_ptr + _word_offsets(rn[:, None, None], pos, K, R),
                        mask=n_ok[:, None, None] & c_ok[None, :, None], other=0)
            meta = (chunk // CPG)[None, :] * NP + rn[:, None]  # (BLOCK_N, KCH)
            meta_ok = n_ok[:, None] & c_ok[None, :]
            s = tl.load(s_ptr + meta, mask=meta_ok, other=0).to(tl.float32)[:, :, None, None]
            z = tl.load(z_ptr + meta, mask=meta_ok, other=0).to(tl.float32)[:, :, None, None]
            # 1 + c/16 from one shift pair, one mask-or (the nibble in the top mantissa bits of 1.0)
            unit = ((((w[:, :, None, :] >> shifts) << 19) & NIBBLE_MASK) | 0x3F800000).to(tl.float32, bitcast=True)
            if EXACT:  # float32 activations: (c - z) * s rounded once, as weight.dequantize() does
                wd = (unit * 16.0 - 16.0 - z) * s
            else:  # one FMA: 16 s (1 + c/16) - (16 + z) s; the weight is then rounded to 16 bits anyway
                wd = unit * (16.0 * s) - (16.0 + z) * s
            xk = tl.load(x_ptr + rm[:, None] * K + c0 * C + kk[None, :],
                         mask=m_ok[:, None] & (c0 * C + kk < K)[None, :], other=0)
            if EXACT or UPCAST:  # float32 (IEEE products), or the CPU interpreter, whose bf16 dot is wrong
                acc = tl.dot(tl.reshape(wd, (BLOCK_N, KCH * C)), tl.trans(xk.to(tl.float32)), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(tl.reshape(wd.to(x_ptr.dtype.element_ty), (BLOCK_N, KCH * C)), tl.trans(xk), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=(rn < N)[:, None] & m_ok[None, :])

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUPS, GROUP_SIZE, KW: tl.constexpr,
                           R: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
        C: tl.constexpr = 8 * KW
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        chunk = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)
        j = tl.arange(0, KW)
        ok = (rows < N)[:, None] & (chunk < K // C)[None, :]
        w = tl.load(w_ptr + _word_offsets(rows[:, None, None], chunk[None, :, None] * KW + j[None, None, :], K, R),
                    mask=ok[:, :, None], other=0)
        meta = rows[:, None] * GROUPS + ((chunk * C) // GROUP_SIZE)[None, :]  # canonical (N, groups) float32
        s = tl.load(s_ptr + meta, mask=ok, other=1).to(tl.float32)[:, :, None]
        z = tl.load(z_ptr + meta, mask=ok, other=0).to(tl.float32)[:, :, None]
        out = out_ptr + rows[:, None, None] * K + chunk[None, :, None] * C + j[None, None, :]
        high = w >> 12
        for i in tl.static_range(8):
            if i < 5:
                code = _nibble(w, i)
            else:
                code = _nibble(high, i - 3)
            tl.store(out + i * KW, ((code - z) * s).to(out_ptr.dtype.element_ty), mask=ok[:, :, None])

    # (BLOCK_M rows of x, BLOCK_N weight rows, KCH chunks per step, warps, stages). Decode batches (M <= 64) are
    # memory-bound: narrow weight tiles for many CTAs, several chunks per step for bytes in flight. Prefill is
    # compute-bound: 128-256 wide tiles, one 128-code chunk per step, 3-4 stages.
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "KCH": kch}, num_warps=nw, num_stages=ns)
        for bm, bn, kch, nw, ns in (
            (16, 16, 4, 4, 3), (16, 32, 2, 4, 4), (16, 32, 4, 4, 3), (16, 64, 2, 4, 3), (16, 64, 1, 4, 4),
            (32, 32, 2, 4, 3), (32, 64, 2, 4, 3), (64, 64, 1, 4, 3), (64, 64, 2, 4, 3), (64, 128, 1, 4, 3),
            (128, 128, 1, 8, 3), (128, 128, 1, 4, 4), (64, 128, 1, 4, 4), (128, 256, 1, 8, 3), (256, 128, 1, 8, 3),
        )
    ]

    def _prune_gemm(configs, named_args, **kwargs):
        """Row tiles that fit the batch: the bucket's own size up to 64 rows, the 64-256 row tiles beyond."""
        bucket = named_args["M_BUCKET"]
        keep = [c for c in configs if (c.kwargs["BLOCK_M"] == bucket if bucket <= 64 else c.kwargs["BLOCK_M"] >= 64)]
        return keep or configs

    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "KW", "CPG"],
                                  prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_kernel)


def _gemm(x: torch.Tensor, layout: W4A16Layout, bias: torch.Tensor | None) -> torch.Tensor:
    (m, k), n = x.shape, layout.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bucket = max(16, triton.next_power_of_2(m)) if m <= 64 else 128
    args = (x, layout.words, layout.scales, layout.zeros, y if bias is None else bias, y, m, n, layout.padded_rows, k,
            bucket, NIBBLE_MASK)
    flags = dict(HAS_BIAS=bias is not None, KW=layout.chunk // 8, R=ROWS, CPG=layout.group_size // layout.chunk,
                 EXACT=x.dtype == torch.float32, UPCAST=use_fixed_config() and x.dtype == torch.bfloat16)
    if use_fixed_config():
        bm = min(bucket, 64)
        _gemm_kernel[(triton.cdiv(n, 32), triton.cdiv(m, bm))](*args, **flags, BLOCK_M=bm, BLOCK_N=32,
                                                               KCH=1)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
        _gemm_tuned[grid](*args, **flags)
    return y


def _dequantize(weight: PackedWeight, layout: W4A16Layout, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype`` from the canonical float32 scales: bit for bit ``weight.dequantize(dtype)``."""
    n, k = layout.out_features, layout.in_features
    out = torch.empty((n, k), dtype=dtype, device=layout.words.device)
    block_n, chunks = (16, 4) if use_fixed_config() else (32, 4)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // layout.chunk, chunks))
    _dequantize_kernel[grid](layout.words, weight.scales, weight.zeros, out, n, k, k // layout.group_size,
                             layout.group_size, KW=layout.chunk // 8, R=ROWS, BLOCK_N=block_n, CHUNKS=chunks,
                             num_warps=4)
    return out
