"""W4A16: the packed weight's contract, and each Triton path (GEMV, tiled GEMM, whole-weight dequantize) against
``F.linear(x, weight.dequantize(x.dtype))`` on odd shapes, group sizes and dtypes (CPU interpreter or CUDA)."""

import importlib

import pytest
import torch

from conftest import assert_w4a16_close, kernel_device

from lowbit.errors import LowbitError
from lowbit.kernels.weights import PackedWeight
from lowbit.quant.packing import pack

KERNEL_MODULES = ("lowbit.kernels.w4a16", "lowbit.kernels.int8_gemm", "lowbit.kernels.w4a4")


@pytest.fixture(scope="module")
def w4a16(triton_path):
    """The module on the Triton path: CUDA when present, else the CPU interpreter (see conftest.triton_path);
    one launch configuration per kernel (the LLaMA-shape GPU tests tune)."""
    triton_path(*KERNEL_MODULES, autotune=False)
    return importlib.import_module("lowbit.kernels.w4a16")


def _weight(n, k, group, symmetric=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    return PackedWeight.quantize(w, 4, group, symmetric).to(device)


def _no_reference(module, monkeypatch):
    """Make the reference path fail, so a test proves the Triton path ran."""
    def boom(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")
    monkeypatch.setattr(module, "w4a16_linear_reference", boom)


CASES = [  # (M, N, K, group, dtype, symmetric, bias): M=1 the GEMV, M >= 2 the fused GEMM (heuristic config)
    (1, 40, 576, 64, torch.float32, False, True),
    (1, 33, 1536, 128, torch.bfloat16, False, False),
    (1, 24, 576, 576, torch.float16, True, True),
    (1, 37, 1536, 1536, torch.float32, True, False),
    (3, 40, 576, 64, torch.float16, False, False),
    (17, 33, 1536, 128, torch.float32, False, True),
    (17, 24, 576, 576, torch.bfloat16, True, False),
    (3, 20, 1536, 1536, torch.bfloat16, False, True),
    (5, 24, 1536, 128, torch.float16, True, False),
    (40, 8, 256, 32, torch.float32, False, False),
    (70, 33, 576, 64, torch.bfloat16, False, True),
    (70, 20, 1536, 128, torch.float32, True, False),
]


@pytest.mark.parametrize("m,n,k,group,dtype,symmetric,bias", CASES)
def test_kernel_paths_match_reference(w4a16, monkeypatch, m, n, k, group, dtype, symmetric, bias):
    device = kernel_device()
    weight = _weight(n, k, group, symmetric, seed=m + n, device=device)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    _no_reference(w4a16, monkeypatch)
    assert_w4a16_close(w4a16.w4a16_linear(x, weight, b), x, weight, b)


def test_leading_dims_and_zero_rows(w4a16):
    weight = _weight(24, 576, 64, device=kernel_device())
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(1)).to(kernel_device())
    y = w4a16.w4a16_linear(x, weight)
    assert y.shape == (2, 3, 24)
    assert_w4a16_close(y.reshape(6, 24), x.reshape(6, 576), weight)
    assert w4a16.w4a16_linear(x[:0], weight).shape == (0, 3, 24)


def test_far_zero_points_keep_float32_metadata(w4a16):
    """A constant row quantizes to scale 1e-5 and zero point -1e5: not exact in bf16, so the layout keeps float32."""
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(2))
    w[3] = 1.0
    weight = PackedWeight.quantize(w, 4, 64).to(kernel_device())
    assert weight.zeros.abs().max() > 1e4
    assert w4a16.prepare_w4a16(weight, torch.bfloat16).scales.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 576, generator=torch.Generator().manual_seed(3)).to(kernel_device(), dtype)
        assert_w4a16_close(w4a16.w4a16_linear(x, weight), x, weight)


def test_dequantize_kernel_is_bit_exact(w4a16):
    weight = _weight(33, 576, 64, device=kernel_device())
    layout = w4a16.prepare_w4a16(weight, torch.bfloat16)
    # the CPU interpreter casts float32 to bfloat16 by truncation, the GPU rounds to nearest as torch does
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if torch.cuda.is_available() else ())
    for dtype in dtypes:
        assert torch.equal(w4a16._dequantize(weight, layout, dtype), weight.dequantize(dtype))


