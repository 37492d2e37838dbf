"""A quantized weight in the canonical interchange layout, shared by export, loading and the inference kernels.

Canonical layout (what ``lowbit.export`` stores):

- ``packed``: uint8 (N, packed_bytes(K, bits)), unsigned codes in [0, 2^bits) packed along K by
  ``lowbit.quant.packing.pack`` (for 4 bits, byte j holds code 2j in the low nibble, 2j+1 in the high one);
- ``scales``, ``zeros``: float32 (N, K // group_size); zeros are integers in code units, possibly outside
  [0, 2^bits) (the quantizer does not clamp them). Symmetric weights are stored as codes q + 2^(bits-1) with zero
  2^(bits-1).
- weight[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G].

Kernels want other layouts (nibbles permuted per tile, int32 words, per-channel code sums). Those are built once
per device and kind and cached on the instance (``prepared``), so the canonical tensors stay what is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from lowbit.errors import LowbitError
from lowbit.quant.packing import PackedInts, pack, packed_bytes, unpack
from lowbit.quant.quantizer import MAX_BITS, MIN_BITS, QuantSpec, quantize

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A (out_features x in_features) weight of ``bits``-bit codes with group-wise scales and zero points."""

    packed: torch.Tensor = field(repr=False)
    scales: torch.Tensor = field(repr=False)
    zeros: torch.Tensor = field(repr=False)
    bits: int
    group_size: int
    in_features: int
    out_features: int
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise LowbitError(f"PackedWeight bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if n < 1 or k < 1 or not isinstance(g, int) or g < 1 or k % g:
            raise LowbitError(
                f"PackedWeight group_size {g!r} must be a positive divisor of in_features {k} (use {k} for per-channel)"
            )
        if self.packed.dtype != torch.uint8 or self.packed.shape != (n, packed_bytes(k, self.bits)):
            raise LowbitError(
                f"packed weight must be uint8 of shape ({n}, {packed_bytes(k, self.bits)}) for {k} {self.bits}-bit codes "
                f"per row, got {self.packed.dtype} {tuple(self.packed.shape)}: truncated file or other settings"
            )
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or t.shape != (n, k // g):
                raise LowbitError(
                    f"PackedWeight {name} must be float32 of shape ({n}, {k // g}), got {t.dtype} {tuple(t.shape)}"
                )
            if t.device != self.packed.device:
                raise LowbitError(f"PackedWeight {name} is on {t.device} but packed is on {self.packed.device}")

    # ----------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int | None
    ) -> "PackedWeight":
        """Pack unsigned codes (N, K) with float32 scales/zeros (N, K // group_size); checks every value."""
        if codes.dim() != 2:
            raise LowbitError(f"weight codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
        n, k = codes.shape
        group_size = k if group_size is None else group_size
        if codes.is_floating_point() and not torch.equal(codes, codes.round()):
            raise LowbitError("weight codes hold non-integer values: pass the integer codes of the quantizer")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise LowbitError(f"weight {name} must be finite floating-point values")
        if bool((scales <= 0).any()):
            raise LowbitError("weight scales must be positive (the quantizer clamps them to SCALE_MIN)")
        if not torch.equal(zeros, zeros.round()):
            raise LowbitError("weight zero points must be integers in code units (round them as the quantizer does)")
        if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise LowbitError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        packed = pack(codes, bits).data  # raises LowbitError on codes outside [0, 2^bits)
        return cls(packed, scales.float().contiguous(), zeros.float().contiguous(), bits, group_size, k, n)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False
    ) -> "PackedWeight":
        """Round-to-nearest quantization of a float weight with ``lowbit.quant.quantizer`` (tests, benchmarks)."""
        n, k = weight.shape
        spec = (
            QuantSpec(bits, symmetric, "channel")
            if group_size in (None, k)
            else QuantSpec(bits, symmetric, "group", group_size)
        )
        qt = quantize(weight.float(), spec)
        groups = k // (group_size or k)
        codes = qt.q.reshape(n, k)
        scales = qt.scale.reshape(n, groups)
        if qt.zero is None:  # symmetric: store offset codes with the matching zero point
            offset = 2 ** (bits - 1)
            codes, zeros = codes + offset, torch.full_like(scales, float(offset))
        else:
            zeros = qt.zero.reshape(n, groups)
        return cls.from_codes(codes, scales, zeros, bits, group_size or k)

    # ------------------------------------------------------------------------------------------------- views
    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        """The unsigned codes (N, K) as int16."""
        return unpack(PackedInts(self.packed, self.bits, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The exact reference weight (N, K): computed in float32, then cast to ``dtype``."""
        g = self.group_size
        codes = self.codes().float()
        w = (codes - self.zeros.repeat_interleave(g, dim=1)) * self.scales.repeat_interleave(g, dim=1)
        return w.to(dtype)

    def to(self, device: torch.device | str) -> "PackedWeight":
        """The same weight on ``device`` (prepared layouts are rebuilt there on first use)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return PackedWeight(
            self.packed.to(device), self.scales.to(device), self.zeros.to(device), self.bits, self.group_size,
            self.in_features, self.out_features,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The canonical tensors, for safetensors."""
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    def prepared(self, key: Any, build: Callable[[], T]) -> T:
        """A kernel layout of this weight, built by ``build`` on first use and cached per ``key`` (kind, device...).

        Building is deterministic, so the cache never changes a result, only how fast the next call is.
        """
        full_key = (key, str(self.device))
        if full_key not in self._prepared:
            self._prepared[full_key] = build()
        return self._prepared[full_key]

    def cached(self, key: Any) -> Any | None:
        """The layout ``prepared`` built for ``key`` on this device, or None if none was built yet."""
        return self._prepared.get((key, str(self.device)))
