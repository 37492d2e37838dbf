"""The W4A16 paths for M >= 2 rows: a fused tiled GEMM (decode batches and prefill), and whole-weight dequantize +
cuBLAS, chosen per shape by a small timed search on CUDA.

Fused GEMM, out^T = W x^T (the weight tile is the MMA's M side, the rows of x its narrow N side):

- One loop step reads a (BLOCK_N rows, WP word positions) tile of the planar words (``w4a16.W4A16Layout``) once,
  then runs 8 dots of K = WP, one per nibble plane: plane i of word position p holds code (p // KW) * C + i * KW +
  p % KW, so the activations a plane multiplies are contiguous runs of KW (16-byte loads, pipelined by Triton like
  the words: no reshapes or permutes of the dequantized tile, which stays in the dot operand's layout).
- Per weight one shift, one mask-or and one float32 FMA (1 + c/16 from the nibble in the top mantissa bits of
  1.0, times 16 s, minus (16 + z) s), then the cast to x.dtype; float32 activations compute (c - z) s rounded once,
  as ``weight.dequantize`` does, and use an IEEE float32 dot.
- Narrow N splits K over SPLITS CTAs (float32 partials summed by torch), so small-M decode fills the GPU.
- Offline sm_90 compile (triton 3.6): words and activations pipelined with cp.async, wgmma with the weight in
  registers (mma.sync for 32-row tiles), no spills for any listed tile, no shared-memory round trip of the tile.

Dequantize (``dequantize``): the weight in x.dtype, bit for bit ``weight.dequantize(dtype)``, written in whole
row segments (each CTA BLOCK_N rows x WP*8 contiguous codes, 16-byte stores along the row), then ``F.linear``.

Which runs: on CUDA, the first call of each (shape, dtypes, row bucket) times the candidate configs (and, above 64
rows, dequantize + cuBLAS) and keeps the fastest, eagerly (a call being captured into a CUDA graph that finds no
entry uses ``heuristic``). ``LOWBIT_AUTOTUNE=0`` and the CPU interpreter use ``heuristic``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lowbit.kernels.dispatch import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

R = 4  # rows whose words at one K position are adjacent in the layout (w4a16.ROWS)
NIBBLE_MASK = 0x780000  # bits 19..22 of a float32 (a runtime argument so it stays in a register)
MIN_CTAS = 2 * 132  # fewer output tiles than this: split K
DEQUANT = "dequant"  # the config meaning whole-weight dequantize + cuBLAS
# (BLOCK_N weight rows, WP word positions per step, warps, stages); BLOCK_M is the row bucket (<= 64) or listed
SMALL_TILES = ((64, 16, 4, 4), (64, 32, 4, 3), (128, 16, 4, 4), (128, 16, 8, 3), (32, 16, 4, 4), (32, 32, 4, 3))
# (BLOCK_N, BLOCK_M, WP, warps, stages) for M > 64: wgmma-sized tiles (64 weight rows per warpgroup)
LARGE_TILES = ((128, 128, 16, 8, 3), (128, 64, 16, 4, 4), (64, 128, 16, 4, 3), (128, 256, 16, 8, 3),
               (256, 128, 16, 8, 3), (128, 128, 32, 8, 2))
_tuned: dict = {}  # key -> config (a tuple, or DEQUANT)
tune_log: dict = {}  # key -> {config: milliseconds} of the search (benchmarks/w4a16_gemm_sweep.py reports it)

if triton is not None:

    @triton.jit
    def _unit_code(words, mask, I: tl.constexpr):
        """1 + nibble I / 16 as a float32: one shift and one mask-or per weight."""
        if I < 5:
            moved = words << (19 - 4 * I)
        else:
            moved = words >> (4 * I - 19)
        return ((moved & mask) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, NP, K, STEPS,
                     HAS_BIAS: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, GW: tl.constexpr,
                     EVEN_K: tl.constexpr, EXACT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     WP: tl.constexpr):
        C: tl.constexpr = 8 * KW
        ONE_GROUP: tl.constexpr = GW % WP == 0  # a step never straddles a group: one scale per row
        pid_k = tl.program_id(2)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = rn < NP
        m_ok = rm < M
        p = tl.arange(0, WP)
        x_vec = tl.max_contiguous(tl.multiple_of((p // KW) * C + p % KW, KW), KW)  # runs of KW codes
        words = K // 8
        w_rows = w_ptr + ((rn // R) * (words * R) + rn % R)[:, None]  # (BLOCK_N, 1)
        x_rows = x_ptr + (rm * K)[None, :]  # (1, BLOCK_M): the dot's right operand is x^T
        acc = tl.full((BLOCK_N, BLOCK_M), 0, tl.float32)
        first = pid_k * STEPS
        for step in range(first, tl.minimum(first + STEPS, (words + WP - 1) // WP)):
            pos = step * WP + p
            p_ok = (pos < words) | EVEN_K  # EVEN_K: no mask along K (16-byte loads, pipelined by cp.async)
            w = tl.load(w_rows + (pos * R)[None, :], mask=n_ok[:, None] & p_ok[None, :], other=0)
            if ONE_GROUP:
                meta = (step * WP // GW) * NP + rn
                s = tl.load(s_ptr + meta, mask=n_ok, other=0).to(tl.float32)[:, None]
                z = tl.load(z_ptr + meta, mask=n_ok, other=0).to(tl.float32)[:, None]
            else:
                meta = (pos // GW)[None, :] * NP + rn[:, None]
                s = tl.load(s_ptr + meta, mask=n_ok[:, None] & p_ok[None, :], other=0).to(tl.float32)
                z = tl.load(z_ptr + meta, mask=n_ok[:, None] & p_ok[None, :], other=0).to(tl.float32)
            s16 = 16.0 * s
            zs = (16.0 + z) * s
            x_pos = step * (8 * WP) + x_vec  # plane 0's codes; plane i adds i * KW
            x_ok = p_ok[:, None] & m_ok[None, :]
            for i in tl.static_range(8):
                # a literal mask (not a runtime argument): only then does Triton move the dot operand's layout up
                # to the words' load (one shared-memory read of the words, no store/load of the weight tile)
                unit = _unit_code(w, 0x780000, i)
                xt = tl.load(x_rows + (x_pos + i * KW)[:, None], mask=x_ok, other=0)  # (WP, BLOCK_M)
                if EXACT:  # float32 activations: (c - z) s rounded once, as weight.dequantize() does
                    wd = (unit * 16.0 - 16.0 - z) * s
                else:  # one FMA; the weight is rounded to 16 bits next anyway
                    wd = unit * s16 - zs
                if FP32_DOT:  # float32 (IEEE products), or the CPU interpreter, whose bf16 dot is wrong
                    acc = tl.dot(wd, xt.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(wd.to(x_ptr.dtype.element_ty), xt, acc)
        if HAS_BIAS:  # the first split adds it
            acc += tl.load(b_ptr + rn, mask=rn + pid_k * N < N, other=0).to(tl.float32)[:, None]
        out = y_ptr + pid_k * M * N + rm[None, :] * N + rn[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(rn < N)[:, None] & m_ok[None, :])

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUPS, GROUP_SIZE, NIBBLE_MASK, KW: tl.constexpr,
                           R: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
        # tile (BLOCK_N rows, CHUNKS, 8 planes, KW): the last three are CHUNKS * C contiguous codes of a row
        C: tl.constexpr = 8 * KW
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        chunk = tl.program_id(1) * CHUNKS + tl.arange(0, CHUNKS)
        j = tl.arange(0, KW)
        i = tl.arange(0, 8)
        ok = (rows < N)[:, None] & (chunk < K // C)[None, :]  # (BLOCK_N, CHUNKS)
        pos = chunk[:, None] * KW + j[None, :]  # (CHUNKS, KW)
        w = tl.load(w_ptr + ((rows // R) * (K // 8 * R) + rows % R)[:, None, None] + pos[None, :, :] * R,
                    mask=ok[:, :, None], other=0)
        meta = rows[:, None] * GROUPS + ((chunk * C) // GROUP_SIZE)[None, :]  # canonical (N, groups) float32
        s = tl.load(s_ptr + meta, mask=ok, other=1)[:, :, None, None]
        z = tl.load(z_ptr + meta, mask=ok, other=0)[:, :, None, None]
        shifts = (19 - 4 * i)[None, None, :, None]  # nibble i to bits 19..22: left for i < 5, right above
        w4 = w[:, :, None, :]
        moved = tl.where(shifts >= 0, w4 << tl.maximum(shifts, 0), w4 >> tl.maximum(-shifts, 0))
        code = ((moved & NIBBLE_MASK) | 0x3F800000).to(tl.float32, bitcast=True) * 16.0 - 16.0  # exact
        out = tl.reshape(((code - z) * s).to(out_ptr.dtype.element_ty), (BLOCK_N, CHUNKS * C))  # natural K order
        t = tl.arange(0, CHUNKS * C)  # whole row segments: a warp's stores cover contiguous bytes of one row
        offs = rows[:, None] * K + tl.program_id(1) * (CHUNKS * C) + t[None, :]
        tl.store(out_ptr + offs, out, mask=(rows < N)[:, None] & (tl.program_id(1) * CHUNKS + t // C < K // C)[None, :])


def dequantize(weight, layout, dtype: torch.dtype) -> torch.Tensor:
    """The weight (N, K) in ``dtype`` from the canonical float32 scales: bit for bit ``weight.dequantize(dtype)``."""
    n, k = layout.out_features, layout.in_features
    out = torch.empty((n, k), dtype=dtype, device=layout.words.device)
    kw = layout.chunk // 8
    block_n, chunks = (8, 2) if interpreting() else (16, max(1, 256 // layout.chunk))
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // layout.chunk, chunks))
    _dequantize_kernel[grid](layout.words, weight.scales, weight.zeros, out, n, k, k // layout.group_size,
                             layout.group_size, NIBBLE_MASK, KW=kw, R=R, BLOCK_N=block_n, CHUNKS=chunks,
                             num_warps=4)
    return out


def bucket(m: int) -> int:
    """The row bucket a config is tuned for: 16, 32, 64, then powers of two up to 4096."""
    return max(16, min(4096, triton.next_power_of_2(m)))


def auto_splits(layout, m: int, block_n: int, block_m: int, wp: int) -> int:
    """K splits so that the output tiles times splits reach MIN_CTAS, each split at least 4 steps."""
    tiles = triton.cdiv(layout.out_features, block_n) * triton.cdiv(m, block_m)
    steps = triton.cdiv(layout.in_features // 8, wp)
    return max(1, min(MIN_CTAS // tiles, steps // 4))


def candidates(layout, m: int) -> list:
    """Configs (BLOCK_N, BLOCK_M, WP, warps, stages, splits) the tuner times, plus DEQUANT above 64 rows."""
    b = bucket(m)
    if b <= 64:
        out = []
        for bn, wp, warps, stages in SMALL_TILES:
            splits = auto_splits(layout, m, bn, b, wp)  # and twice that: a tile count just above one wave has a tail
            steps = triton.cdiv(layout.in_features // 8, wp)
            for sp in sorted({1, splits, min(2 * splits, max(1, steps // 4))}):
                out.append((bn, b, wp, warps, stages, sp))
        return out
    return [(bn, bm, wp, w, st, 1) for bn, bm, wp, w, st in LARGE_TILES if bm <= b] + [DEQUANT]


def heuristic(layout, m: int):
    """The untuned choice (CPU interpreter: a small tile and one split unless K is long)."""
    if interpreting():
        return (32, 16 if m <= 16 else 32, 16, 1, 1, 2 if layout.in_features >= 1536 else 1)
    if m > 64:
        return DEQUANT if m >= 2048 else (128, 128, 16, 8, 3, 1)
    tile = (64, bucket(m), 16, 4, 4)
    return tile + (auto_splits(layout, m, tile[0], tile[1], tile[2]),)


def launch(x, weight, layout, bias, config) -> torch.Tensor:
    """y (M, N) in x.dtype with ``config`` (a tuple of ``candidates`` or DEQUANT)."""
    if config == DEQUANT:
        return F.linear(x, dequantize(weight, layout, x.dtype), bias)
    bn, bm, wp, warps, stages, splits = config
    (m, k), n = x.shape, layout.out_features
    steps = triton.cdiv(k // 8, wp)
    per_split = triton.cdiv(steps, max(1, min(splits, steps)))
    splits = triton.cdiv(steps, per_split)  # no empty split
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    fp32_dot = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    _gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), splits)](
        x, layout.words, layout.scales, layout.zeros, y if bias is None else bias, out, m, n, layout.padded_rows, k,
        per_split, HAS_BIAS=bias is not None, KW=layout.chunk // 8, R=R, GW=layout.group_size // 8,
        EVEN_K=k // 8 % wp == 0,        EXACT=x.dtype == torch.float32, FP32_DOT=fp32_dot, BLOCK_N=bn, BLOCK_M=bm, WP=wp, num_warps=warps,
        num_stages=stages)
    if splits > 1:
        y.copy_(out.sum(0))
    return y


def linear(x: torch.Tensor, weight, layout, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias for x (M >= 2, K) contiguous, choosing (and remembering) the fastest config on CUDA."""
    m = x.shape[0]
    if interpreting() or os.environ.get("LOWBIT_AUTOTUNE", "1").strip() == "0":
        return launch(x, weight, layout, bias, heuristic(layout, m))
    key = (layout.out_features, layout.in_features, layout.chunk, layout.group_size, x.dtype, layout.scales.dtype,
           bias is not None, bucket(m), x.device)
    if key not in _tuned:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: the heuristic, not remembered
            return launch(x, weight, layout, bias, heuristic(layout, m))
        times = {}
        for config in candidates(layout, m):
            try:
                times[config] = triton.testing.do_bench(lambda: launch(x, weight, layout, bias, config),
                                                        warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                continue
        _tuned[key] = min(times, key=times.get) if times else heuristic(layout, m)
        tune_log[key] = times
    return launch(x, weight, layout, bias, _tuned[key])
