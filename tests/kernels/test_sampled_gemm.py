"""Grad-weight's packed K-major GEMM (``lowbit.kernels.sampled_gemm``) equals the reference's three products bit
for bit on odd shapes, groups that start and end off the packing's tile boundaries, a kept count far below the
padded sample's length, and empty groups (nothing kept at all included); the int8 transpose equals ``x.T``."""

import importlib

import pytest
import torch

KERNEL_MODULES = ("lowbit.kernels.philox", "lowbit.kernels.int_gemm", "lowbit.kernels.sampled_gemm")


@pytest.fixture(scope="module")
def device(triton_path):
    """CUDA when present; else the CPU with Triton's interpreter (see conftest.triton_path)."""
    return triton_path(*KERNEL_MODULES)


def _problem(n, c, k, sizes, seed, device):
    """Random int4 rows (2N x C) and qx (N x K), a padded permutation of the rows sorted into groups of the
    given sizes, and the sampled group's re-quantization inputs, as ``int4_grad_weight`` builds them: the kernel's
    Philox seed and the noise the reference reads (the same uniforms, ``philox.uniform_like_reference``)."""
    from lowbit.kernels.philox import uniform_like_reference
    from lowbit.train.backward import requantize_scale

    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(-7, 8, (2 * n, c), generator=gen, dtype=torch.int8)
    qx = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    idx = torch.randperm(2 * n, generator=gen)  # padded: every row, the kept ones first
    ends = torch.tensor(sizes).cumsum(0)
    w = torch.tensor([14.0, 1.0]) / 26.3
    f = torch.where(torch.arange(2 * n) >= ends[1], torch.rand(2 * n, generator=gen) * 3, torch.zeros(2 * n))
    f = torch.where(torch.arange(2 * n) < ends[2], f, torch.zeros_like(f))
    tok = idx % n
    amax = (f * qx.abs().amax(dim=1).float()[tok]).amax()
    scale, gain = requantize_scale(amax)
    seed = torch.tensor([seed * 7919 + 2**40], dtype=torch.int64)
    noise = uniform_like_reference(seed, (2 * n, k))
    moved = (rows, qx, idx, ends, w, f, gain, scale, seed, noise)
    return tuple(t.to(device) for t in moved)


@pytest.mark.parametrize("n,c,k,sizes", [
    (37, 45, 576, (5, 9, 20)),     # count 34 < padded 74; every group off the tile grid
    (20, 33, 1536, (0, 0, 17)),    # sampled rows only
    (30, 40, 96, (33, 0, 2)),      # an empty middle group; the first one crosses a tile boundary
    (16, 24, 64, (0, 0, 0)),       # nothing kept (count 0)
    (48, 64, 64, (48, 48, 0)),     # everything kept with p = 1 (sampling off)
])
def test_grad_weight_gemm_equals_reference(device, n, c, k, sizes):
    from lowbit.kernels.sampled_gemm import grad_weight_gemm
    from lowbit.train.backward import _grad_weight_reference

    rows, qx, idx, ends, w, f, gain, scale, seed, noise = _problem(n, c, k, sizes, n + c + k, device)
    token = torch.arange(2 * n, device=device) % n
    for sampled in (True, False) if not sizes[2] else (True,):  # without sampling there is no sampled group
        extra = (f, gain, scale) if sampled else (None,) * 3
        want = _grad_weight_reference(rows.float(), qx.float(), token, idx, ends, w, *extra,
                                      noise if sampled else None, 4)
        for x in (qx, qx.float().to(torch.float8_e4m3fn)):  # int8, or the forward's float8 operand
            got = grad_weight_gemm(rows, x, idx, ends, w, *extra, seed if sampled else None)
            assert torch.equal(got.cpu(), want.cpu())
        assert (got.abs().sum() > 0) == (sum(sizes) > 0)


