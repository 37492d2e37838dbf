"""Bit packing round-trips exactly for every width, with ragged lengths, and has the documented byte layout."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.packing import PackedInts, group_shape, pack, packed_bytes, unpack
from lowbit.quant.quantizer import QuantSpec, quantize


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("length", [1, 7, 64, 577])
@pytest.mark.parametrize("signed", [False, True])
def test_round_trip_is_exact(bits, length, signed):
    gen = torch.Generator().manual_seed(bits * 1000 + length)
    low = -(2 ** (bits - 1)) if signed else 0
    codes = torch.randint(low, low + 2**bits, (3, 5, length), generator=gen)
    packed = pack(codes, bits, signed=signed)
    assert packed.data.dtype == torch.uint8 and packed.data.shape == (3, 5, packed_bytes(length, bits))
    assert torch.equal(unpack(packed).long(), codes)


def test_sizes_are_the_bit_budget():
    assert group_shape(4) == (2, 1) and group_shape(3) == (8, 3) and group_shape(2) == (4, 1)
    assert packed_bytes(4096, 4) == 2048 and packed_bytes(4096, 3) == 1536 and packed_bytes(4096, 2) == 1024
    assert packed_bytes(5, 4) == 3  # a ragged tail takes one padded group


def test_int4_is_low_nibble_first():
    data = pack(torch.tensor([[1, 2, 15, 0]]), 4).data
    assert data.tolist() == [[0x21, 0x0F]]


def test_packs_what_the_quantizer_produces():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, QuantSpec(3, granularity="group", group_size=32))
    packed = pack(qt.q.reshape(16, 64), 3)
    assert torch.equal(unpack(packed).float(), qt.q.reshape(16, 64))


def test_out_of_range_and_truncated_inputs_are_refused():
    with pytest.raises(LowbitError, match="out of range"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(LowbitError, match="out of range"):
        pack(torch.tensor([8]), 4, signed=True)
    good = pack(torch.arange(16) % 16, 4)
    with pytest.raises(LowbitError, match="truncated"):
        unpack(PackedInts(good.data[:-1], 4, good.length))
    with pytest.raises(LowbitError, match="can only pack"):
        pack(torch.tensor([1]), 1)
