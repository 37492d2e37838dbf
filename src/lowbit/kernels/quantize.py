"""Fused Hadamard + scale + round + cast: the forward operands of 4-bit training in one pass over memory.

``rotate_quantize(x, ...)`` = ``round(clamp(pad(x) D H_b / s))`` cast to the GEMM operand type (int8, float8
e4m3 or float32), with ``s`` a per-tensor step (LSQ), a per-row step (per-channel LSQ) or the dynamic per-token
absmax scale; it can also write ``v = x D H_b / s`` (what LSQ's backward needs). ``hadamard_rotate`` is the same
kernel without the quantizer (forward or inverse rotation, used for the backward's inverse transform).

The kernels run the same float32 operations in the same order as the references (``lowbit.quant.hadamard``'s
butterflies, a correctly rounded division, round-half-to-even through the ``1.5 * 2^23`` trick), so their
results are equal bit for bit; the tests check that, ties included.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import backend_for
from lowbit.quant.hadamard import check_block, hadamard_transform, inverse_hadamard_transform
from lowbit.quant.quantizer import SCALE_MAX, SCALE_MIN

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None

OUT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float32)
MODE_ROTATE, MODE_TENSOR, MODE_ROW, MODE_TOKEN = 0, 1, 2, 3
ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (v + M) - M is round-half-to-even for |v| < 2^22 in float32


class QuantizedOperand(NamedTuple):
    """``q`` (in the requested dtype), the step(s) to dequantize (0-dim or (M, 1)) and ``v`` (float32) or None."""

    q: torch.Tensor
    step: torch.Tensor
    v: torch.Tensor | None


# ----------------------------------------------------------------------------------------------- references


def hadamard_rotate_reference(x: torch.Tensor, block: int, signs: torch.Tensor | None = None, pad: int = 0,
                              inverse: bool = False) -> torch.Tensor:
    """float32 ``pad(x) D H`` (forward) or ``(x H D)[:, :-pad]`` (inverse); block 0 means no Hadamard."""
    x = x.float()
    if inverse:
        y = inverse_hadamard_transform(x, block, signs) if block else x
        return y[:, : y.shape[1] - pad] if pad else y
    if pad:
        x = F.pad(x, (0, pad))
    return hadamard_transform(x, block, signs) if block else x


def rotate_quantize_reference(x: torch.Tensor, block: int, step: torch.Tensor | None, qmin: int, qmax: int,
                              signs: torch.Tensor | None = None, pad: int = 0, out_dtype: torch.dtype = torch.int8,
                              save_v: bool = True) -> QuantizedOperand:
    """The unfused composition: rotate in float32, then LSQ (``step`` given) or dynamic per-token absmax."""
    xh = hadamard_rotate_reference(x, block, signs, pad)
    if step is None:
        # divide by a device tensor: torch turns ``/ python_scalar`` into a multiply by the reciprocal on CUDA,
        # which is not the kernel's correctly rounded division
        amax = xh.abs().amax(dim=1, keepdim=True)
        scale = (amax / amax.new_full((), float(qmax))).clamp(SCALE_MIN, SCALE_MAX)
        q = (xh / scale).round().clamp(qmin, qmax) + 0.0  # + 0.0: -0 becomes +0, as the kernel writes it
        return QuantizedOperand(q.to(out_dtype), scale, None)
    s = step.float().reshape(-1, 1) if step.numel() > 1 else step.float().reshape(())
    v = xh / s
    q = torch.round(v.clamp(qmin, qmax)) + 0.0  # canonical +0 (the kernel's 1.5 * 2^23 rounding never writes -0)
    return QuantizedOperand(q.to(out_dtype), s, v if save_v else None)


# ----------------------------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _butterfly(y, BM: tl.constexpr, BK: tl.constexpr, H: tl.constexpr):
        """One Sylvester stage: pairs (j, j + H) inside every 2H-group become (a + b, a - b)."""
        y = tl.reshape(y, (BM, BK // (2 * H), 2, H))
        y = tl.permute(y, (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.join(a + b, a - b)
        y = tl.permute(y, (0, 1, 3, 2))
        return tl.reshape(y, (BM, BK))

    @triton.jit
    def _rotated_tile(x_ptr, signs_ptr, rows, cols, M, K_in, stride_x, NORM,
                      BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, HAS_SIGNS: tl.constexpr,
                      INVERSE: tl.constexpr):
        mask = (rows[:, None] < M) & (cols[None, :] < K_in)  # columns past K_in are the zero padding
        y = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SIGNS and not INVERSE:
            y = y * tl.load(signs_ptr + cols, mask=cols < K_in, other=0.0)[None, :]
        if BLOCK > 1:
            y = _butterfly_all(y, BM, BK, BLOCK) * NORM
        if HAS_SIGNS and INVERSE:
            y = y * tl.load(signs_ptr + cols, mask=cols < K_in, other=0.0)[None, :]
        return y

    @triton.jit
    def _butterfly_all(y, BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr):
        """All log2(BLOCK) stages (BLOCK <= 256), unrolled at compile time."""
        for stage in tl.static_range(8):
            if (1 << stage) < BLOCK:
                y = _butterfly(y, BM, BK, 1 << stage)
        return y

    # tl.reduce with triton's own combine function instead of tl.max: the interpreter maps it to numpy, and
    # it still works when triton was imported before TRITON_INTERPRET was set (tl.max then does not).
    _MAX = tl.standard._elementwise_max

    @triton.jit
    def _round_half_even(v):
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _rotate_quantize_kernel(x_ptr, signs_ptr, step_ptr, q_ptr, v_ptr, scale_ptr,
                                M, K_in, K_out, stride_x, stride_q, NORM, qmin, qmax,
                                BM: tl.constexpr, BK: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
                                HAS_SIGNS: tl.constexpr, INVERSE: tl.constexpr, SAVE_V: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        if MODE == 1:
            s = tl.load(step_ptr)
        if MODE == 2:
            s = tl.load(step_ptr + rows, mask=rows < M, other=1.0)[:, None]
        if MODE == 3:  # dynamic per token: a first pass finds each row's absmax of the rotated values
            amax = tl.full((BM,), 0.0, tl.float32)
            for k0 in range(0, K_out, BK):
                cols = k0 + tl.arange(0, BK)
                y = _rotated_tile(x_ptr, signs_ptr, rows, cols, M, K_in, stride_x, NORM,
                                  BM, BK, BLOCK, HAS_SIGNS, INVERSE)
                amax = tl.maximum(amax, tl.reduce(tl.abs(y), 1, _MAX))
            s = tl.math.div_rn(amax, qmax * 1.0)
            s = tl.minimum(tl.maximum(s, 1e-5), 1e4)
            tl.store(scale_ptr + rows, s, mask=rows < M)
            s = s[:, None]
        for k0 in range(0, K_out, BK):
            cols = k0 + tl.arange(0, BK)
            y = _rotated_tile(x_ptr, signs_ptr, rows, cols, M, K_in, stride_x, NORM,
                              BM, BK, BLOCK, HAS_SIGNS, INVERSE)
            out_mask = (rows[:, None] < M) & (cols[None, :] < K_out)
            offs = rows[:, None] * stride_q + cols[None, :]
            if MODE == 0:
                tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty), mask=out_mask)
            else:
                v = tl.math.div_rn(y, s)
                if SAVE_V:
                    tl.store(v_ptr + offs, v, mask=out_mask)
                q = _round_half_even(tl.minimum(tl.maximum(v, qmin * 1.0), qmax * 1.0))
                tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=out_mask)


class RowTiles(NamedTuple):
    """Launch shape of the row-tiled rotate kernels: rows and columns per tile, warps per CTA."""

    rows: int
    cols: int
    warps: int


CTAS_PER_SM = 4  # grid the row-tiled kernels aim for on the GPU


def row_tiles(m: int, k: int, block: int, device: torch.device) -> RowTiles:
    """Tiles for a kernel that walks (m, k) row blocks left to right, whole Hadamard blocks per tile.

    Why: with 4096-element tiles of 64-column strips, 4096-8192 rows gave 64-128 CTAs, under one wave on the
    H100's 132 SMs; ncu (2026-11-24) measured 12.5% achieved occupancy and 0.8-1.7 TB/s for the rotate-quantize
    and LSQ-inverse kernels. On the GPU the strips are now 256 or 128 columns wide where that divides k (more
    bytes in flight per row), and rows per tile halve until the grid has ``CTAS_PER_SM`` CTAs per multiprocessor.
    The CPU interpreter keeps small tiles (its speed). No rotated, quantized or output element depends on the
    tile; the LSQ step gradient's row sums (``lsq_inverse``) add one tile width at a time, so they match across
    tile shapes to float32 rounding, as they match the reference."""
    block = max(block, 1)
    if device.type != "cuda":
        cols = max(block, 32)
        return RowTiles(max(1, 1024 // cols), cols, 1)
    return gpu_row_tiles(m, k, block, torch.cuda.get_device_properties(device).multi_processor_count)


def gpu_row_tiles(m: int, k: int, block: int, multiprocessors: int) -> RowTiles:
    """``row_tiles`` on a GPU with ``multiprocessors`` SMs (a pure function, so the CPU tests can check it)."""
    cols = next((c for c in (256, 128) if c >= block and k % c == 0), max(block, 64))
    rows = filling_rows(m, max(1, 4096 // cols), 1, multiprocessors)
    return RowTiles(rows, cols, max(1, min(8, rows * cols // 256)))


def filling_rows(m: int, rows: int, fewest: int, multiprocessors: int) -> int:
    """``rows`` per CTA, halved (not below ``fewest``) until ``m`` rows give ``CTAS_PER_SM`` CTAs per SM."""
    while rows > fewest and -(-m // rows) < CTAS_PER_SM * multiprocessors:
        rows //= 2
    return rows


def _launch(x, block, signs, pad, step, mode, qmin, qmax, out_dtype, save_v, inverse):
    m, k_in = x.shape
    k_out = k_in - pad if inverse else k_in + pad
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(m, k_out, device=x.device, dtype=out_dtype)
    v = torch.empty(m, k_out, device=x.device, dtype=torch.float32) if save_v else q
    scale = torch.empty(m, 1, device=x.device, dtype=torch.float32) if mode == MODE_TOKEN else q
    if m == 0 or k_out == 0:
        return q, scale, (v if save_v else None)
    tiles = row_tiles(m, k_out, block, x.device)
    step_arg = step.float().reshape(-1).contiguous() if step is not None else q
    signs_arg = signs.float().contiguous() if signs is not None else q
    norm = 1.0 / math.sqrt(block) if block > 1 else 1.0
    _rotate_quantize_kernel[(triton.cdiv(m, tiles.rows),)](
        x, signs_arg, step_arg, q, v, scale, m, k_in, k_out, x.stride(0), q.stride(0),
        norm, qmin, qmax, BM=tiles.rows, BK=tiles.cols, BLOCK=max(block, 1), MODE=mode, HAS_SIGNS=signs is not None,
        INVERSE=inverse, SAVE_V=save_v, num_warps=tiles.warps)
    return q, scale, (v if save_v else None)


# ----------------------------------------------------------------------------------------------- public API


def _validate(x: torch.Tensor, block: int, signs: torch.Tensor | None, pad: int, width: int) -> None:
    if x.dim() != 2:
        raise LowbitError(f"rotate/quantize kernels take a 2-D (tokens x features) tensor, got shape {tuple(x.shape)}")
    if block:
        check_block(block, width, "the rotated operand")
        if block > 256:
            raise LowbitError(f"the fused Hadamard kernel handles blocks up to 256, got {block}; use a smaller block")
    if signs is not None and signs.numel() != width:
        raise LowbitError(f"signs must have {width} entries (the rotated width), got {signs.numel()}")


def hadamard_rotate(x: torch.Tensor, block: int, signs: torch.Tensor | None = None, pad: int = 0,
                    inverse: bool = False) -> torch.Tensor:
    """float32 block-Hadamard rotation of a 2-D tensor (see ``hadamard_rotate_reference``), fused when on Triton."""
    width = x.shape[-1] if inverse else x.shape[-1] + pad
    _validate(x, block, signs, pad, width)
    if backend_for(x) == "reference":
        return hadamard_rotate_reference(x, block, signs, pad, inverse)
    q, _, _ = _launch(x, block, signs, pad, None, MODE_ROTATE, 0, 0, torch.float32, False, inverse)
    return q


def rotate_quantize(x: torch.Tensor, block: int, step: torch.Tensor | None, qmin: int, qmax: int,
                    signs: torch.Tensor | None = None, pad: int = 0, out_dtype: torch.dtype = torch.int8,
                    save_v: bool = True) -> QuantizedOperand:
    """Rotate, scale, round to ``[qmin, qmax]`` and cast, in one pass (see ``rotate_quantize_reference``).

    ``step``: None (dynamic per-token absmax), one element (per tensor) or one per row. ``save_v`` also
    writes ``v = x_rot / step`` (float32), which LSQ's backward needs; ignored for the dynamic scale.
    """
    _validate(x, block, signs, pad, x.shape[-1] + pad)
    if out_dtype not in OUT_DTYPES:
        raise LowbitError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if step is not None and step.numel() not in (1, x.shape[0]):
        raise LowbitError(f"step must have 1 or {x.shape[0]} (one per row) elements, got {step.numel()}")
    if backend_for(x) == "reference":
        return rotate_quantize_reference(x, block, step, qmin, qmax, signs, pad, out_dtype, save_v)
    if step is None:
        q, scale, _ = _launch(x, block, signs, pad, None, MODE_TOKEN, qmin, qmax, out_dtype, False, False)
        return QuantizedOperand(q, scale, None)
    mode = MODE_TENSOR if step.numel() == 1 else MODE_ROW
    q, _, v = _launch(x, block, signs, pad, step, mode, qmin, qmax, out_dtype, save_v, False)
    s = step.float().reshape(-1, 1) if step.numel() > 1 else step.float().reshape(())
    return QuantizedOperand(q, s, v)
