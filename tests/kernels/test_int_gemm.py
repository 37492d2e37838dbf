"""Exact training GEMMs: the kernels equal ``int_matmul_reference`` bit for bit, with gathers, device-side row
counts and epilogue scales; the whole 4-bit training layer on the kernel path equals the reference path."""

import importlib

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train.config import TrainQuantConfig
from lowbit.train.dispatch import int_matmul, int_matmul_reference, int_matmul_scaled

KERNEL_MODULES = ("lowbit.kernels.philox", "lowbit.kernels.quantize", "lowbit.kernels.bitsplit", "lowbit.kernels.int_gemm",
                  "lowbit.kernels.sampled_gemm", "lowbit.kernels.lsq_inverse")


@pytest.fixture(scope="module")
def device(triton_path):
    """CUDA when present; else the CPU with Triton's interpreter (see conftest.triton_path)."""
    return triton_path(*KERNEL_MODULES)


def _g():
    return importlib.import_module("lowbit.kernels.int_gemm")


def _ints(shape, bits, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=gen).to(device)


@pytest.mark.parametrize("m,n,k", [(37, 20, 576), (5, 48, 1536), (64, 64, 64), (1, 3, 16)])
def test_int8_gemm_variants_equal_reference(device, m, n, k):
    g = _g()
    a, b = _ints((m, k), 4, m, device).float(), _ints((n, k), 4, n, device).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(m, generator=gen)[: m // 2 + 1].to(device)
    count = torch.tensor(max(1, m // 3), device=device)
    rs, cs = (torch.rand(index.numel(), generator=gen) + 0.5).to(device), (torch.rand(n, generator=gen) + 0.5).to(device)
    variants = [{}, {"index": index}, {"index": index, "count": count}, {"row_scale": rs[:1], "col_scale": cs},
                {"index": index, "count": count, "row_scale": rs, "col_scale": cs, "scale_first": True},
                {"index": index, "row_scale": rs}, {"col_scale": torch.tensor(0.3, device=device)}]
    for kw in variants:
        got, want = g.int8_matmul(a, b, **kw), g.int8_matmul_reference(a.cpu(), b.cpu(), **{
            key: (v.cpu() if torch.is_tensor(v) else v) for key, v in kw.items()})
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want), kw
    live = g.int8_matmul(a, b, index=index, count=count)
    assert torch.count_nonzero(live[int(count):]) == 0  # rows past the device-side count did no work


@pytest.mark.parametrize("bits_a,bits_b,k", [(4, 4, 576), (4, 4, 1536), (8, 4, 576), (8, 8, 1536), (2, 3, 40)])
def test_int_matmul_kernel_hook_is_exact(device, bits_a, bits_b, k):
    a, b = _ints((9, k), bits_a, 1, device).float(), _ints((7, k), bits_b, 2, device).float()
    want = int_matmul_reference(a.cpu(), b.cpu(), bits_a, bits_b)
    got = int_matmul(a, b, bits_a=bits_a, bits_b=bits_b)
    assert got.dtype == want.dtype and torch.equal(got.cpu(), want)  # 8x8 at K=1536 needs float64, as the reference
    scale = torch.tensor(0.0123, device=device)
    if bits_a + bits_b <= 8:
        got = int_matmul_scaled(a, b, scale, bits_a=bits_a, bits_b=bits_b)
        assert torch.equal(got.cpu(), want * scale.cpu()) or device == "cuda"
        assert torch.allclose(got.cpu(), want * scale.cpu(), rtol=2**-22, atol=0)  # cuBLAS epilogue: one rounding
        half = int_matmul_scaled(a, b, scale, bits_a=bits_a, bits_b=bits_b, out_dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16  # the float32 epilogue rounded once: bf16 of the float32 result
        assert torch.equal(half.cpu(), (want * scale.cpu()).bfloat16()) or device == "cuda"
        assert torch.allclose(half.cpu().float(), want * scale.cpu(), rtol=2**-8, atol=0)


def test_check_runs_on_cpu_and_is_opt_out(device, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS", "auto")  # CPU tensors: the reference, also where CUDA sets "triton"
    a = torch.zeros(4, 32)
    with pytest.raises(LowbitError, match="non-integer"):
        int_matmul(a + 0.5, a)
    with pytest.raises(LowbitError, match="4-bit range"):
        int_matmul_scaled(a + 8, a, torch.tensor(1.0))
    assert torch.equal(int_matmul(a + 1, a + 1, check=False), torch.full((4, 4), 32.0))


def test_refuses_products_without_exact_kernel(device):
    g = _g()
    assert not g.has_exact_kernel(2**20, 8, 8) and g.has_exact_kernel(4096, 8, 8)
    with pytest.raises(LowbitError, match="no exact integer kernel"):
        g.int_matmul_kernel(torch.zeros(2, 2**18, device=device), torch.zeros(2, 2**18, device=device), 8, 8)
    with pytest.raises(LowbitError, match="operands"):
        g.int8_matmul(torch.zeros(2, 4), torch.zeros(2, 5))


CONFIGS = [TrainQuantConfig(), TrainQuantConfig(sampling_ratio=1.0),
           TrainQuantConfig(act_granularity="token", weight_granularity="channel", random_signs=True),
           TrainQuantConfig(bits=8, hadamard=False, backward="int8"), TrainQuantConfig(block_size=128, pad=True)]


def _layer_step(cfg, dtype, device):
    from lowbit.train.linear import QuantTrainLinear

    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(device)
    layer = QuantTrainLinear(lin, cfg, index=3)
    x = torch.randn(37, 64, device=device).to(dtype).requires_grad_()
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=y.dtype))
    steps = [p.grad for p in (layer.act_step, layer.weight_step) if p is not None]
    return [y.detach(), x.grad, lin.weight.grad, lin.bias.grad, *steps]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["hq-lss", "no-sampling", "token-channel-signs", "int8", "pad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_layer_kernel_path_equals_reference(device, monkeypatch, cfg, dtype):
    """Fused quantize, fused bit split, fused rotations and the kernel GEMMs: forward, grad-input, grad-weight
    of a converted layer are bit for bit those of the reference path (odd M=37), its noise drawn as the kernels
    draw it; the LSQ step gradients (summed in the fused LSQ backward in another order) to float32 rounding."""
    if device == "cuda":
        pytest.skip("on CUDA the forward epilogue is cuBLAS's (one rounding apart): see the GPU test below")
    from lowbit.train import sampling

    monkeypatch.setattr(sampling, "uniform_noise", sampling.philox_noise)  # the reference draws the kernels' noise
    kernel = _layer_step(cfg, dtype, device)
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    reference = _layer_step(cfg, dtype, device)
    for got, want in zip(kernel[:4], reference[:4]):
        assert torch.equal(got, want)
    for got, want in zip(kernel[4:], reference[4:]):  # float sums over the elements, in another order
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_accumulation_is_exact_for_large_k(device):
    """FP8 with fp32 accumulation (use_fast_accum=False) is exact for int4 x int4 up to K=131072, including the
    adversarial case where a few +-1 products ride on partial sums of 2^20 (a 14-bit accumulator drops them)."""
    g = _g()
    for k in (576, 1536, 4096, 16384, 131072):
        a, b = _ints((256, k), 4, k, "cuda").float(), _ints((128, k), 4, k + 1, "cuda").float()
        a[0], b[0] = -8.0, -8.0
        a[1], b[1] = -8.0, -8.0
        a[1, ::97], b[1, ::89] = 1.0, 1.0
        assert torch.equal(g.fp8_matmul(a, b), int_matmul_reference(a, b, 4, 4))
        assert torch.equal(int_matmul(a, b), int_matmul_reference(a, b, 4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_exact_and_sync_free(device):
    g = _g()
    a, b = _ints((8192, 4096), 4, 0, "cuda").to(torch.int8), _ints((4096, 4096), 4, 1, "cuda").to(torch.int8)
    want = a.double() @ b.double().T
    assert torch.equal(g.int8_matmul(a, b).double(), want)
    assert torch.equal(g.fp8_matmul(a.to(g.FP8), b.to(g.FP8)).double(), want)
    index = torch.randperm(8192, device="cuda")[:3000]
    assert torch.equal(g.int8_matmul(a, b, index=index).double(), want[index])
    half, count = torch.tensor(0.5, device="cuda"), torch.tensor(100, device="cuda")  # host->device copies sync:
    torch.cuda.synchronize()  # made before the check, which covers only the kernel calls
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the kernel path raises
    try:
        int_matmul(a, b)
        int_matmul_scaled(a, b, half)
        g.int8_matmul(a, b, index=index, count=count)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", CONFIGS, ids=["hq-lss", "no-sampling", "token-channel-signs", "int8", "pad"])
def test_training_layer_on_gpu_matches_reference(device, monkeypatch, cfg):
    """Same as the CPU test; the forward's cuBLAS epilogue may round once differently (the backward's output
    gradient is fixed, so that cannot propagate into the stochastic parts)."""
    from lowbit.train import sampling

    monkeypatch.setattr(sampling, "uniform_noise", sampling.philox_noise)  # the reference draws the kernels' noise
    kernel = _layer_step(cfg, torch.bfloat16, "cuda")
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    reference = _layer_step(cfg, torch.bfloat16, "cuda")
    for got, want in zip(kernel, reference):
        assert torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-6 * want.float().abs().max().item())


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_padded_sync_free_backward_equals_compact(device, monkeypatch, ratio):
    """The reference backend's padded samples on CUDA (kept rows first, device-side count, gathered product) give
    exactly the estimates of the compact path from the same random draws, int8 and float32 operands alike. (The
    Triton backend's fused samples are checked against the reference in ``test_sampled_backward_kernels_equal_
    reference``.)"""
    import lowbit.train.backward as bwd
    from lowbit.train.sampling import sample_rows

    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    grad, qw, qx = bwd.heavy_tailed_problem(7)
    grad, qw, qx = grad.to(device), qw.to(device), qx.to(device)
    results = {}
    for padded in (False, True):
        monkeypatch.setattr(bwd, "sample_rows", lambda s, r, g, padded=padded: sample_rows(s, r, g, padded=padded))
        gen = torch.Generator(device=device).manual_seed(3)
        rows, weight, sq = bwd.split_rows_with_norms(grad, gen)
        operands = (qw, qx) if not padded else (qw.to(torch.int8), qx.to(torch.int8))
        gi = bwd.int4_grad_input(rows, weight, operands[0], ratio, gen, 4, sq)
        gw = bwd.int4_grad_weight(rows, weight, operands[1], ratio, gen, 4, sq)
        results[padded] = (gi, gw)
    for compact, padded in zip(results[False], results[True]):
        assert torch.equal(compact, padded)
    assert results[True][0].abs().sum() > 0 and results[True][1].abs().sum() > 0


def test_int8_gemm_scatter_into_equals_reference(device):
    """Kept rows added straight into their token's output row (at most two per row): equal to ``index_add_``."""
    g = _g()
    a, b = _ints((2 * 21, 96), 4, 5, device).to(torch.int8), _ints((40, 96), 4, 6, device).to(torch.int8)
    gen = torch.Generator().manual_seed(1)
    index = torch.randperm(42, generator=gen).to(device)
    rs = (torch.rand(42, generator=gen) * 3).to(device)
    for count in (torch.tensor(17, device=device), torch.tensor(42, device=device), None):
        got = g.int8_matmul(a, b, index=index, count=count, row_scale=rs, scatter_into=torch.zeros(21, 40, device=device))
        want = g.int8_matmul_reference(a.cpu(), b.cpu(), index=index.cpu(), row_scale=rs.cpu(),
                                       count=None if count is None else count.cpu(), scatter_into=torch.zeros(21, 40))
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("padded", [False, True])
def test_sampled_backward_kernels_equal_reference(device, monkeypatch, ratio, padded):
    """The fused sample, grad-weight as one GEMM gathering along its reduction (re-quantizing the sampled rows in
    its loads) and grad-input scattered from the gathered GEMM equal the reference backend's (compact or padded)
    products bit for bit (the reference drawing the kernels' Philox noise, ``sampling.philox_noise``)."""
    import lowbit.train.backward as bwd
    from lowbit.train import sampling
    from lowbit.train.sampling import sample_rows

    monkeypatch.setattr(bwd, "sample_rows", lambda s, r, g, padded=padded: sample_rows(s, r, g, padded=padded))
    monkeypatch.setattr(sampling, "uniform_noise", sampling.philox_noise)
    grad, qw, qx = bwd.heavy_tailed_problem(11, n=70, c=40, k=72)
    grad = grad * torch.logspace(-3, 1, 40)  # uneven columns: some weights far from 1
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LOWBIT_KERNELS", backend)
        gen = torch.Generator(device=device).manual_seed(4)
        rows, weight, sq = bwd.split_rows_with_norms(grad.to(device), gen)
        gi = bwd.int4_grad_input(rows, weight, qw.to(device, torch.int8), ratio, gen, 4, sq)
        gw = bwd.int4_grad_weight(rows, weight, qx.to(device, torch.int8), ratio, gen, 4, sq)
        results[backend] = (gi.cpu(), gw.cpu())
    for got, want in zip(*results.values()):
        assert torch.equal(got, want)
    assert results["triton"][1].abs().sum() > 0


@pytest.mark.parametrize("block,pad,signs,per_row", [(32, 0, False, False), (64, 24, True, True), (0, 0, False, True),
                                                      (256, 0, True, False)])
def test_fused_lsq_backward_inverse_equals_reference(device, block, pad, signs, per_row):
    """LSQ's backward and the inverse Hadamard in one pass equal ``lsq_backward`` + ``Rotation.inverse``: the input
    gradient bit for bit (float32, and bf16 as its rounding), the step gradient (summed per row in the kernel, in
    another order) to float32 rounding; ties at half-integers and values outside the grid included."""
    from lowbit.kernels.lsq_inverse import lsq_backward_inverse
    from lowbit.kernels.quantize import hadamard_rotate_reference
    from lowbit.quant.hadamard import random_signs
    from lowbit.train.hq import Quantized, lsq_backward

    gen = torch.Generator().manual_seed(block + pad)
    m, k = 19, max(block, 1) * 3 if block else 80
    grad = torch.randn(m, k, generator=gen) * 3
    v = torch.randn(m, k, generator=gen) * 6
    v[:, ::7] = torch.randint(-20, 20, (m, len(range(0, k, 7))), generator=gen) / 2  # ties and edges
    step = torch.rand(m, 1, generator=gen) + 0.1 if per_row else torch.tensor(0.07)
    grad, v, step = grad.to(device), v.to(device), step.to(device)  # the reference sums on the same device
    sgn = random_signs(k, 3, device) if signs else None
    numel = None if per_row else 1234.0
    want_g, want_s = lsq_backward(grad, Quantized(torch.zeros_like(v), step, v), -8, 7, numel)
    want_x = hadamard_rotate_reference(want_g, block, sgn, pad, inverse=True)  # = the fused rotation (test_quantize)
    got_x, got_s = lsq_backward_inverse(grad, v, step, block, sgn, pad, -8, 7, numel)
    assert torch.equal(got_x, want_x) and got_s.shape == want_s.shape
    terms = (grad * torch.where((v >= -8) & (v <= 7), v.round() - v, v.clamp(-8, 7))).abs()
    scale = 1 / (k * 7) ** 0.5 if per_row else 1 / (numel * 7) ** 0.5
    assert torch.all((got_s - want_s).abs() <= 1e-5 * scale * (terms.sum(dim=-1) if per_row else terms.sum()))
    got_b, got_sb = lsq_backward_inverse(grad, v, step, block, sgn, pad, -8, 7, numel, torch.bfloat16)
    assert got_b.dtype == torch.bfloat16 and torch.equal(got_b, want_x.bfloat16())
    # on the H100 the bf16-output launch summed the step gradient in another order than the float32 one (one-row,
    # 256-column tiles compile to another layout), so it is held to the reference's bound, not to got_s's bits
    bound = 1e-5 * scale * (terms.sum(dim=-1) if per_row else terms.sum())
    assert torch.all((got_sb - want_s).abs() <= bound)
