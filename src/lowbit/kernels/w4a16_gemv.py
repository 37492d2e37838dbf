"""The W4A16 batch-1 GEMV (decode): y = x W^T for one row x, W in ``w4a16``'s prepared layout.

Memory-bound: 4096x4096 is 8 MiB of packed words, ~2.5 us at the H100's 3.35 TB/s, so the kernel is built to have
the whole weight in flight at once and few instructions per weight:

- Many small CTAs. A CTA owns BNB groups of R = 4 rows and CHUNKS chunks of K (one load per thread, no K loop); the
  grid is (row tiles, K splits), so narrow N still fills 132 SMs. With more than one K split each CTA writes a
  float32 partial row and a second tiny kernel sums the splits in a fixed order (deterministic), adds the bias and
  casts; with one split the GEMV writes y itself.
- 16-byte loads: the R words of one K position are adjacent in the layout, so each thread loads its BNB groups'
  words as BNB 16-byte vectors (``ld.global.v4.b32``); the activations of that position (8, one per nibble plane)
  are loaded once per thread and reused for all BNB * R rows; scales and zeros once per chunk (a chunk lies in one
  group).
- Per weight one shift, one mask-or (LOP3) and one float32 FMA: the nibble c in the top mantissa bits of 1.0 is
  1 + c/16 exactly, and per chunk sum (c - z) x s = 16 s sum (1 + c/16) x - (16 + z) s sum x.

Tuning: on CUDA a small search (main kernel + reduction, timed together with L2 flushed) picks the tile per
(N, K, chunk, group) once; ``LOWBIT_AUTOTUNE=0`` and the CPU interpreter use one fixed tile.
"""

from __future__ import annotations

import os

import torch

from lowbit.kernels.dispatch import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

R = 4  # rows whose words at one K position are adjacent in the layout (w4a16.ROWS)
NIBBLE_MASK = 0x780000  # bits 19..22 of a float32; a runtime argument so it stays in a register
# (BNB row groups per CTA, CHUNKS per CTA, warps): 8-16 rows x 512-2048 codes per CTA, 2-16 KiB of words
CONFIGS = ((2, 16, 2), (4, 16, 2), (2, 32, 4), (4, 8, 2), (2, 8, 2), (8, 4, 1), (4, 8, 1), (2, 16, 1))
FIXED = (2, 4, 2)
_tuned: dict = {}

