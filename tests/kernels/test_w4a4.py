"""WxAx: the per-token activation quantizer kernel equals the quantizer bit for bit, the integer GEMM is exact, and
``wxax_linear`` equals ``F.linear(fake_quantize(x), weight.dequantize())`` up to float32 epilogue rounding."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import kernel_device

from lowbit.errors import LowbitError
from lowbit.kernels.weights import PackedWeight
from lowbit.quant.quantizer import QuantSpec, fake_quantize

KERNEL_MODULES = ("lowbit.kernels.w4a16", "lowbit.kernels.int8_gemm", "lowbit.kernels.w4a4", "lowbit.kernels.w4a4_fp8")
EPILOGUE_TOL = 2e-5  # relative to sum |x_q| |w|: float32 rounding of the scales and the reference's float32 matmul


@pytest.fixture(scope="module")
def w4a4(triton_path):
    """The module on the Triton path: CUDA when present, else the CPU interpreter (see conftest.triton_path);
    one launch configuration per kernel (the LLaMA-shape GPU tests tune)."""
    triton_path(*KERNEL_MODULES, autotune=False)
    return importlib.import_module("lowbit.kernels.w4a4")


def _weight(n, k, group, bits=4, symmetric=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    return PackedWeight.quantize(w, bits, group, symmetric).to(kernel_device())


def _activations(m, k, dtype, seed):
    """Activations with outlier channels, a constant row and exact rounding ties (x = (j + 0.5) * step)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 3] *= 20
    if m > 2:
        x[1] = 0.75  # constant row: scale clamps to SCALE_MIN, zero point about -75000
        x[2] = (torch.arange(k) % 16 + 0.5) / 4  # many exact ties under power-of-two scales
    return x.to(kernel_device(), dtype)


def _check(y, x, weight, act_bits, symmetric, bias=None):
    xq = fake_quantize(x.float(), QuantSpec(act_bits, symmetric, "token"))
    w = weight.dequantize()
    truth = F.linear(xq, w, None if bias is None else bias.float())
    bound = EPILOGUE_TOL * (xq.abs() @ w.abs().T) + torch.finfo(x.dtype).eps * truth.abs() + 1e-6
    assert y.dtype == x.dtype and y.shape == truth.shape
    excess = ((y.float() - truth).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True), (2, False), (5, True)])
@pytest.mark.parametrize("k,group", [(576, 576), (1536, 128), (576, 192)])
def test_activation_quantizer_is_bit_exact(w4a4, bits, symmetric, k, group):
    for dtype in (torch.float32, torch.bfloat16):
        x = _activations(5, k, dtype, seed=bits + k)
        got = w4a4.quantize_activations(x, bits, symmetric, group)
        want = w4a4.quantize_activations_reference(x.cpu(), bits, symmetric, group)
        for field in want._fields:
            assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), (field, dtype)


