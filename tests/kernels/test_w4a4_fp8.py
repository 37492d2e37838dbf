"""The FP8 W4A4 path: its activation quantizer and weight unpacker equal their references bit for bit, cuBLAS's FP8
GEMM returns exact integer sums on random-sign codes and stays within ``FP8_ACCUM_TOL`` on worst-case ones, and ``wxax_linear(path="fp8")`` equals the reference within the W4A4 bound
(``test_w4a4._check``), rows with out-of-range zero points included."""

import importlib

import pytest
import torch

from conftest import kernel_device
from test_w4a4 import KERNEL_MODULES, _activations, _check, _weight

from lowbit.errors import LowbitError
from lowbit.kernels.weights import PackedWeight

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]


@pytest.fixture(scope="module")
def fp8(triton_path):
    """``lowbit.kernels.w4a4_fp8`` on the Triton path (CUDA, else the CPU interpreter), one launch configuration."""
    triton_path(*KERNEL_MODULES, autotune=False)
    return importlib.import_module("lowbit.kernels.w4a4_fp8")


def _odd_rows(x):
    """Rows whose zero points leave [-1, 16] (all positive, all negative): the fix-up kernel's rows."""
    x = x.clone()
    if x.shape[0] > 6:
        x[4] = x[4].abs().remainder(1) + 3  # in [3, 4): zero point about -45
        x[6] = -x[6].abs().remainder(1) - 5  # in (-6, -5]: about 90
    return x


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (2, False), (3, True)])
@pytest.mark.parametrize("k,max_chunk", [(576, 4096), (1536, 4096), (1536, 256), (576, 128)])
def test_fp8_quantizer_is_bit_exact(fp8, bits, symmetric, k, max_chunk):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _odd_rows(_activations(9, k, dtype, seed=bits + k))
        got = fp8.quantize_activations_fp8(x, bits, symmetric, max_chunk)
        want = fp8.quantize_activations_fp8_reference(x.cpu(), bits, symmetric)
        assert got.codes.dtype == torch.float8_e4m3fn
        for field in want._fields:
            assert torch.equal(getattr(got, field).cpu().float(), getattr(want, field).float()), (field, dtype)
        if not symmetric and bits == 4:
            assert (want.offset != 0).sum() == 3  # the constant row and the two odd rows


def test_int8_quantizer_over_several_chunks_is_bit_exact(fp8):
    w4a4 = importlib.import_module("lowbit.kernels.w4a4")
    x = _activations(7, 1536, torch.bfloat16, seed=5)
    for group in (1536, 128, 512):
        got = w4a4.quantize_activations(x, 4, False, group, max_chunk=256)
        want = w4a4.quantize_activations_reference(x.cpu(), 4, False, group)
        for field in want._fields:
            assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), (field, group)


def test_unpack_refuses_an_odd_width(fp8):
    codes = torch.randint(0, 16, (3, 65))
    weight = PackedWeight.from_codes(codes, torch.ones(3, 1), torch.full((3, 1), 8.0), 4, 65).to(kernel_device())
    with pytest.raises(LowbitError, match="even input width"):
        fp8.unpack_fp8(weight)


@pytest.mark.parametrize("n,k", [(24, 576), (40, 1536), (3, 64)])
def test_unpack_is_exact(fp8, n, k):
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(-1, 17, (n, 1), generator=gen).float()  # the whole allowed range, ends included
    weight = PackedWeight.from_codes(codes, torch.rand(n, 1, generator=gen) + 0.1, zeros, 4, k).to(kernel_device())
    got = fp8.unpack_fp8(weight)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (n, k)
    assert torch.equal(got.cpu().float(), codes.float() - zeros)
    assert torch.equal(got.cpu().float(), fp8.unpack_fp8_reference(weight).cpu().float())
    layout = fp8.prepare_fp8(weight)
    assert layout.codes_fit and torch.equal(layout.row_sums.cpu(), (codes.float() - zeros).sum(1))


CASES = [  # (M, N, K, act symmetric, dtype, bias, cache the FP8 weight)
    (17, 48, 576, False, torch.bfloat16, True, False),
    (33, 32, 1536, False, torch.float16, False, True),
    (5, 16, 576, True, torch.bfloat16, False, False),
    (70, 16, 576, False, torch.float16, True, False),
]


@pytest.mark.parametrize("m,n,k,sym,dtype,bias,cache", CASES)
def test_fp8_path_matches_reference(fp8, monkeypatch, m, n, k, sym, dtype, bias, cache):
    w4a4 = importlib.import_module("lowbit.kernels.w4a4")
    weight = _weight(n, k, k, seed=m)
    x = _odd_rows(_activations(m, k, dtype, seed=n))
    b = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(kernel_device(), dtype) if bias else None

    def boom(*args, **kwargs):
        raise AssertionError("another path ran instead of the FP8 one")

    monkeypatch.setattr(w4a4, "wxax_linear_reference", boom)
    monkeypatch.setattr(w4a4, "quantize_activations", boom)
    y = w4a4.wxax_linear(x, weight, 4, sym, b, path="fp8", cache_weight=cache)
    _check(y, x, weight, 4, sym, b)
    assert (weight.cached(("wxax_fp8_codes",)) is not None) == cache