if triton is not None:
    _SUM = tl.standard._sum_combine  # tl.reduce with triton's combine: the interpreter maps it to numpy

    @triton.jit
    def _unit_code(words, mask, I: tl.constexpr):
        """1 + nibble I / 16 as a float32: one shift and one mask-or (LOP3) per weight."""
        if I < 5:
            moved = words << (19 - 4 * I)
        else:
            moved = words >> (4 * I - 19)
        return ((moved & mask) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, NP, K, ROW_STRIDE, NIBBLE_MASK,
                     HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, KW: tl.constexpr, R: tl.constexpr,
                     CPG: tl.constexpr, BNB: tl.constexpr, CHUNKS: tl.constexpr):
        # Tile (BNB row groups, CHUNKS, KW word positions, R rows): the R words are one 16-byte vector, threads
        # spread over (chunk, position), each holding all BNB groups, so one activation serves BNB * R rows.
        C: tl.constexpr = 8 * KW
        b = tl.arange(0, BNB)
        u = tl.arange(0, CHUNKS)
        j = tl.arange(0, KW)
        r = tl.arange(0, R)
        n_chunks = K // C
        grp = tl.program_id(0) * BNB + b
        chunk = tl.program_id(1) * CHUNKS + u
        c_ok = chunk < n_chunks
        ok = (grp < NP // R)[:, None] & c_ok[None, :]  # (BNB, CHUNKS)
        offs = (grp[:, None, None, None] * ROW_STRIDE + (chunk[:, None] * (KW * R) + j[None, :] * R)[None, :, :, None]
                + r[None, None, None, :])
        w = tl.load(w_ptr + offs, mask=ok[:, :, None, None], other=0)
        meta = (chunk // CPG)[None, :, None] * NP + (grp[:, None, None] * R + r[None, None, :])  # (BNB, CHUNKS, R)
        s = tl.load(s_ptr + meta, mask=ok[:, :, None], other=0).to(tl.float32)
        z = tl.load(z_ptr + meta, mask=ok[:, :, None], other=0).to(tl.float32)
        x_ptrs = x_ptr + chunk[:, None] * C + j[None, :]  # (CHUNKS, KW): plane i of a chunk is x[i*KW + j]
        part = tl.full((BNB, CHUNKS, KW, R), 0, tl.float32)
        x_sum = tl.full((CHUNKS, KW), 0, tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptrs + i * KW, mask=c_ok[:, None], other=0).to(tl.float32)
            part += _unit_code(w, NIBBLE_MASK, i) * xi[None, :, :, None]
            x_sum += xi
        # sum (c - z) x s = 16 s sum (1 + c/16) x - (16 + z) s sum x; the cancellation costs ~4 bits of 24
        t = (16.0 * s)[:, :, None, :] * part - ((z + 16.0) * s)[:, :, None, :] * x_sum[None, :, :, None]
        # chunks first: a thread holds several chunks of one position (in-register adds), then the lanes over KW
        y = tl.reshape(tl.reduce(tl.reduce(t, 1, _SUM), 1, _SUM), (BNB * R,))
        rows = tl.program_id(0) * (BNB * R) + tl.arange(0, BNB * R)
        if PARTIAL:  # float32 partial sums of this K split, summed in order by _reduce_kernel
            tl.store(out_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)
        else:
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=rows < N, other=0).to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _reduce_kernel(p_ptr, b_ptr, y_ptr, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        acc = tl.load(p_ptr + cols, mask=ok, other=0)
        for k in range(1, SPLITS):  # a fixed order: the same bits on every run
            acc += tl.load(p_ptr + k * N + cols, mask=ok, other=0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=ok, other=0).to(tl.float32)
        tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _launch(x, layout, bias, y, config) -> None:
    bnb, chunks, warps = config
    n, k = layout.out_features, layout.in_features
    kw = layout.chunk // 8
    splits = triton.cdiv(k // layout.chunk, chunks)
    partial = y.new_empty((splits, n), dtype=torch.float32) if splits > 1 else y
    grid = (triton.cdiv(layout.padded_rows // R, bnb), splits)
    _gemv_kernel[grid](x, layout.words, layout.scales, layout.zeros, y if bias is None else bias, partial, n,
                       layout.padded_rows, k, k // 8 * R, NIBBLE_MASK, HAS_BIAS=bias is not None,
                       PARTIAL=splits > 1, KW=kw, R=R, CPG=layout.group_size // layout.chunk, BNB=bnb,
                       CHUNKS=chunks, num_warps=warps)
    if splits > 1:
        _reduce_kernel[(triton.cdiv(n, 1024),)](partial, y if bias is None else bias, y, n, splits,
                                                HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)


def gemv(x: torch.Tensor, layout, bias: torch.Tensor | None) -> torch.Tensor:
    """y (1, N) in x.dtype for x (1, K) contiguous and a ``w4a16.W4A16Layout``."""
    y = torch.empty((1, layout.out_features), dtype=x.dtype, device=x.device)
    if interpreting() or os.environ.get("LOWBIT_AUTOTUNE", "1").strip() == "0":
        _launch(x, layout, bias, y, FIXED)
        return y
    key = (layout.out_features, layout.in_features, layout.chunk, layout.group_size, x.dtype, layout.scales.dtype,
           bias is not None, x.device)
    if key not in _tuned:  # time each tile once (main kernel and reduction together), keep the fastest
        times = {}
        for config in CONFIGS:
            try:
                times[config] = triton.testing.do_bench(lambda: _launch(x, layout, bias, y, config), warmup=5, rep=25)
            except Exception:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                continue
        _tuned[key] = min(times, key=times.get) if times else FIXED
    _launch(x, layout, bias, y, _tuned[key])
    return y