def test_integer_gemm_is_exact(w4a4):
    """With unit scales the output is sum_k (q - zx)(c - zw) itself: integers, compared exactly."""
    from lowbit.kernels.int8_gemm import wxax_gemm

    gen = torch.Generator().manual_seed(9)
    m, n, k, group = 19, 24, 576, 64
    for bits in (4, 3, 8):
        codes = torch.randint(0, 2**bits, (n, k), generator=gen)
        zeros = torch.randint(-20, 2**bits + 20, (n, k // group), generator=gen).float()
        weight = PackedWeight.from_codes(codes, torch.ones(n, k // group), zeros, bits, group).to(kernel_device())
        x = torch.randn(m, k, generator=gen).to(kernel_device()) + torch.rand(m, 1, generator=gen).to(kernel_device())
        acts = w4a4.quantize_activations(x, 4, False, group)
        unit = acts._replace(scale=torch.ones_like(acts.scale))
        got = wxax_gemm(unit, w4a4.prepare_wxax(weight), None, torch.float32).cpu().double()
        q = (acts.codes.long() + acts.alpha.long()[:, None]).cpu()  # a + alpha = q - zx
        want = q.double() @ (codes - zeros.repeat_interleave(group, 1)).double().T  # |values| < 2^24: exact
        assert torch.equal(got, want), bits


CASES = [  # (M, N, K, group, weight bits, act bits, act symmetric, dtype, bias)
    (1, 40, 576, 576, 4, 4, False, torch.float32, True),
    (3, 33, 1536, 1536, 4, 4, True, torch.bfloat16, False),
    (17, 24, 576, 64, 4, 4, False, torch.float16, True),
    (17, 40, 1536, 128, 4, 4, False, torch.bfloat16, False),
    (33, 20, 576, 192, 4, 8, False, torch.float32, True),
    (5, 17, 576, 576, 8, 8, True, torch.float16, False),
    (3, 24, 1536, 128, 3, 6, False, torch.float32, False),
]


@pytest.mark.parametrize("m,n,k,group,wbits,abits,asym,dtype,bias", CASES)
def test_wxax_matches_reference(w4a4, monkeypatch, m, n, k, group, wbits, abits, asym, dtype, bias):
    weight = _weight(n, k, group, wbits, seed=m)
    x = _activations(m, k, dtype, seed=n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(kernel_device()) if bias else None

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(w4a4, "wxax_linear_reference", boom)
    _check(w4a4.wxax_linear(x, weight, abits, asym, b), x, weight, abits, asym, b)


def test_layouts(w4a4):
    weight4 = _weight(8, 256, 128)
    layout = w4a4.prepare_wxax(weight4)
    assert layout.packed and layout.qweight.dtype == torch.uint8 and layout.qweight.shape == (8, 128)
    assert w4a4.prepare_wxax(weight4) is layout
    codes = weight4.codes().long().cpu()
    byte = int(layout.qweight[5, 128 // 2 + 7])  # second block, byte 7: codes 128+7 (low) and 128+64+7 (high)
    assert byte & 15 == codes[5, 135] and byte >> 4 == codes[5, 199]
    assert torch.equal(layout.code_sums.cpu().T, codes.reshape(8, 2, 128).sum(-1).float())
    weight8 = _weight(8, 256, 64, bits=8)
    layout8 = w4a4.prepare_wxax(weight8)
    assert not layout8.packed and layout8.qweight.dtype == torch.int8 and layout8.block_k == 64


def test_group_without_kernel_runs_the_reference(w4a4):
    weight = _weight(8, 96, 32)
    x = _activations(3, 96, torch.float32, seed=3)
    assert torch.equal(w4a4.wxax_linear(x, weight, 4), w4a4.wxax_linear_reference(x, weight, 4))


def test_bad_input_is_one_clear_error(w4a4):
    weight = _weight(8, 128, 64)
    x = torch.randn(2, 128, device=kernel_device())
    for bad in (1, 9, 4.0):
        with pytest.raises(LowbitError, match="act_bits"):
            w4a4.wxax_linear(x, weight, bad)
    with pytest.raises(LowbitError, match="expects 128"):
        w4a4.wxax_linear(x[:, :64], weight, 4)
    with pytest.raises(LowbitError, match="float16, bfloat16 or float32"):
        w4a4.wxax_linear(x.to(torch.int8), weight, 4)
    with pytest.raises(LowbitError, match="divisible"):
        w4a4.quantize_activations(x[:, :100], 4, False, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 2048])
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 4096), (11008, 4096, 128), (4096, 11008, 11008)])
def test_llama_shapes_on_gpu(monkeypatch, w4a4, m, n, k, group):
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    weight = _weight(n, k, group)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    _check(w4a4.wxax_linear(x, weight, 4, False), x, weight, 4, False)
    _check(w4a4.wxax_linear(x, weight, 4, False, path="int8"), x, weight, 4, False)  # auto may take FP8