def test_planar_layout_holds_the_codes(w4a16):
    codes = torch.randint(0, 16, (6, 256), generator=torch.Generator().manual_seed(4))
    words = w4a16.planar_words(codes, 64)  # chunk 64: KW = 8
    assert words.shape == (2, 32, 4) and words.dtype == torch.int32
    row, chunk, j, i = 5, 2, 3, 6
    word = int(words[row // 4, chunk * 8 + j, row % 4]) & 0xFFFFFFFF
    assert (word >> (4 * i)) & 15 == int(codes[row, chunk * 64 + i * 8 + j])
    assert int(words[1, :, 2:].abs().sum()) == 0  # rows 6 and 7 are padding


def test_prepared_layout_is_cached_per_dtype(w4a16):
    weight = _weight(8, 256, 64)
    first = w4a16.prepare_w4a16(weight, torch.float16)
    assert w4a16.prepare_w4a16(weight, torch.float16) is first
    assert w4a16.prepare_w4a16(weight, torch.float32) is not first
    assert weight.to("cpu") is weight


def test_other_widths_and_groups_run_the_reference(w4a16):
    """3-bit weights and a group of 8 have no kernel: the result is the reference itself."""
    for bits, group in ((3, 64), (4, 8)):
        w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits))
        weight = PackedWeight.quantize(w, bits, group).to(kernel_device())
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5)).to(kernel_device())
        assert torch.equal(w4a16.w4a16_linear(x, weight), w4a16.w4a16_linear_reference(x, weight))


def test_weight_contract():
    codes = torch.randint(0, 16, (4, 10), generator=torch.Generator().manual_seed(6))
    scales, zeros = torch.rand(4, 2) + 0.1, torch.full((4, 2), 7.0)
    weight = PackedWeight.from_codes(codes, scales, zeros, 4, 5)
    assert weight.packed.shape == (4, 5) and torch.equal(weight.codes().long(), codes)
    expected = (codes - 7.0) * scales.repeat_interleave(5, 1)
    assert torch.equal(weight.dequantize(), expected)
    assert weight.dequantize(torch.float16).dtype == torch.float16
    assert set(weight.tensors()) == {"packed", "scales", "zeros"}


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_round_trips_through_the_quantizer(symmetric):
    from lowbit.quant.quantizer import QuantSpec, fake_quantize

    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(7))
    weight = PackedWeight.quantize(w, 4, 64, symmetric)
    spec = QuantSpec(4, symmetric, "group", 64)
    assert torch.allclose(weight.dequantize(), fake_quantize(w, spec), atol=1e-6, rtol=0)


def test_bad_input_is_one_clear_error(w4a16):
    weight = _weight(8, 64, 32)
    good = torch.randn(2, 64)
    with pytest.raises(LowbitError, match="float16, bfloat16 or float32"):
        w4a16.w4a16_linear(good.to(torch.int32), weight)
    with pytest.raises(LowbitError, match="expects 64"):
        w4a16.w4a16_linear(torch.randn(2, 48), weight)
    with pytest.raises(LowbitError, match="bias"):
        w4a16.w4a16_linear(good, weight, torch.randn(7))
    with pytest.raises(LowbitError, match="truncated"):
        PackedWeight(weight.packed[:, :-1], weight.scales, weight.zeros, 4, 32, 64, 8)
    with pytest.raises(LowbitError, match="scales must be float32"):
        PackedWeight(weight.packed, weight.scales.half(), weight.zeros, 4, 32, 64, 8)
    with pytest.raises(LowbitError, match="divisor"):
        PackedWeight(weight.packed, weight.scales, weight.zeros, 4, 48, 64, 8)
    codes = torch.randint(0, 16, (8, 64))
    with pytest.raises(LowbitError, match="out of range"):
        PackedWeight.from_codes(codes + 8, weight.scales, weight.zeros, 4, 32)
    with pytest.raises(LowbitError, match="integers"):
        PackedWeight.from_codes(codes, weight.scales, weight.zeros + 0.5, 4, 32)
    with pytest.raises(LowbitError, match="positive"):
        PackedWeight.from_codes(codes, -weight.scales, weight.zeros, 4, 32)
    assert pack(codes, 4).data.shape == weight.packed.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 2048])
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (11008, 4096, 128), (4096, 11008, 11008)])
def test_llama_shapes_on_gpu(monkeypatch, w4a16, m, n, k, group):
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    weight = _weight(n, k, group, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert_w4a16_close(w4a16.w4a16_linear(x, weight), x, weight)


GEMM_CASES = [  # (M, N, K, group, dtype, bias, config (BLOCK_N, BLOCK_M, WP, warps, stages, splits) or "dequant")
    (17, 40, 576, 64, torch.float16, True, (32, 16, 16, 4, 4, 1)),  # 2 groups per step; K tail (72 words)
    (5, 33, 1536, 128, torch.bfloat16, False, (32, 16, 32, 4, 3, 3)),  # split K in 3, one group per step
    (2, 37, 576, 576, torch.float32, True, (32, 16, 16, 4, 4, 2)),  # per-channel 576: steps straddle no group
    (40, 24, 1536, 1536, torch.float16, True, (64, 32, 16, 4, 4, 4)),  # per-channel, split, bias on split 0
    (70, 20, 576, 64, torch.bfloat16, False, "dequant"),  # whole-weight dequantize + matmul
    (3, 24, 512, 32, torch.float16, False, (32, 16, 16, 4, 4, 1)),  # chunk 32: KW 4, 4 groups per step
]


@pytest.mark.parametrize("m,n,k,group,dtype,bias,config", GEMM_CASES)
def test_gemm_configs(w4a16, m, n, k, group, dtype, bias, config):
    """The M >= 2 paths launched with explicit configs: odd shapes, K tails, split K, group sizes, every dtype."""
    gemm = w4a16.w4a16_gemm
    device = kernel_device()
    weight = _weight(n, k, group, seed=m + k, device=device)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    layout = w4a16.prepare_w4a16(weight, dtype)
    y = gemm.launch(x, weight, layout, b, config)
    assert_w4a16_close(y, x, weight, b)
    assert torch.equal(y, gemm.launch(x, weight, layout, b, config))


def test_gemm_candidates_and_splits(w4a16):
    """Small M: the bucket's own row tile, split K only where the output tiles are too few; large M: the wide tiles
    and dequantize + cuBLAS."""
    gemm = w4a16.w4a16_gemm
    narrow = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 128, 128, 4096, 4096)
    wide = w4a16.W4A16Layout(torch.empty(2752, 1, 1), None, None, 128, 128, 4096, 11008)
    assert gemm.bucket(2) == 16 and gemm.bucket(33) == 64 and gemm.bucket(65) == 128 and gemm.bucket(9000) == 4096
    assert gemm.auto_splits(narrow, 16, 64, 16, 16) == 4  # 64 tiles: 4 splits of 8 steps
    assert gemm.auto_splits(wide, 16, 64, 16, 16) == 1  # 172 tiles: 1 (>= MIN_CTAS / 2)
    small = gemm.candidates(narrow, 16)
    assert all(c[1] == 16 for c in small) and any(c[5] > 1 for c in small)
    large = gemm.candidates(narrow, 512)
    assert gemm.DEQUANT in large and all(c == gemm.DEQUANT or c[1] <= 512 for c in large)


