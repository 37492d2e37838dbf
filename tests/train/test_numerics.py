"""Integer matmul dispatch, stochastic rounding, bit splitting and water-filling."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.dispatch import int_matmul
from lowbit.train.sampling import bit_split, sample_rows, stochastic_quantize, stochastic_round, waterfill


def _ints(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g)


@pytest.mark.parametrize("bits,r", [(4, 64), (8, 64), (8, 4096)])
def test_int_matmul_is_exact(bits, r):
    a, b = _ints((7, r), bits, 0), _ints((5, r), bits, 1)
    exact = a.long() @ b.long().T
    out = int_matmul(a.float(), b.float(), bits_a=bits, bits_b=bits)
    assert torch.equal(out.long(), exact)
    # 8-bit with r=4096 exceeds float32's exact range: the reference must switch to float64
    assert out.dtype == (torch.float64 if r * 128 * 128 >= 2**24 else torch.float32)


def test_int_matmul_refuses_non_integers_and_out_of_range():
    a = torch.zeros(2, 4)
    with pytest.raises(LowbitError, match="non-integer"):
        int_matmul(a + 0.5, a)
    with pytest.raises(LowbitError, match="4-bit range"):
        int_matmul(a + 8, a)
    with pytest.raises(LowbitError, match="operands"):
        int_matmul(torch.zeros(2, 4), torch.zeros(2, 3))


def test_stochastic_round_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([0.1, 0.5, -2.3, 3.0, -0.75])
    draws = torch.stack([stochastic_round(x, g) for _ in range(20000)])
    assert torch.all(draws == draws.round()) and torch.all((draws - x).abs() < 1)
    assert torch.allclose(draws.mean(0), x, atol=0.015)  # std of the mean <= 0.5/sqrt(20000) = 0.0035


def _heavy_tailed(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * torch.logspace(-4, 0, n).reshape(-1, 1)


def test_bit_split_range_and_stated_error():
    g = _heavy_tailed(64, 48, 0)
    gen = torch.Generator().manual_seed(1)
    split = bit_split(g, gen)
    for part in (split.hi, split.lo):
        assert torch.equal(part, part.round()) and part.abs().max() <= 7
    assert split.hi.abs().max() == 7  # the full high range is used
    # stated error: |g - (14 hi + lo)/s| < 1/s = max|g| / 98, elementwise
    err = (split.dequantize() - g).abs()
    assert err.max() < g.abs().max() / 98
    # without the low part the error is up to 7/s: the split really adds ~4 bits
    assert (14 * split.hi / split.scale - g).abs().max() > 10 * err.max() / 7


def test_bit_split_is_unbiased():
    g = _heavy_tailed(32, 16, 2)
    gen = torch.Generator().manual_seed(3)
    draws = 4000
    mean = sum(bit_split(g, gen).dequantize() for _ in range(draws)) / draws
    unit = g.abs().max() / 98  # one step of the low part; rounding std <= unit / 2
    assert (mean - g).abs().max() < 5 * 0.5 * unit / draws**0.5


def test_bit_split_of_zero_and_tiny():
    gen = torch.Generator().manual_seed(0)
    zero = bit_split(torch.zeros(3, 4), gen)
    assert torch.equal(zero.dequantize(), torch.zeros(3, 4))
    tiny = bit_split(torch.full((2, 2), 1e-42), gen).dequantize()
    assert torch.isfinite(tiny).all()


def test_stochastic_quantize_int8_is_unbiased_and_in_range():
    g = _heavy_tailed(16, 8, 4)
    gen = torch.Generator().manual_seed(5)
    qs = [stochastic_quantize(g, 8, gen) for _ in range(2000)]
    assert all(q.q.abs().max() <= 127 for q in qs)
    mean = sum(q.q / q.scale for q in qs) / len(qs)
    assert (mean - g).abs().max() < 5 * 0.5 * (g.abs().max() / 127) / len(qs) ** 0.5


def test_waterfill_sums_to_target_and_is_proportional():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(200, generator=gen) ** 6
    s[:10] = 0
    p = waterfill(s, 60.0)
    assert abs(float(p.sum()) - 60.0) < 1e-3
    assert torch.all(p[:10] == 0) and p.max() <= 1
    free = (p < 1) & (p > 0)
    ratio = p[free] / s[free]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)  # p = c s below saturation
    assert (p == 1).sum() > 0  # heavy tail: the largest rows saturate
    assert torch.all(s[p == 1].min() >= s[free].max())
    # the water-filled p beats proportional-then-clipped and uniform p at the same budget
    var = lambda q: float((s[s > 0] ** 2 / q[s > 0]).sum())
    uniform = torch.full_like(s, 60.0 / 190)
    assert var(p) < var(uniform)
    assert torch.equal(waterfill(s, 500.0), (s > 0).float())


def test_sample_rows_keeps_rows_at_their_probability():
    gen = torch.Generator().manual_seed(0)
    s = torch.linspace(0, 1, 50) ** 2
    p = waterfill(s, 20.0)
    counts = torch.zeros(50)
    trials = 4000
    for _ in range(trials):
        kept = sample_rows(s, 0.4, gen)
        counts[kept.index] += 1
        assert torch.allclose(kept.inv_p, 1 / p[kept.index])
    assert (counts / trials - p).abs().max() < 5 * 0.5 / trials**0.5
    full = sample_rows(s, 1.0, gen)
    assert torch.equal(full.index, torch.arange(1, 50)) and torch.all(full.inv_p == 1)
