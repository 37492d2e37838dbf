"""Fused bit splitting against ``sampling.bit_split``: identical rows, norms, scale and weights from the same
Philox noise (drawn in the kernel, by PyTorch ops in the reference); unbiased; edge cases (zero and denormal-tiny
gradients) handled like the reference."""

import importlib

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.philox import draw_seed
from lowbit.train import sampling
from lowbit.train.sampling import SPLIT_BASE, bit_split

KERNEL_MODULES = ("lowbit.kernels.philox", "lowbit.kernels.quantize", "lowbit.kernels.bitsplit", "lowbit.kernels.int_gemm")


def _seed(device, value=5):
    return torch.tensor([value * 1_000_003 + 2**40], dtype=torch.int64, device=device)


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
    seed = draw_seed(torch.Generator(device=device).manual_seed(5), device)
    want = b.split_rows_reference(g, seed)
    for out_dtype in (torch.float32, torch.int8, torch.float8_e4m3fn):
        got = b.split_rows(g, seed, out_dtype)
        assert got.rows.dtype == out_dtype and torch.equal(got.rows.float(), want.rows)
        assert torch.equal(got.sq_norms, want.sq_norms) and torch.equal(got.scale, want.scale)
        assert torch.equal(got.weight, want.weight)
    # the training code's unfused bit_split, drawing the kernel's noise from the same generator, gives the same split
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    monkeypatch.setattr(sampling, "uniform_noise", sampling.philox_noise)
    split = bit_split(g.float(), torch.Generator(device=device).manual_seed(5))
    rows, weight = split.stacked()
    assert torch.equal(rows, want.rows) and torch.equal(split.scale, want.scale) and torch.equal(weight, want.weight)
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
    got, want = b.split_rows(g, _seed(device)), b.split_rows_reference(g, _seed(device))
    assert torch.equal(got.rows, want.rows) and torch.equal(got.scale, want.scale) and float(got.scale) == 1.0
    assert torch.count_nonzero(got.rows) == 0


def test_split_is_unbiased(device):
    """Copies of one gradient split with independent (in-kernel Philox) noise average to it (one shared scale)."""
    b = _b()
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 64, generator=gen).to(device)
    copies = 2000
    tiled = g.repeat(copies, 1)
    split = b.split_rows(tiled, _seed(device, 4))
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
        b.split_rows(g[None], _seed(device))
    with pytest.raises(LowbitError, match="seed"):
        b.split_rows(g, g[:2])
    with pytest.raises(LowbitError, match="out_dtype"):
        b.split_rows(g, _seed(device), torch.int32)


def test_philox_uniforms_equal_reference(device):
    """The kernels' in-kernel uniforms equal ``philox.uniform_reference`` bit for bit (offsets past 2^32 and
    seeds using both key words included), and look uniform: mean 1/2, variance 1/12, on the 2^-24 grid."""
    from lowbit.kernels.philox import uniform_reference, uniform_triton

    gen = torch.Generator().manual_seed(0)
    offsets = torch.cat([torch.arange(200), torch.randint(0, 2**45, (56,), generator=gen)])
    for value in (0, 7, 2**62 - 1):
        seed = torch.tensor([value], dtype=torch.int64)
        assert torch.equal(uniform_triton(seed.to(device), offsets.to(device)).cpu(), uniform_reference(seed, offsets))
    u = uniform_reference(_seed("cpu", 9), torch.arange(65536))
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    assert torch.equal(u * 2**24, (u * 2**24).round()) and float(u.min()) >= 0 and float(u.max()) < 1


@pytest.mark.parametrize("rows", [4, 8, 16, 32])
def test_gpu_row_tiles_give_the_same_split(device, monkeypatch, rows):
    """The row counts split_tile_rows picks on a GPU, run here with 128-column tiles: the same rows, norms, scale and
    weights as the reference, for N that the tile does not divide (the noise is indexed by position)."""
    bitsplit = _b()
    if device == "cuda":
        pytest.skip("the CPU tile hook; on CUDA the tile follows the SM count")
    monkeypatch.setattr(bitsplit, "CPU_TILE", (rows, 128))
    seed = _seed(device)
    for n in (3, 37, 64):
        g = torch.randn(n, 200, generator=torch.Generator().manual_seed(n)) * 1e-3
        got, want = bitsplit.split_rows(g, seed), bitsplit.split_rows_reference(g, seed)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_split_tiles_fill_the_gpu():
    """32-row tiles for long gradients, halved to 4 CTAs per SM for the training shapes, never below 4 rows."""
    from lowbit.kernels.bitsplit import split_tile_rows

    assert split_tile_rows(100_000, 132) == 32
    assert split_tile_rows(8192, 132) == 8  # 1024 CTAs (32-row tiles gave 256)
    assert split_tile_rows(16, 132) == 4
