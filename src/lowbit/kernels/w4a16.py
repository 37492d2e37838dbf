"""W4A16 linear: packed 4-bit weights, fp16/bf16/fp32 activations, dequantization inside the kernel.

``w4a16_linear(x, weight, bias)`` equals ``F.linear(x, weight.dequantize(x.dtype), bias)`` up to floating-point
rounding: the kernels accumulate in float32 and keep 16-bit scales when x is 16-bit (tests: |error| <= 2e-6, 2e-3,
1e-2 of sum |x||w| for float32, float16, bfloat16). Two paths, chosen by the number of rows M:

- M == 1 (decode), a GEMV on CUDA cores: one shift and one mask-or per weight put the nibble c in the top
  mantissa bits of 1.0, giving 1 + c/16 exactly; one FMA per weight accumulates it against x, and per group
  sum (c - z) x = 16 sum (1 + c/16) x - (16 + z) sum x removes the 1 (cancelling ~4 of float32's 24 bits).
  It lives in ``w4a16_gemv`` (one launch: row tiles, K split where the tuner finds it faster and reduced in-kernel,
  16-byte loads).
- M >= 2, ``w4a16_gemm``: a fused tiled GEMM (out^T = W X^T, the weight tile dequantized in registers with the
  same trick, one dot per nibble plane) or, where it was faster, the whole weight dequantized (bit for bit
  ``weight.dequantize``) then cuBLAS; on CUDA a timed search per shape and row bucket picks the config and path.

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

for _name in ("lowbit.kernels.w4a16_gemv", "lowbit.kernels.w4a16_gemm"):
    if _name in sys.modules:  # this module is being reloaded (tests turn the interpreter on):
        importlib.reload(sys.modules[_name])  # define the kernels again as well
from lowbit.kernels import w4a16_gemm, w4a16_gemv  # noqa: E402

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_ROWS = 1
CHUNK_CHOICES = (128, 64, 32, 16)


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
    else:  # the fused GEMM or dequantize + cuBLAS, whichever was faster for this shape and row bucket
        y = w4a16_gemm.linear(x2, weight, layout, b)
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


def layout_key(dtype: torch.dtype) -> tuple:
    """The key ``prepare_w4a16`` caches a weight's layout under (``PackedWeight.prepared`` / ``cached``)."""
    return ("w4a16", dtype)


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

    return weight.prepared(layout_key(dtype), build)


def use_fixed_config() -> bool:
    """One fixed launch configuration instead of Triton's autotuning: always on the CPU interpreter, and on the GPU
    when ``LOWBIT_AUTOTUNE=0`` (tests of many small shapes, where tuning would cost more than it saves)."""
    return interpreting() or os.environ.get("LOWBIT_AUTOTUNE", "1").strip() == "0"


def _dequantize(weight: PackedWeight, layout: W4A16Layout, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight in ``dtype``, bit for bit ``weight.dequantize(dtype)`` (``w4a16_gemm.dequantize``)."""
    return w4a16_gemm.dequantize(weight, layout, dtype)