def test_dispatch_rule(fp8):
    w4a4 = importlib.import_module("lowbit.kernels.w4a4")
    dev = kernel_device()
    x = torch.randn(4, 576, device=dev, dtype=torch.bfloat16)
    ok = _weight(32, 576, 576)
    assert fp8.fp8_applies(x, ok, 4, None)
    assert fp8.fp8_applies(x, ok, 4, torch.zeros(32, device=dev, dtype=torch.bfloat16))
    assert not fp8.fp8_applies(x, ok, 4, torch.zeros(32, device=dev))  # a float32 bias would be rounded first
    assert not fp8.fp8_applies(x, ok, 8, None)
    assert not fp8.fp8_applies(x.float(), ok, 4, None)
    assert not fp8.fp8_applies(x, _weight(32, 576, 64), 4, None)  # grouped weights: INT8 GEMM
    assert not fp8.fp8_applies(x, _weight(24, 576, 576), 4, None)  # N not a multiple of 16
    assert not fp8.fp8_applies(x, _weight(32, 576, 576, bits=8), 4, None)
    codes = torch.randint(0, 16, (32, 576))
    far = PackedWeight.from_codes(codes, torch.ones(32, 1), torch.full((32, 1), 17.0), 4, 576).to(dev)
    assert not fp8.prepare_fp8(far).codes_fit and not fp8.fp8_applies(x, far, 4, None)
    with pytest.raises(LowbitError, match="path='fp8'"):
        w4a4.wxax_linear(x, far, 4, path="fp8")
    with pytest.raises(LowbitError, match="path must be"):
        w4a4.wxax_linear(x, ok, 4, path="fast")
    big = torch.randn(fp8.FP8_MIN_TOKENS, 576, device=dev, dtype=torch.bfloat16)
    on_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    assert fp8.use_fp8(big, ok, 4, None) == on_gpu
    assert not fp8.use_fp8(big[:-1], ok, 4, None)


# ------------------------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Hopper's FP8 tensor cores keep a short accumulator inside each chain even with use_fast_accum=False: measured on an
# H100 (2026-11-24, BENCHMARKS.md), sums of same-sign codes 9..16 were off by up to 7.8e-4 of sum |a| |w| (K = 576 to
# 14336), while random-sign codes, codes in [0, 16] and all-16 codes were exact. The path's stated tolerance is
# therefore FP8_ACCUM_TOL of sum |a| |w|: below half a bf16 ulp (2^-9) of the output unless the sum cancels.
FP8_ACCUM_TOL = 1e-3


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k", [576, 1536, 4096, 11008])
def test_fp8_gemm_integer_sums_within_tolerance(fp8, k):
    """Worst-case codes (large, same sign, odd products): cuBLAS with use_fast_accum=False stays within the stated
    tolerance; random-sign codes (what activations give) are exact."""
    gen = torch.Generator(device="cuda").manual_seed(k)
    m, n = 256, 256
    a = torch.randint(9, 17, (m, k), device="cuda", generator=gen).float()
    w = torch.randint(9, 17, (n, k), device="cuda", generator=gen).float()
    a[::3] *= -1
    w[1::4] = 15.0
    ones_a, ones_b = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")

    def sums(a, w):
        return fp8.scaled_mm(a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), ones_a, ones_b, None,
                             torch.float32).double()

    err = (sums(a, w) - a.double() @ w.double().T).abs()
    assert (err <= FP8_ACCUM_TOL * (a.double().abs() @ w.double().abs().T)).all(), err.max().item()
    a = torch.randint(-16, 17, (m, k), device="cuda", generator=gen).float()
    w = torch.randint(-16, 17, (n, k), device="cuda", generator=gen).float()
    assert torch.equal(sums(a, w), a.double() @ w.double().T)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2048, 8192])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_fp8_path_llama_shapes_on_gpu(fp8, monkeypatch, m, n, k, dtype):
    w4a4 = importlib.import_module("lowbit.kernels.w4a4")
    weight = _weight(n, k, k)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    x[7] = x[7].abs() + 1  # one row for the fix-up kernel
    assert fp8.use_fp8(x, weight, 4, None)
    acts = fp8.quantize_activations_fp8(x, 4, False)
    want = fp8.quantize_activations_fp8_reference(x, 4, False)
    assert all(torch.equal(getattr(acts, f).float(), getattr(want, f).float()) for f in want._fields)
    assert torch.equal(fp8.unpack_fp8(weight).float(), fp8.unpack_fp8_reference(weight).float())
    monkeypatch.setattr(w4a4, "quantize_activations", None)  # the INT8 path must not run
    _check(w4a4.wxax_linear(x, weight, 4, False, path="fp8"), x, weight, 4, False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,sym,bias", [(1037, 48, 576, False, True), (2049, 1536, 1536, False, False),
                                            (1024, 576, 1536, True, True), (3000, 4096, 576, False, True)])
def test_fp8_path_odd_shapes_on_gpu(fp8, m, n, k, sym, bias, dtype):
    w4a4 = importlib.import_module("lowbit.kernels.w4a4")
    weight = _weight(n, k, k, seed=m)
    x = _odd_rows(_activations(m, k, dtype, seed=n))
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    # path="fp8" forces the path below the auto threshold (M = 1037, 1024): it must apply, auto need not take it
    assert fp8.fp8_applies(x, weight, 4, b) and fp8.use_fp8(x, weight, 4, b) == (m >= fp8.FP8_MIN_TOKENS)
    _check(w4a4.wxax_linear(x, weight, 4, sym, b, path="fp8"), x, weight, 4, sym, b)
    _check(w4a4.wxax_linear(x, weight, 4, sym, b, path="fp8", cache_weight=True), x, weight, 4, sym, b)
