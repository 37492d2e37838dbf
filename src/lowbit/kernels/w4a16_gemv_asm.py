"""Inline-PTX inner step of the W4A16 GEMV: two weights per instruction, as Marlin / FasterTransformer dequantize.

Why: the plain-Triton GEMV spends ~4.4 SASS instructions per weight (shift, mask-or, float32 FMA per weight, plus
conversions and the zero-point correction); Triton does not emit packed 16-bit arithmetic from plain code. Here one
word (8 nibbles of one row, planes i = 0..7 of one chunk position) becomes one float32 term Sum_i (c_i - z) x_i:

- ``(q >> 4k) & 0x000f000f | MAGIC`` (SHF + LOP3) gives planes k and k + 4 as the 16-bit pair (B + c_k, B + c_k+4),
  B = 128 in bf16 (0x4300) or 1024 in fp16 (0x6400), both exact;
- one packed subtraction of (B + z, B + z) gives c - z exactly (small integers; z is an integer exact in x.dtype);
- a chain of four packed FMAs against the x pairs (x_k, x_k+4) sums the 8 products in two 16-bit lanes (4 terms
  each): this is the only rounding beyond the reference's, one 16-bit rounding per product and per add;
- the two lanes go to float32 and are added; the caller multiplies by the row's scale and accumulates in float32.

fp16 pairs hold x / 16 (exact outside subnormals; the caller multiplies y by 16), so a lane overflows only when
four products |x (c - z)| of one word reach ~16 * 65504 / 4, i.e. |x| ~ 17000 for |c - z| = 15.

The CPU interpreter cannot run inline PTX: ``w4a16_gemv`` selects this path only on CUDA (``asm_supported``),
where its tuner times it against the plain step per shape and keeps the faster.
``word_dot_reference`` is its PyTorch reference, rounding like the PTX, so CPU tests check its numerics.
"""

from __future__ import annotations

import torch

from lowbit.kernels.dispatch import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference needs no Triton
    triton = None

ASM_DTYPES = (torch.float16, torch.bfloat16)
X_SCALE = {torch.float16: 1.0 / 16, torch.bfloat16: 1.0}  # fp16 pairs hold x / 16: headroom against overflow


def _word_dot_ptx(magic: int, kind: str) -> str:
    """PTX for $0 (f32) = Sum_i (c_i - z) x_i of word $1, x pairs $2..$5 (planes k, k+4), zero point $6 (16-bit)."""
    to_f32 = (  # the two 16-bit lanes of a to float32, added
        "shl.b32 lo, a, 16;\n and.b32 hi, a, 0xffff0000;\n add.rn.f32 $0, lo, hi;"
        if kind == "bf16x2" else
        "mov.b32 {al, ah}, a;\n cvt.f32.f16 lo, al;\n cvt.f32.f16 hi, ah;\n add.rn.f32 $0, lo, hi;")
    return f"""{{
 .reg .b32 q1, q2, q3, v0, v1, v2, v3, m, bz, a, lo, hi;
 .reg .b16 al, ah;
 shr.u32 q1, $1, 4;
 shr.u32 q2, $1, 8;
 shr.u32 q3, $1, 12;
 lop3.b32 v0, $1, 0x000f000f, {magic:#x}, 0xea;
 lop3.b32 v1, q1, 0x000f000f, {magic:#x}, 0xea;
 lop3.b32 v2, q2, 0x000f000f, {magic:#x}, 0xea;
 lop3.b32 v3, q3, 0x000f000f, {magic:#x}, 0xea;
 mov.b32 m, {magic:#x};
 mov.b32 bz, {{$6, $6}};
 add.rn.{kind} bz, bz, m;
 sub.rn.{kind} v0, v0, bz;
 sub.rn.{kind} v1, v1, bz;
 sub.rn.{kind} v2, v2, bz;
 sub.rn.{kind} v3, v3, bz;
 mul.rn.{kind} a, v0, $2;
 fma.rn.{kind} a, v1, $3, a;
 fma.rn.{kind} a, v2, $4, a;
 fma.rn.{kind} a, v3, $5, a;
 {to_f32}
}}"""


def asm_supported(x_dtype: torch.dtype, meta_dtype: torch.dtype) -> bool:
    """The PTX path runs on CUDA (not the interpreter) for 16-bit x with scales and zeros stored in x.dtype."""
    return triton is not None and not interpreting() and x_dtype in ASM_DTYPES and meta_dtype == x_dtype


