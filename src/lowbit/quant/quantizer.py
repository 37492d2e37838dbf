"""Uniform integer quantization: one implementation for weights, activations and training.

A ``QuantSpec`` says how many bits, symmetric or asymmetric, and over which elements one scale is shared.
``fake_quantize`` rounds a tensor onto that grid and returns it dequantized (straight-through gradient), and
``quantize`` returns the integers with their scale and zero point, for packing and kernels.

Granularity is always relative to the last dimension, which is the reduction dimension of a matmul:
``channel`` and ``token`` share one scale per row (a weight's output channel, an activation's token),
``group`` one per ``group_size`` consecutive elements of a row, ``tensor`` one for everything.

Arithmetic runs in float32 whatever the input dtype, so a tiny range cannot overflow fp16, and scales are
clamped to ``SCALE_MIN`` so a constant row gives a finite, exact result (the reference code's NaN bug).
Rounding is torch's round-half-to-even, as in the reference implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from lowbit.errors import LowbitError

Granularity = Literal["tensor", "channel", "token", "group"]
GRANULARITIES = ("tensor", "channel", "token", "group")
MIN_BITS, MAX_BITS = 2, 8
SCALE_MIN = 1e-5
SCALE_MAX = 1e4


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: ``bits`` in 2..8, symmetric or not, and the scale granularity."""

    bits: int
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise LowbitError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise LowbitError(f"group granularity needs a positive group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise LowbitError(f"group_size is only meaningful with granularity='group', not {self.granularity!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def check_width(self, width: int, what: str = "tensor") -> None:
        """Refuse a group size that does not divide the reduction width (no silent padding)."""
        if self.granularity == "group" and width % self.group_size != 0:
            divisors = [g for g in (32, 64, 128, 256) if width % g == 0]
            hint = f"; group sizes that divide it: {', '.join(map(str, divisors))}" if divisors else ""
            raise LowbitError(
                f"group size {self.group_size} does not divide the input width {width} of {what}{hint}"
            )


class QuantizedTensor(NamedTuple):
    """Integers on the grid (as float32 holding exact integers) with the scale and zero point to dequantize."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        q = self.q if self.zero is None else self.q - self.zero
        return q * self.scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (identity in backward)."""
    return (x.round() - x).detach() + x


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` as (rows, elements sharing one scale); ``tensor`` gives a single row."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        spec.check_width(x.shape[-1])
        return x.reshape(-1, spec.group_size)
    return x.reshape(-1, x.shape[-1])


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    ste: bool = False,
) -> QuantizedTensor:
    """Quantize ``x`` to integers; the result's tensors have the grouped shape (rows, group).

    ``clip`` is an optional pair of factors in (0, 1] (one per row, as learnable weight clipping produces)
    that shrink the max and min before the scale is computed. ``ste`` keeps gradients flowing to ``x``
    and to the clipping factors through the rounding.
    """
    g = _grouped(x.float(), spec)
    # Divide by a device tensor, not a Python number: on CUDA torch turns ``t / 15`` into ``t * (1/15)``, one
    # rounding away from true division, which the CPU and the kernels compute (a scale one ulp off flips codes).
    qmax = torch.full((), float(spec.qmax), dtype=g.dtype, device=g.device)
    if spec.symmetric:
        amax = g.abs().amax(dim=-1, keepdim=True)
        if clip is not None:
            amax = amax * clip[0].reshape(-1, 1)
        scale = (amax / qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = None
    else:
        xmax = g.amax(dim=-1, keepdim=True)
        xmin = g.amin(dim=-1, keepdim=True)
        if clip is not None:
            xmax = xmax * clip[0].reshape(-1, 1)
            xmin = xmin * clip[1].reshape(-1, 1)
        scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        # No clamp on the zero point: in float32 it stays exact, and a constant row (range 0) then
        # round-trips exactly instead of saturating.
        zero = -xmin / scale
        zero = round_ste(zero) if ste else zero.round()
    scaled = g / scale
    q = round_ste(scaled) if ste else scaled.round()
    if zero is not None:
        q = q + zero
    q = q.clamp(spec.qmin, spec.qmax)
    return QuantizedTensor(q, scale, zero)


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec | None,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Round ``x`` onto the grid of ``spec`` and return it dequantized, same shape and dtype as ``x``.

    Gradients pass straight through the rounding (STE) and reach ``clip`` if given. ``spec=None`` is the
    identity, which is how 16-bit "quantization" is expressed.
    """
    if spec is None:
        return x
    qt = quantize(x, spec, clip=clip, ste=True)
    return qt.dequantize().reshape(x.shape).to(x.dtype)
