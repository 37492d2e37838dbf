"""The W4A16 batch-1 GEMV (decode): y = x W^T for one row x, W in ``w4a16``'s prepared layout.

Memory-bound: 4096x4096 is 8 MiB of packed words, ~2.5 us at the H100's 3.35 TB/s; at that size a kernel launch and
its tail cost as much as the reads, so every call is ONE launch:

- A CTA owns BNB groups of R = 4 rows and loops over its share of K, CHUNKS chunks per step, accumulating the tile
  (BNB, CHUNKS, KW, R) elementwise in float32 registers; the reduction over K (in-thread, then across lanes and
  warps) happens once, at the end. No split when the row tiles alone fill the GPU (every LLaMA shape): the CTA
  writes y (+ bias) itself.
- Narrow N (few row tiles) splits K over SPLITS CTAs per row tile, reduced inside the same launch: each CTA stores
  its float32 partial, then bumps the tile's counter (acq_rel); the CTA that sees SPLITS - 1 is the last, sums
  the partials in split order (the same bits every run), adds the bias, writes y and resets the counter to zero,
  so the counters stay reusable (also across CUDA-graph replays). Counters: eager calls keep one zeroed tensor per
  (device, stream) (two streams never share one); a call being captured into a CUDA graph gets its own zeroed
  counters (a fill node in the graph: a cached tensor made during capture is only zeroed when that graph replays).
- 16-byte loads: the R words of one K position are adjacent in the layout, so each thread loads its BNB groups'
  words as BNB 16-byte vectors; the activations of that position (8, one per nibble plane) are loaded once per
  thread and reused for all BNB * R rows; scales and zeros once per chunk (a chunk lies in one group).
- Per weight one shift, one mask-or (LOP3) and one float32 FMA: the nibble c in the top mantissa bits of 1.0 is
  1 + c/16 exactly, and per chunk sum (c - z) x s = 16 s sum (1 + c/16) x - (16 + z) s sum x.

Measured on the H100 (CUDA graphs, bf16, group 128; benchmarks/gemv_sweep.py): 10.2 / 21.6 / 23.9 / 25.0 us for
4096x4096 / 11008x4096 / 4096x11008 / 14336x4096, against 10.8 / 21.6 / 23.1 / 26.2 for the two-kernel version
before it and 6.9 / 15.2 / 15.6 / 18.4 for torch's tinygemm: removing the second launch was worth ~0.5 us, not the
gap. What limits it now is ~7 instructions per weight (the x loads, conversions and sums, the cross-lane reduction
and address arithmetic on top of the 3 per weight) run after, not during, the loads: ~2 us of issue per 8 MiB that
a deeper pipeline (prefetching the next step's words while computing this one) would hide.

Tuning: on CUDA a small search (L2 flushed) picks (BNB, CHUNKS, warps, splits) per (N, K, chunk, group, dtypes) once,
eagerly (a call under graph capture that finds no tuned entry uses the heuristic tile); ``LOWBIT_AUTOTUNE=0`` and
the CPU interpreter use the heuristic tile.
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
# (BNB row groups per CTA, CHUNKS per loop step, warps): 4-8 rows per CTA, 1-8 KiB of words per step. Measured on
# the H100 (benchmarks/gemv_sweep.py): 2,16,4 is best or within 5% on 4096-14336 x 4096-11008; 1,32,4 on 1024x4096;
# 64-128 chunk steps were 1.5-4x slower everywhere (register-bound occupancy) and are not tried, nor 1,32,2 (never
# best; spills on triton 3.9). No tile spills for sm_90 on triton 3.6 or 3.9 (56-200 registers).
TILES = ((2, 16, 4), (1, 16, 2), (1, 16, 4), (1, 32, 4), (2, 32, 4), (2, 32, 8), (2, 8, 2), (1, 8, 1))
MIN_CTAS = 2 * 132  # fewer row tiles than this: split K (split-K lost to no split at 256 row tiles on the H100)
_tuned: dict = {}  # (shape, dtypes, device) -> (bnb, chunks, warps, splits)
_counters: dict = {}  # (device, stream) -> zeroed int32 counters (the last CTA of a split tile resets its own)

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
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, N, NP, K, ROW_STRIDE, CPS, SPLITS,
                     NIBBLE_MASK, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, KW: tl.constexpr, R: tl.constexpr,
                     CPG: tl.constexpr, BNB: tl.constexpr, CHUNKS: tl.constexpr):
        # Tile (BNB row groups, CHUNKS, KW word positions, R rows): the R words are one 16-byte vector, threads
        # spread over (chunk, position), each holding all BNB groups, so one activation serves BNB * R rows.
        C: tl.constexpr = 8 * KW
        b = tl.arange(0, BNB)
        u = tl.arange(0, CHUNKS)
        j = tl.arange(0, KW)
        r = tl.arange(0, R)
        tile = tl.program_id(0)
        grp = tile * BNB + b
        g_ok = grp < NP // R
        start = tl.program_id(1) * CPS  # this CTA's chunks: [start, end)
        end = tl.minimum(start + CPS, K // C)
        w_offs = (grp[:, None, None, None] * ROW_STRIDE + (u[:, None] * (KW * R) + j[None, :] * R)[None, :, :, None]
                  + r[None, None, None, :])
        m_offs = (grp[:, None] * R + r[None, :])[:, None, :]  # (BNB, 1, R): the rows' scales in one group
        acc = tl.full((BNB, CHUNKS, KW, R), 0, tl.float32)
        for c0 in range(start, end, CHUNKS):
            chunk = c0 + u
            c_ok = chunk < end
            ok = g_ok[:, None] & c_ok[None, :]  # (BNB, CHUNKS)
            w = tl.load(w_ptr + c0 * (KW * R) + w_offs, mask=ok[:, :, None, None], other=0)
            meta = (chunk // CPG)[None, :, None] * NP + m_offs  # (BNB, CHUNKS, R)
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
            acc += (16.0 * s)[:, :, None, :] * part - ((z + 16.0) * s)[:, :, None, :] * x_sum[None, :, :, None]
        # chunks first: a thread holds several chunks of one position (in-register adds), then the lanes over KW
        y = tl.reshape(tl.reduce(tl.reduce(acc, 1, _SUM), 1, _SUM), (BNB * R,))
        rows = tile * (BNB * R) + tl.arange(0, BNB * R)
        if SPLIT:
            tl.store(p_ptr + tl.program_id(1) * NP + rows, y, mask=rows < NP)
            tl.debug_barrier()  # every thread's partial is stored before the counter moves (release, gpu scope)
            if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:  # the last CTA
                y = tl.load(p_ptr + rows, mask=rows < NP, other=0, cache_modifier=".cg")
                for sp in range(1, SPLITS):  # split order: the same bits on every run
                    y += tl.load(p_ptr + sp * NP + rows, mask=rows < NP, other=0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += tl.load(b_ptr + rows, mask=rows < N, other=0).to(tl.float32)
                tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next call (or graph replay)
        else:
            if HAS_BIAS:
                y += tl.load(b_ptr + rows, mask=rows < N, other=0).to(tl.float32)
            tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def auto_splits(layout, tile) -> int:
    """K splits for a tile: enough CTAs for MIN_CTAS when the row tiles alone are fewer, each split >= one step."""
    bnb, chunks, _ = tile
    tiles = triton.cdiv(layout.padded_rows // R, bnb)
    steps = triton.cdiv(layout.in_features // layout.chunk, chunks)
    return max(1, min(steps, MIN_CTAS // tiles))


def heuristic(layout) -> tuple:
    """The untuned config: 8 rows per 128-thread CTA when that still gives MIN_CTAS row tiles, else 4 rows
    (CPU interpreter: 4 rows, 4 chunks per step, one warp)."""
    if interpreting():
        tile = (1, 4, 1)
    else:
        tile = (2, 16, 4) if layout.padded_rows // (2 * R) >= MIN_CTAS else (1, 32, 4)
    return tile + (auto_splits(layout, tile),)


def _counter_tensor(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for ``tiles`` row tiles, which the kernel leaves zeroed again after it."""
    size = max(1024, triton.next_power_of_2(tiles))
    cuda = device.type == "cuda"
    if cuda and torch.cuda.is_current_stream_capturing():  # a fill node in this graph: zero at each replay's start
        return torch.zeros(size, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream if cuda else None, size)
    if key not in _counters:  # made eagerly: zero now, and every call leaves it zero
        _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return _counters[key]


