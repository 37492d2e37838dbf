"""The W4A16 batch-1 GEMV (``lowbit.kernels.w4a16_gemv``) against ``F.linear(x, weight.dequantize())``: every
constexpr path (prefetch on/off, paired shifts for 16-bit activations, split or not) and every tile the tuner
times, on odd shapes (K = 576 and 1536, N not a multiple of the tile), fp16/bf16/fp32, bias or not, group
32/64/128/per-channel. CPU interpreter or CUDA.

The inline-PTX step (``w4a16_gemv_asm``, packed 16-bit dequantization) runs only on CUDA: on the CPU its PyTorch
reference, which rounds as the PTX does, is held to the same bound; on the GPU the kernel is compared with the
float32 truth and with that reference, on the LLaMA shapes and odd ones, bf16 and fp16, group 128 and per channel.
The tuner's candidates hold every tile with both steps where the PTX one can run, and it keeps the faster."""

import importlib

import pytest
import torch

from conftest import assert_w4a16_close, kernel_device

from lowbit.kernels.weights import PackedWeight

KERNEL_MODULES = ("lowbit.kernels.w4a16",)


@pytest.fixture(scope="module")
def w4a16(triton_path):
    triton_path(*KERNEL_MODULES, autotune=False)
    return importlib.import_module("lowbit.kernels.w4a16")