if triton is not None:
    BF16_DOT: tl.constexpr = tl.constexpr(_word_dot_ptx(0x43004300, "bf16x2"))
    F16_DOT: tl.constexpr = tl.constexpr(_word_dot_ptx(0x64006400, "f16x2"))

    @triton.jit
    def _pair(x_ptrs, x_ok, K: tl.constexpr, KW: tl.constexpr, F16: tl.constexpr):
        """x of planes K and K + 4 at each chunk position as one 32-bit pair (x / 16 in fp16), low lane plane K."""
        lo = tl.load(x_ptrs + K * KW, mask=x_ok, other=0)
        hi = tl.load(x_ptrs + (K + 4) * KW, mask=x_ok, other=0)
        lo = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF  # 32-bit lanes: 16-bit registers made ptxas spill
        pair = lo | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)
        if F16:  # both lanes / 16 in one packed multiply (0x2c00 = 1/16)
            pair = tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x2c002c00; mul.rn.f16x2 $0, $1, m; }",
                                             "=r,r", [pair], dtype=tl.int32, is_pure=True, pack=1)
        return pair

    @triton.jit
    def asm_step(w, z, x_ptrs, x_ok, KW: tl.constexpr, F16: tl.constexpr):
        """Sum_i (c_i - z) x_i (float32, fp16: / 16) for words w (CHUNKS, KW, BNB, R), zero points z (x.dtype,
        broadcast over positions) and the activations at x_ptrs (CHUNKS, KW)."""
        p0 = _pair(x_ptrs, x_ok, 0, KW, F16)[:, :, None, None]
        p1 = _pair(x_ptrs, x_ok, 1, KW, F16)[:, :, None, None]
        p2 = _pair(x_ptrs, x_ok, 2, KW, F16)[:, :, None, None]
        p3 = _pair(x_ptrs, x_ok, 3, KW, F16)[:, :, None, None]
        zb = z.to(tl.int16, bitcast=True)
        if F16:
            return tl.inline_asm_elementwise(F16_DOT, "=f,r,r,r,r,r,h", [w, p0, p1, p2, p3, zb], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.inline_asm_elementwise(BF16_DOT, "=f,r,r,r,r,r,h", [w, p0, p1, p2, p3, zb], dtype=tl.float32,
                                         is_pure=True, pack=1)


def word_dot_reference(words: torch.Tensor, x: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """What the PTX computes, rounding as it does: float32 Sum_i (c_i - z) x_i for int32 ``words`` (...), ``x``
    (..., 8) in fp16/bf16 (plane i's activation) and ``zeros`` (...) in x.dtype; fp16 results are x / 16 based."""
    dtype = x.dtype
    codes = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], -1).to(torch.float64)
    d = (codes - zeros.double()[..., None]).to(dtype).double()  # exact: small integers
    xs = (x.double() * X_SCALE[dtype]).to(dtype).double()
    lanes = []
    for plane in (0, 4):  # the low lane holds planes 0..3, the high lane 4..7
        a = (d[..., plane] * xs[..., plane]).to(dtype)  # mul.rn: one rounding
        for k in range(1, 4):  # fma.rn: the exact product plus a, one rounding
            a = (d[..., plane + k] * xs[..., plane + k] + a.double()).to(dtype)
        lanes.append(a.float())
    return lanes[0] + lanes[1]


def gemv_reference(x: torch.Tensor, layout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The inline-PTX GEMV in PyTorch: ``word_dot_reference`` on every word, times the rows' scales, summed in
    float32 (in another order than the kernel), x16 for fp16; y (1, N) in x.dtype for x (1, K) and a W4A16Layout."""
    k, kw, rows = layout.in_features, layout.chunk // 8, layout.padded_rows
    positions = torch.arange(k // 8, device=x.device)
    groups = positions // kw // (layout.group_size // layout.chunk)  # each word position's group
    words = layout.words.permute(0, 2, 1).reshape(rows, k // 8)  # (rows, position)
    planes = x.reshape(k // layout.chunk, 8, kw).transpose(1, 2).reshape(1, k // 8, 8).expand(rows, -1, -1)
    dots = word_dot_reference(words, planes, layout.zeros[groups].T)
    y = (dots * layout.scales[groups].T.float()).sum(-1)[: layout.out_features] / X_SCALE[x.dtype]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)[None]
