"""Fused bit splitting against ``sampling.bit_split``: identical rows, norms and scale from the same noise;
unbiased; edge cases (zero and denormal-tiny gradients) handled like the reference."""

import importlib

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.sampling import SPLIT_BASE, bit_split

KERNEL_MODULES = ("lowbit.kernels.quantize", "lowbit.kernels.bitsplit", "lowbit.kernels.int_gemm")


@pytest.fixture(scope="module")
def device(triton_path):
    """CUDA when present; else the CPU with Triton's interpreter (see conftest.triton_path)."""
    return triton_path(*KERNEL_MODULES)


def _b():
    return importlib.import_module("lowbit.kernels.bitsplit")


@pytest.mark.parametrize("n,c", [(13, 576), (5, 1536), (33, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_split_equals_reference_and_training_bit_split(device, monkeypatch, n, c, dtype):
    b = _b()
    g = (torch.randn(n, c, generator=torch.Generator().manual_seed(n)) * 1e-3).to(device=device, dtype=dtype)
    noise = torch.rand(g.shape, generator=torch.Generator(device=device).manual_seed(5), device=device)
    want = b.split_rows_reference(g, noise)
    for out_dtype in (torch.float32, torch.int8, torch.float8_e4m3fn):
        got = b.split_rows(g, noise, out_dtype)
        assert got.rows.dtype == out_dtype and torch.equal(got.rows.float(), want.rows)
        assert torch.equal(got.sq_norms, want.sq_norms) and torch.equal(got.scale, want.scale)
    # the training code's unfused bit_split, fed the same generator stream, gives the same split
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    split = bit_split(g.float(), torch.Generator(device=device).manual_seed(5))
    rows, _ = split.stacked()
    assert torch.equal(rows, want.rows) and torch.equal(split.scale, want.scale)
    assert torch.equal(want.sq_norms, rows.pow(2).sum(dim=1))  # sums of squares of integers: exact in any order
    assert torch.allclose(want.sq_norms.sqrt(), rows.norm(dim=1), rtol=2**-22, atol=0)


def test_training_bit_split_uses_the_kernel(device):
    g = torch.randn(9, 64, generator=torch.Generator().manual_seed(0)).to(device)
    split = bit_split(g, torch.Generator(device=device).manual_seed(1))
    assert split.rows is not None and split.hi.data_ptr() == split.rows.data_ptr()  # the fused path ran
    rows, weight = split.stacked()
    assert rows.data_ptr() == split.rows.data_ptr() and weight.shape == (18,)
    assert torch.all(((SPLIT_BASE * split.hi + split.lo) / split.scale - g).abs() <= g.abs().max() / 98 + 1e-7)


@pytest.mark.parametrize("amax", [0.0, 1e-45])
def test_zero_and_tiny_gradients_match_reference(device, amax):
    b = _b()
    g = torch.zeros(4, 32, device=device)
    g[1, 3] = amax
    noise = torch.rand(g.shape, generator=torch.Generator(device=device).manual_seed(0), device=device)
    got, want = b.split_rows(g, noise), b.split_rows_reference(g, noise)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.scale, want.scale) and float(got.scale) == 1.0
    assert torch.count_nonzero(got.rows) == 0


def test_split_is_unbiased(device):
    """Copies of one gradient split with independent noise average to it (one shared scale: same max)."""
    b = _b()
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 64, generator=gen).to(device)
    copies = 2000
    tiled = g.repeat(copies, 1)
    noise = torch.rand(tiled.shape, generator=torch.Generator(device=device).manual_seed(4), device=device)
    split = b.split_rows(tiled, noise)
    n = tiled.shape[0]
    deq = (SPLIT_BASE * split.rows[:n] + split.rows[n:]) / split.scale
    mean = deq.reshape(copies, 2, 64).mean(0)
    stderr = 0.5 / float(split.scale) / copies**0.5  # lo's rounding has variance <= 1/4, in units of 1/s
    assert torch.all((mean - g).abs() < 5 * stderr)
    biased = (SPLIT_BASE * split.rows[:n] + torch.round(tiled * split.scale - SPLIT_BASE * split.rows[:n])) / split.scale
    assert not torch.all((biased.reshape(copies, 2, 64).mean(0) - g).abs() < 5 * stderr)  # the test can fail


def test_bad_input_is_refused(device):
    b = _b()
    g = torch.zeros(4, 8, device=device)
    with pytest.raises(LowbitError, match="2-D"):
        b.split_rows(g[None], g[None])
    with pytest.raises(LowbitError, match="noise"):
        b.split_rows(g, g[:2])
    with pytest.raises(LowbitError, match="out_dtype"):
        b.split_rows(g, g, torch.int32)