def _case(w4a16, n, k, group, dtype, bias, seed=0, scale_x=1.0):
    device = kernel_device()
    gen = torch.Generator().manual_seed(seed + n + k)
    w = torch.randn(n, k, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    weight = PackedWeight.quantize(w, 4, group).to(device)
    x = (torch.randn(1, k, generator=gen) * scale_x).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return weight, x, b, w4a16.prepare_w4a16(weight, dtype)


def _run(gemv, x, layout, b, config):
    y = torch.full((1, layout.out_features), float("nan"), dtype=x.dtype, device=x.device)
    gemv._launch(x, layout, b, y, config)
    return y


CASES = [  # (N, K, group, dtype, bias, config (BNB, CHUNKS, warps, splits, prefetch))
    (33, 1536, 128, torch.bfloat16, True, (2, 2, 1, 1, True)),  # paired shifts, prefetch, 6 steps, odd N
    (33, 1536, 128, torch.bfloat16, True, (2, 2, 1, 1, False)),  # the same without prefetch
    (40, 576, 64, torch.float16, False, (4, 2, 1, 3, True)),  # chunk 64 (KW 8), split 3, last step masked
    (37, 576, 64, torch.float32, True, (2, 4, 1, 2, True)),  # float32: unpaired shifts, split
    (24, 576, 576, torch.float16, True, (1, 2, 1, 1, True)),  # per-channel, 9 chunks in 5 steps, last masked
    (37, 1536, 1536, torch.bfloat16, False, (8, 4, 1, 2, False)),  # per-channel, split, no prefetch, 8 groups
    (20, 576, 32, torch.float32, False, (1, 4, 1, 5, True)),  # chunk 32 (KW 4): 18 chunks in 5 splits
    (9, 1536, 128, torch.float16, True, (8, 1, 1, 4, True)),  # more row groups than rows
]


@pytest.mark.parametrize("n,k,group,dtype,bias,config", CASES)
def test_gemv_paths_match_reference(w4a16, n, k, group, dtype, bias, config):
    """Each path is correct, gives the same bits twice, and leaves a split launch's counters zeroed."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, n, k, group, dtype, bias)
    first, second = _run(gemv, x, layout, b, config), _run(gemv, x, layout, b, config)
    assert_w4a16_close(first, x, weight, b)
    assert torch.equal(first, second)
    assert all(int(c.abs().sum()) == 0 for c in gemv._counters.values())


def test_prefetch_does_not_change_the_bits(w4a16):
    """Prefetching only moves loads: the same sums in the same order, so the same bits."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, 45, 1536, 128, torch.bfloat16, True)
    assert torch.equal(_run(gemv, x, layout, b, (2, 2, 1, 2, True)), _run(gemv, x, layout, b, (2, 2, 1, 2, False)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_tuner_candidate_is_correct(w4a16, dtype):
    """Every config ``candidates`` lists for this device's step kinds (what the tuner may pick) on a shape that
    splits K: the plain step only on the CPU, both steps on CUDA for bf16."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, 52, 1536, 64, dtype, True)
    configs = gemv.candidates(layout, gemv.step_kinds(x.dtype, layout.scales.dtype))
    assert any(c[3] > 1 for c in configs) and any(not c[4] for c in configs)
    for config in configs:
        assert_w4a16_close(_run(gemv, x, layout, b, config), x, weight, b)


def test_large_activations_and_scales_stay_accurate(w4a16):
    """fp16 activations in the hundreds: (256 + c) x stays well inside float32, the bound holds."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, 17, 576, 64, torch.float16, False, scale_x=300.0)
    assert_w4a16_close(_run(gemv, x, layout, b, (4, 2, 1, 1, True)), x, weight, b)


def test_heuristic_and_candidates_shapes(w4a16):
    """CHUNKS follows the chunk width (half as many positions per step as threads); 4-field configs still work."""
    gemv = w4a16.w4a16_gemv
    wide = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 128, 128, 4096, 4096)
    assert gemv.tile_chunks(wide, 4) == 4 and gemv.tile_chunks(wide, 1) == 1
    narrow_chunk = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 32, 32, 4096, 4096)
    assert gemv.tile_chunks(narrow_chunk, 2) == 8
    for config in gemv.candidates(wide):
        bnb, chunks, warps, splits, prefetch, use_asm = config
        assert chunks * (wide.chunk // 8) * 2 == 32 * warps and splits >= 1 and isinstance(prefetch, bool)
        assert isinstance(use_asm, bool)
    weight, x, b, layout = _case(w4a16, 33, 576, 64, torch.bfloat16, False)
    assert_w4a16_close(_run(gemv, x, layout, b, (1, 4, 1, 1)), x, weight, b)


def test_candidates_time_both_steps(w4a16):
    """Where the PTX step can run, every tile is a candidate with each step (asm True and False), and nothing else
    changes; with the plain step only (the CPU, float32 x or metadata) each tile appears once, asm False."""
    gemv = w4a16.w4a16_gemv
    for n in (4096, 256):  # unsplit and split tiles
        layout = w4a16.W4A16Layout(torch.empty(n // 4, 1, 1), None, None, 128, 128, 4096, n)
        both, plain = gemv.candidates(layout, (True, False)), gemv.candidates(layout, (False,))
        assert gemv.candidates(layout) == both and all(not c[5] for c in plain)
        assert [c for c in both if c[5]] == [c[:5] + (True,) for c in plain]
        assert [c for c in both if not c[5]] == plain and len(both) == 2 * len(plain) == len(set(both))
    assert gemv.step_kinds(torch.float32, torch.float32) == (False,)
    assert gemv.step_kinds(torch.bfloat16, torch.float32) == (False,)  # metadata not 16-bit: no PTX step
    cuda = torch.cuda.is_available()
    for dtype in (torch.bfloat16, torch.float16):
        assert gemv.step_kinds(dtype, dtype) == ((True, False) if cuda else (False,))
        assert gemv.uses_asm((8, 4, 4, 1, True, True), dtype, dtype) == cuda
        assert not gemv.uses_asm((8, 4, 4, 1, True, False), dtype, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_step_config_launches(w4a16, dtype):
    """A config of either step is accepted; on the CPU the PTX one falls back to the plain step (the same bits)."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, 36, 1536, 128, dtype, True)
    ys = {step: _run(gemv, x, layout, b, (2, 2, 1, 2, True, step)) for step in (True, False)}
    for y in ys.values():
        assert_w4a16_close(y, x, weight, b)
    if not torch.cuda.is_available():
        assert torch.equal(ys[True], ys[False])


def test_tuner_keeps_the_faster_step(w4a16, monkeypatch):
    """The tuner times every candidate of both steps (as on CUDA; timings faked here) and keeps the fastest, here a
    plain-step config; the call runs it and later calls reuse it."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, 20, 576, 64, torch.bfloat16, False)
    timed = []

    def fake_time(x, layout, copies, bias, y, config):
        timed.append(config)
        return 1.0 if config[5] else 0.5 - 0.001 * len(timed)  # the last plain candidate is the fastest

    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    monkeypatch.setattr(gemv, "interpreting", lambda: False)  # the kernel itself still runs as before
    monkeypatch.setattr(gemv, "step_kinds", lambda x_dtype, meta_dtype: (True, False))
    monkeypatch.setattr(gemv.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gemv, "_layout_copies", lambda layout, device: [])
    monkeypatch.setattr(gemv, "_time_config", fake_time)
    monkeypatch.setattr(gemv, "_tuned", {})
    assert_w4a16_close(gemv.gemv(x, layout, None), x, weight)
    assert timed == gemv.candidates(layout, (True, False))
    (chosen,) = gemv._tuned.values()
    assert chosen == [c for c in timed if not c[5]][-1]
    gemv.gemv(x, layout, None)
    assert len(timed) == len(gemv.candidates(layout, (True, False)))  # tuned once


ASM_CASES = [  # (N, K, group, dtype, scale_x): odd shapes, zero points as the quantizer makes them
    (33, 1536, 128, torch.bfloat16, 1.0),
    (40, 576, 64, torch.float16, 1.0),
    (37, 1536, 1536, torch.bfloat16, 1.0),  # per channel
    (24, 576, 576, torch.float16, 1.0),
    (17, 576, 64, torch.float16, 300.0),  # large fp16 activations: the x / 16 pairs keep the lanes finite
    (64, 4096, 128, torch.bfloat16, 1.0),
]


@pytest.mark.parametrize("n,k,group,dtype,scale_x", ASM_CASES)
def test_inline_ptx_numerics_within_bound(w4a16, n, k, group, dtype, scale_x):
    """The packed 16-bit arithmetic of the PTX step (its PyTorch reference) stays inside the tests' bound."""
    asm = importlib.import_module("lowbit.kernels.w4a16_gemv_asm")
    weight, x, b, layout = _case(w4a16, n, k, group, dtype, True, scale_x=scale_x)
    assert_w4a16_close(asm.gemv_reference(x.cpu(), _cpu(layout), b.cpu()), x.cpu(), weight.to("cpu"), b.cpu())


def test_word_dot_pairs_planes_with_their_activations(w4a16):
    """Plane i of a word (nibble i) meets activation i; with small integers every step is exact."""
    asm = importlib.import_module("lowbit.kernels.w4a16_gemv_asm")
    codes = torch.tensor([3, 15, 0, 7, 9, 1, 12, 5])
    word = int((codes << (4 * torch.arange(8))).sum())
    words = torch.tensor([word - 2**32 if word >= 2**31 else word], dtype=torch.int32)
    x = torch.tensor([[1.0, -2.0, 4.0, 0.5, -1.0, 3.0, 2.0, -0.25]])
    for dtype in (torch.bfloat16, torch.float16):
        got = asm.word_dot_reference(words, x.to(dtype), torch.tensor([4.0], dtype=dtype))
        want = float(((codes - 4) * x[0]).sum()) * asm.X_SCALE[dtype]
        assert float(got) == want


def _cpu(layout):
    return type(layout)(layout.words.cpu(), layout.scales.cpu(), layout.zeros.cpu(), layout.chunk, layout.group_size,
                        layout.in_features, layout.out_features)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,group,dtype,scale_x", ASM_CASES + [
    (4096, 4096, 128, torch.bfloat16, 1.0), (11008, 4096, 128, torch.float16, 1.0),
    (4096, 11008, 128, torch.bfloat16, 1.0), (14336, 4096, 128, torch.bfloat16, 1.0),
    (4096, 4096, 4096, torch.float16, 1.0), (4096, 11008, 11008, torch.bfloat16, 1.0)])
def test_inline_ptx_path_on_gpu(w4a16, n, k, group, dtype, scale_x):
    """On CUDA the PTX step is taken; split, unsplit, prefetching or not, it is within the bound of the truth and
    close to its own PyTorch reference, and the plain-Triton step (asm off) still passes too. (Every tuner
    candidate runs in ``test_llama_shapes_every_candidate_on_gpu``.)"""
    gemv, asm = w4a16.w4a16_gemv, importlib.import_module("lowbit.kernels.w4a16_gemv_asm")
    weight, x, b, layout = _case(w4a16, n, k, group, dtype, True, scale_x=scale_x)
    assert asm.asm_supported(x.dtype, layout.scales.dtype)
    ref = asm.gemv_reference(x, layout, b).float()
    configs = [gemv.heuristic(layout), (2, 4, 2, 3, True, True), (8, 1, 1, 2, False, True), (4, 2, 1, 1, True, True)]
    for config in configs + [gemv.heuristic(layout)[:5] + (False,)]:  # the last one: the plain-Triton step
        y = _run(gemv, x, layout, b, config)
        assert_w4a16_close(y, x, weight, b)
        if config[5]:  # only the summation order differs from the reference
            scale = (x.float().abs() @ weight.dequantize().abs().T) + 1e-6
            assert float(((y.float() - ref).abs() / scale).max()) < 4 * torch.finfo(dtype).eps, config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuner_times_graph_replays(w4a16, monkeypatch):
    """With autotuning on, the first call times the candidates as CUDA-graph replays and remembers one of them."""
    gemv = w4a16.w4a16_gemv
    monkeypatch.setenv("LOWBIT_AUTOTUNE", "1")
    weight, x, b, layout = _case(w4a16, 1024, 4096, 128, torch.bfloat16, False)
    copies = gemv._layout_copies(layout, x.device)
    assert len(copies) >= 2
    y = torch.empty((1, 1024), dtype=x.dtype, device="cuda")
    assert gemv._time_config(x, layout, copies, None, y, gemv.heuristic(layout)) > 0
    assert_w4a16_close(gemv.gemv(x, layout, None), x, weight)
    assert any(key[:2] == (1024, 4096) and value in gemv.candidates(layout) for key, value in gemv._tuned.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (1024, 4096, 128), (4096, 11008, 11008)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_shapes_every_candidate_on_gpu(w4a16, n, k, group, dtype):
    """On the GPU every tuner candidate compiles, is correct, deterministic, and replays from a CUDA graph."""
    gemv = w4a16.w4a16_gemv
    weight, x, b, layout = _case(w4a16, n, k, group, dtype, False)
    y = torch.empty((1, n), dtype=dtype, device="cuda")
    for config in gemv.candidates(layout):
        gemv._launch(x, layout, None, y, config)
        eager = y.clone()
        assert_w4a16_close(eager, x, weight)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            gemv._launch(x, layout, None, y, config)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            gemv._launch(x, layout, None, y, config)
        for _ in range(2):
            y.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, eager), config


def test_candidates_split_k_on_wide_layers(w4a16):
    """Wide layers (enough row tiles that ``auto_splits`` says 1) still get split-K candidates, each part at least
    one step; a K of one step gets none."""
    gemv = w4a16.w4a16_gemv
    wide = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 128, 128, 4096, 4096)
    splits = {c[3] for c in gemv.candidates(wide)}
    assert splits == {1, *gemv.SPLIT_CHOICES}
    one_step = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 128, 128, 512, 4096)
    assert {c[3] for c in gemv.candidates(one_step) if c[2] == 4} == {1}  # 4 chunks of 128: one 4-warp step


def test_candidates_are_distinct_launches(w4a16):
    """A split count the loop cannot honour (8 parts of 5 steps) runs as fewer: it is listed once, as it runs."""
    gemv = w4a16.w4a16_gemv
    layout = w4a16.W4A16Layout(torch.empty(1024, 1, 1), None, None, 128, 128, 640, 4096)  # 5 chunks of 128
    configs = gemv.candidates(layout, (False,))
    assert len(configs) == len(set(configs))
    for config in configs:
        assert gemv.split_shape(layout, config[1], config[3])[1] == config[3]
    assert gemv.split_shape(layout, 1, 8) == (1, 5) and gemv.split_shape(layout, 1, 2) == (3, 2)