def test_grad_weight_gemm_compact_empty_sample(device):
    """A compact sample that keeps nothing (zero-length index) gives zeros, as the reference's empty sum."""
    from lowbit.kernels.sampled_gemm import grad_weight_gemm

    rows = torch.ones(10, 7, dtype=torch.int8, device=device)
    qx = torch.ones(5, 9, dtype=torch.int8, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    got = grad_weight_gemm(rows, qx, empty, torch.zeros(3, dtype=torch.long, device=device),
                           torch.ones(2, device=device))
    assert torch.equal(got.cpu(), torch.zeros(7, 9))


@pytest.mark.parametrize("shape", [(1, 1), (37, 576), (130, 45), (64, 64)])
def test_transpose_int8(device, shape):
    sg = importlib.import_module("lowbit.kernels.sampled_gemm")
    x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.equal(sg.transpose_int8(x).cpu(), x.T.contiguous().cpu())
    assert torch.equal(sg.transpose_int8(x[:, : shape[1] // 2 + 1]).cpu(), x[:, : shape[1] // 2 + 1].T.cpu())
    small = (x % 16 - 8).to(torch.int8)  # INT4 values held in the forward's float8: converted on the way
    got = sg.transpose_int8(small.float().to(torch.float8_e4m3fn))
    assert got.dtype == torch.int8 and torch.equal(got.cpu(), small.T.contiguous().cpu())


def test_packed_width_bounds_every_sample():
    """The three groups, each padded to the tile, always fit the fixed width (no host sync sizes the buffers)."""
    from lowbit.kernels.sampled_gemm import packed_width

    pad = 8
    for total in range(0, 40):
        for a in range(total + 1):
            for b in range(total - a + 1):
                c = total - a - b
                padded = sum(-(-s // pad) * pad for s in (a, b, c))
                assert padded <= packed_width(total, pad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_sampled_backward_is_sync_free_on_gpu(device, ratio):
    """Grad-weight (sort, pack, packed GEMM) and grad-input (gathered, scattered GEMM) never wait for the host."""
    import lowbit.train.backward as bwd

    gen = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(512, 576, device="cuda")
    qx = torch.randint(-8, 8, (512, 1536), device="cuda", dtype=torch.int8)
    qw = torch.randint(-8, 8, (576, 1536), device="cuda", dtype=torch.int8)
    rows, weight, sq = bwd.split_rows_with_norms(g, gen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        gw = bwd.int4_grad_weight(rows, weight, qx, ratio, gen, 4, sq)
        gi = bwd.int4_grad_input(rows, weight, qw, ratio, gen, 4, sq)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert gw.shape == (576, 1536) and gi.shape == (512, 1536) and gw.abs().sum() > 0


def _scored_rows(n, k, seed, device, zeros=0, ties=False):
    """Split-row squared norms (exact integers, some rows zero), row weights 14/s and 1/s, int8 qx."""
    gen = torch.Generator().manual_seed(seed)
    sq = torch.randint(0, 400, (2 * n,), generator=gen).float() * torch.logspace(0, 2, 2 * n).round()
    sq[torch.randperm(2 * n, generator=gen)[:zeros]] = 0
    if ties:
        sq[: n // 2] = sq[0]
    weight = torch.cat([torch.full((n,), 14.0), torch.ones(n)]) / 26.3
    qx = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8) * (torch.rand(n, 1, generator=gen) < 0.8)
    u = torch.rand(2 * n, generator=gen)
    return tuple(t.to(device) for t in (sq, weight, qx.to(torch.int8), u))


PLAN_CASES = [(70, 40, 0, False), (3, 8, 0, False), (50, 33, 60, True), (40, 16, 80, False), (1, 4, 0, False)]


@pytest.mark.parametrize("n,k,zeros,ties", PLAN_CASES)
def test_row_scores_equal_reference(device, n, k, zeros, ties):
    from lowbit.kernels.sampled_gemm import row_scores
    from lowbit.train.backward import row_scores_reference

    sq, weight, qx, _ = _scored_rows(n, k, n + k, device, zeros, ties)
    for x in (None, qx):
        got, want = row_scores(sq, weight, x), row_scores_reference(sq, weight, x)
        assert got[0].dtype == torch.float64 and torch.equal(got[0].cpu(), want[0].cpu())
        assert (got[1] is None) == (x is None) and (x is None or torch.equal(got[1].cpu(), want[1].cpu()))


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("n,k,zeros,ties", PLAN_CASES)
def test_sample_plan_equals_reference(device, n, k, zeros, ties, ratio):
    """Water level, keep draws, group order, per-position factors and the re-quantization scale: bit for bit,
    over several chunks of the single program, with zero scores (some cases keep every nonzero row), ties, and
    targets at or above the nonzero count."""
    from lowbit.kernels.sampled_gemm import row_scores, sample_plan
    from lowbit.train.backward import sample_plan_reference

    sq, weight, qx, u = _scored_rows(n, k, 3 * n + k, device, zeros, ties)
    for x in (None, qx):
        scores, rowmax = row_scores(sq, weight, x)
        got = sample_plan(scores, weight, u, rowmax, ratio, x is not None)
        want = sample_plan_reference(scores, weight, u, rowmax, ratio, x is not None)
        for a, b in zip(got, want):
            assert (a is None) == (b is None) and (a is None or torch.equal(a.cpu(), b.cpu()))
        assert torch.equal(got.index.sort().values.cpu(), torch.arange(2 * n))  # every row once
        kept = int(got.ends[2])
        assert (got.val[kept:] == 0).all() and (ratio < 1 or kept == int((scores > 0).sum()))
        if x is not None and ratio < 1 and int(got.ends[2]) > int(got.ends[1]):
            assert float(got.rq[0]) != 1.0  # a sampled group: a real re-quantization scale


def test_sample_plan_all_zero_and_empty(device):
    from lowbit.kernels.sampled_gemm import sample_plan
    from lowbit.train.backward import sample_plan_reference

    for r in (0, 6):
        scores = torch.zeros(r, dtype=torch.float64, device=device)
        w, u = torch.ones(r, device=device), torch.rand(r, device=device)
        rowmax = torch.ones(r // 2, device=device)
        for grouped in (False, True):
            got = sample_plan(scores, w, u, rowmax, 0.5, grouped)
            assert got.ends.tolist() == [0, 0, 0] and got.index.shape == (r,)
            if r:  # (the reference's waterfill needs at least one row)
                want = sample_plan_reference(scores, w, u, rowmax, 0.5, grouped)
                assert want.ends.tolist() == [0, 0, 0] and torch.equal(got.index.cpu(), want.index.cpu())


def test_fused_and_reference_sampling_give_one_backward(device, monkeypatch):
    """``LOWBIT_SAMPLING=reference`` (the pure-PyTorch sampling on the kernel path) gives the fused path's grad-input
    and grad-weight bit for bit from one seed; a bad value is refused."""
    import lowbit.train.backward as bwd
    from lowbit.errors import LowbitError

    grad, qw, qx = bwd.heavy_tailed_problem(5, n=40, c=24, k=48)
    results = {}
    for mode in ("fused", "reference"):
        monkeypatch.setenv("LOWBIT_SAMPLING", mode)
        gen = torch.Generator(device=device).manual_seed(2)
        rows, weight, sq = bwd.split_rows_with_norms(grad.to(device), gen)
        results[mode] = (bwd.int4_grad_input(rows, weight, qw.to(device, torch.int8), 0.5, gen, 4, sq).cpu(),
                         bwd.int4_grad_weight(rows, weight, qx.to(device, torch.int8), 0.5, gen, 4, sq).cpu())
    for a, b in zip(*results.values()):
        assert torch.equal(a, b) and a.abs().sum() > 0
    monkeypatch.setenv("LOWBIT_SAMPLING", "iterative")
    with pytest.raises(LowbitError, match="LOWBIT_SAMPLING"):
        bwd.fused_sampling()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_sample_plan_on_gpu_at_layer_size(device, ratio):
    """The compiled kernels (float64 water level, one program over 16384 rows) equal their references on CUDA."""
    from lowbit.kernels.sampled_gemm import row_scores, sample_plan
    from lowbit.train.backward import row_scores_reference, sample_plan_reference

    sq, weight, qx, u = _scored_rows(8192, 4096, 0, "cuda", zeros=500)
    for x in (None, qx):
        got_s, want_s = row_scores(sq, weight, x), row_scores_reference(sq, weight, x)
        assert torch.equal(got_s[0], want_s[0]) and (x is None or torch.equal(got_s[1], want_s[1]))
        got = sample_plan(*got_s[:1], weight, u, got_s[1], ratio, x is not None)
        want = sample_plan_reference(*got_s[:1], weight, u, got_s[1], ratio, x is not None)
        for a, b in zip(got, want):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