def _launch(x, layout, bias, y, config) -> None:
    bnb, chunks, warps, splits = config
    n, k = layout.out_features, layout.in_features
    steps = triton.cdiv(k // layout.chunk, chunks)
    per_split = triton.cdiv(steps, max(1, min(splits, steps)))  # loop steps per CTA
    splits = triton.cdiv(steps, per_split)  # no empty split
    tiles = triton.cdiv(layout.padded_rows // R, bnb)
    if splits > 1:
        partial = torch.empty((splits, layout.padded_rows), dtype=torch.float32, device=x.device)
        counters = _counter_tensor(x.device, tiles)
    else:
        partial = counters = y  # unused
    _gemv_kernel[(tiles, splits)](x, layout.words, layout.scales, layout.zeros, y if bias is None else bias, y,
                                  partial, counters, n, layout.padded_rows, k, k // 8 * R, per_split * chunks, splits,
                                  NIBBLE_MASK, HAS_BIAS=bias is not None, SPLIT=splits > 1, KW=layout.chunk // 8, R=R,
                                  CPG=layout.group_size // layout.chunk, BNB=bnb, CHUNKS=chunks, num_warps=warps)


def candidates(layout) -> list:
    """Configs the tuner times: each tile unsplit, and split as ``auto_splits`` says when that is more than one."""
    out = []
    for tile in TILES:
        out.append(tile + (1,))
        if auto_splits(layout, tile) > 1:
            out.append(tile + (auto_splits(layout, tile),))
    return out


def gemv(x: torch.Tensor, layout, bias: torch.Tensor | None) -> torch.Tensor:
    """y (1, N) in x.dtype for x (1, K) contiguous and a ``w4a16.W4A16Layout``."""
    y = torch.empty((1, layout.out_features), dtype=x.dtype, device=x.device)
    if interpreting() or os.environ.get("LOWBIT_AUTOTUNE", "1").strip() == "0":
        _launch(x, layout, bias, y, heuristic(layout))
        return y
    key = (layout.out_features, layout.in_features, layout.chunk, layout.group_size, x.dtype, layout.scales.dtype,
           bias is not None, x.device)
    if key not in _tuned:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: the heuristic, not remembered
            _launch(x, layout, bias, y, heuristic(layout))
            return y
        times = {}  # time each config once, keep the fastest
        for config in candidates(layout):
            try:
                times[config] = triton.testing.do_bench(lambda: _launch(x, layout, bias, y, config), warmup=5, rep=25)
            except Exception:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                continue
        _tuned[key] = min(times, key=times.get) if times else heuristic(layout)
    _launch(x, layout, bias, y, _tuned[key])
    return y
