"""Bit packing of unsigned integer codes along the last dimension: int4 two per byte, int2 four, int3 eight per three.

``quantize`` returns codes in ``[0, 2^bits)`` (asymmetric) or ``[-2^(bits-1), 2^(bits-1))`` (symmetric, pass
``signed=True`` to store them offset by ``2^(bits-1)``). Packing is little-endian within each group: code ``i`` of
a group occupies bits ``[i·bits, (i+1)·bits)`` of the group's word, and the word's bytes are stored low byte first.
For 4 bits that is the usual "low nibble first" byte. A group is the smallest run of codes that fills whole bytes
(``lcm(bits, 8) / bits`` codes: 2 for int4, 8 for int3), so any width packs; a ragged tail is zero-padded and the
true length kept. Pure tensor arithmetic, exact, on any device; kernels unpack the same layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lowbit.errors import LowbitError
from lowbit.quant.quantizer import MAX_BITS, MIN_BITS


class PackedInts(NamedTuple):
    """``data``: uint8 of shape (..., bytes); ``length``: codes per row before padding."""

    data: torch.Tensor
    bits: int
    length: int
    signed: bool = False


def group_shape(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing group: the fewest codes that fill whole bytes."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise LowbitError(f"can only pack {MIN_BITS} to {MAX_BITS}-bit codes, got {bits}")
    total = math.lcm(bits, 8)
    return total // bits, total // 8


def packed_bytes(length: int, bits: int) -> int:
    """Bytes per row that ``pack`` produces for ``length`` codes."""
    codes, nbytes = group_shape(bits)
    return -(-length // codes) * nbytes


def pack(codes: torch.Tensor, bits: int, signed: bool = False) -> PackedInts:
    """Pack integer codes (any integer or integral float dtype) along the last dimension into uint8."""
    per_group, nbytes = group_shape(bits)
    values = codes.to(torch.int64) + (2 ** (bits - 1) if signed else 0)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        kind = "signed" if signed else "unsigned"
        raise LowbitError(f"codes out of range for {kind} {bits}-bit packing")
    length = values.shape[-1]
    pad = -length % per_group
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    groups = values.reshape(*values.shape[:-1], -1, per_group)
    shifts = torch.arange(per_group, device=values.device) * bits
    words = (groups << shifts).sum(-1, keepdim=True)  # at most 56 bits: exact in int64
    byte_shifts = torch.arange(nbytes, device=values.device) * 8
    data = ((words >> byte_shifts) & 0xFF).to(torch.uint8)
    return PackedInts(data.reshape(*values.shape[:-1], -1), bits, length, signed)


def unpack(packed: PackedInts) -> torch.Tensor:
    """The codes of ``pack``, as int16 (signed codes back in their signed range), padding removed."""
    per_group, nbytes = group_shape(packed.bits)
    data = packed.data
    if data.shape[-1] != packed_bytes(packed.length, packed.bits):
        raise LowbitError(
            f"packed rows hold {data.shape[-1]} bytes, expected {packed_bytes(packed.length, packed.bits)} for "
            f"{packed.length} {packed.bits}-bit codes: the file is truncated or was written with other settings"
        )
    groups = data.to(torch.int64).reshape(*data.shape[:-1], -1, nbytes)
    byte_shifts = torch.arange(nbytes, device=data.device) * 8
    words = (groups << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(per_group, device=data.device) * packed.bits
    values = ((words >> shifts) & (2**packed.bits - 1)).reshape(*data.shape[:-1], -1)[..., : packed.length]
    if packed.signed:
        values = values - 2 ** (packed.bits - 1)
    return values.to(torch.int16)