GEMV_CASES = [  # (N, K, group, dtype, bias, config (BNB, CHUNKS, warps, splits)): odd N, per-channel and grouped
    (33, 1536, 128, torch.bfloat16, True, (1, 4, 1, 1)),  # unsplit, 3 loop steps
    (33, 1536, 128, torch.float16, False, (1, 4, 1, 3)),  # split: the last CTA of a row tile sums 3 partials
    (37, 576, 64, torch.float32, True, (2, 2, 1, 4)),  # 9 chunks in 4 splits of 1 step each: last step masked
    (40, 576, 576, torch.bfloat16, False, (1, 2, 1, 2)),  # per-channel (one group of 9 chunks), split
    (37, 1536, 1536, torch.float16, True, (2, 8, 1, 1)),  # per-channel, unsplit, 12 chunks in 2 steps of 8
    (24, 576, 32, torch.float16, True, (1, 4, 1, 5)),  # chunk 32: 18 chunks, 5 steps, 5 splits
]


@pytest.mark.parametrize("n,k,group,dtype,bias,config", GEMV_CASES)
def test_gemv_configs_split_and_unsplit(w4a16, n, k, group, dtype, bias, config):
    """Every GEMV path, launched with an explicit config: correct, the same bits twice, and a split launch leaves
    its counters zeroed (reusable by the next call or graph replay)."""
    gemv = w4a16.w4a16_gemv
    device = kernel_device()
    weight = _weight(n, k, group, seed=n + k, device=device)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(1, k, generator=gen).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    layout = w4a16.prepare_w4a16(weight, dtype)
    ys = []
    for _ in range(2):
        y = torch.full((1, n), float("nan"), dtype=dtype, device=device)
        gemv._launch(x, layout, b, y, config)
        ys.append(y)
    assert_w4a16_close(ys[0], x, weight, b)
    assert torch.equal(ys[0], ys[1])
    assert all(int(c.abs().sum()) == 0 for c in gemv._counters.values())
    if config[3] > 1:
        assert gemv._counters, "a split launch should have used the cached counters"


def test_gemv_heuristic_splits_narrow_n_only(w4a16):
    """Few row tiles split K (enough CTAs for the GPU); many do not; a split never exceeds the loop steps."""
    gemv = w4a16.w4a16_gemv
    narrow = w4a16.W4A16Layout(torch.empty(64, 1, 1), None, None, 128, 128, 4096, 256)
    wide = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 128, 128, 4096, 4096)
    assert gemv.auto_splits(wide, (1, 32, 4)) == 1
    assert gemv.auto_splits(narrow, (1, 8, 4)) == 4  # 64 row tiles, 4 steps: 4 splits of one step
    assert gemv.auto_splits(narrow, (2, 8, 4)) == 4  # 32 row tiles: 8 wanted, 4 steps at most
    assert gemv.auto_splits(narrow, (1, 32, 4)) == 1  # 4096 / 128 = 32 chunks: one step of 32
    tiny = w4a16.W4A16Layout(torch.empty(2, 1, 1), None, None, 64, 64, 576, 8)
    assert gemv.auto_splits(tiny, (1, 2, 1)) == 5  # 9 chunks in 2-chunk steps: 5 steps at most
