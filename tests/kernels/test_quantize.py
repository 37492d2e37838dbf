"""Fused Hadamard + quantize kernels against their references: equal bit for bit (ties included).

On a CPU the Triton kernels run on the interpreter (small shapes); on a GPU the same tests run compiled.
"""

import importlib

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.hadamard import random_signs

KERNEL_MODULES = ("lowbit.kernels.quantize", "lowbit.kernels.bitsplit", "lowbit.kernels.int_gemm")


@pytest.fixture(scope="module")
def device(triton_path):
    """CUDA when present; else the CPU with Triton's interpreter (see conftest.triton_path)."""
    return triton_path(*KERNEL_MODULES)


def _q():
    return importlib.import_module("lowbit.kernels.quantize")


CASES = [(7, 576, 32, 0), (5, 1536, 64, 0), (3, 40, 16, 8), (9, 256, 256, 0)]


@pytest.mark.parametrize("m,k,block,pad", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotation_equals_reference(device, m, k, block, pad, dtype):
    q = _q()
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(device=device, dtype=dtype)
    signs = random_signs(k + pad, 7, device) if block != 64 else None
    fused = q.hadamard_rotate(x, block, signs, pad)
    assert fused.dtype == torch.float32 and torch.equal(fused, q.hadamard_rotate_reference(x, block, signs, pad))
    back = q.hadamard_rotate(fused, block, signs, pad, inverse=True)
    assert torch.equal(back, q.hadamard_rotate_reference(fused, block, signs, pad, inverse=True))
    assert torch.allclose(back, x.float(), atol=1e-4 * x.float().abs().max().item())  # really the inverse


@pytest.mark.parametrize("m,k,block,pad", CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", ["tensor", "row", "token"])
def test_rotate_quantize_equals_reference(device, m, k, block, pad, dtype, scale):
    q = _q()
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=gen) * 2).to(device=device, dtype=dtype)
    step = {"tensor": torch.tensor([0.31]), "row": torch.rand(m, generator=gen) + 0.05, "token": None}[scale]
    step = step.to(device) if step is not None else None
    signs = random_signs(k + pad, 3, device)
    for out_dtype in (torch.int8, torch.float8_e4m3fn, torch.float32):
        got = q.rotate_quantize(x, block, step, -8, 7, signs, pad, out_dtype)
        want = q.rotate_quantize_reference(x, block, step, -8, 7, signs, pad, out_dtype)
        assert got.q.dtype == out_dtype and torch.equal(got.q.float(), want.q.float())
        bits = torch.int32 if out_dtype == torch.float32 else torch.int8  # bit patterns: the sign of zero too
        assert torch.equal(got.q.view(bits), want.q.view(bits))
        assert torch.equal(got.step, want.step)
        assert (got.v is None) == (want.v is None) and (got.v is None or torch.equal(got.v, want.v))
        assert got.q.float().min() >= -8 and got.q.float().max() <= 7


def test_ties_round_half_to_even(device):
    q = _q()
    v = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, -7.5, 0.49999997, 7.5, -8.5, 5.0, 4.5, -4.5]])
    x = (v * 0.25).to(device)  # step 0.25 (a power of two): x / step is exactly v
    got = q.rotate_quantize(x, 0, torch.tensor([0.25], device=device), -8, 7, out_dtype=torch.float32)
    want = torch.round(v.clamp(-8, 7))
    assert torch.equal(got.q.cpu(), want)
    assert want[0, :3].tolist() == [0.0, 2.0, 2.0]  # half to even, not half away from zero


def test_reference_is_the_training_composition(device, monkeypatch):
    """The kernels' reference is exactly what hq.py computes unfused (so the fused layer trains the same)."""
    from lowbit.train.hq import Rotation, dynamic_token_quantize, lsq_quantize

    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    q = _q()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    rot = Rotation(32, 0, random_signs(64, 2))
    step = torch.tensor([0.2])
    lsq = lsq_quantize(rot.apply(x), step, -8, 7)
    ref = q.rotate_quantize_reference(x, 32, step, -8, 7, rot.signs, 0, torch.float32)
    assert torch.equal(ref.q, lsq.q) and torch.equal(ref.v, lsq.v) and torch.equal(ref.step, lsq.step)
    tok = dynamic_token_quantize(rot.apply(x), 4)
    ref = q.rotate_quantize_reference(x, 32, None, -8, 7, rot.signs, 0, torch.float32)
    assert torch.equal(ref.q, tok.q) and torch.equal(ref.step, tok.step)


def test_bad_input_is_refused(device):
    q = _q()
    x = torch.zeros(4, 64, device=device)
    with pytest.raises(LowbitError, match="2-D"):
        q.rotate_quantize(x[None], 32, None, -8, 7)
    with pytest.raises(LowbitError, match="up to 256"):
        q.hadamard_rotate(torch.zeros(2, 512, device=device), 512)
    with pytest.raises(LowbitError, match="does not tile"):
        q.hadamard_rotate(torch.zeros(2, 48, device=device), 32)
    with pytest.raises(LowbitError, match="step must have"):
        q.rotate_quantize(x, 32, torch.ones(3, device=device), -8, 7)
    with pytest.raises(LowbitError, match="out_dtype"):
        q.rotate_quantize(x, 32, None, -8, 7, out_dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_shapes_on_gpu(device):
    q = _q()
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    step = torch.tensor([0.05], device="cuda")
    for s in (step, None):
        got = q.rotate_quantize(x, 32, s, -8, 7, out_dtype=torch.float8_e4m3fn)
        want = q.rotate_quantize_reference(x, 32, s, -8, 7, out_dtype=torch.float8_e4m3fn)
        # exact: the same fp8 bit patterns (zeros are canonical +0 on both sides), the same float32 steps
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)), (got.q.float() - want.q.float()).abs().max()
        assert torch.equal(got.step.view(torch.int32), want.step.view(torch.int32))


def test_gpu_row_tiles_fill_the_gpu():
    """Training shapes on an H100 (132 SMs): >= 4 CTAs per SM, whole Hadamard blocks per tile, wide strips where
    they divide the width, at most 8 warps; a short input keeps one row per tile rather than an empty grid."""
    q = _q()
    for m, k, block in ((8192, 4096, 32), (4096, 4096, 64), (8192, 11008, 128), (2048, 576, 64), (8192, 4096, 256)):
        tiles = q.gpu_row_tiles(m, k, block, 132)
        assert -(-m // tiles.rows) >= q.CTAS_PER_SM * 132 or tiles.rows == 1
        assert tiles.cols % block == 0 and (k % tiles.cols == 0 or tiles.cols == max(block, 64))
        assert tiles.rows & (tiles.rows - 1) == 0 and 1 <= tiles.warps <= 8
    assert q.gpu_row_tiles(8192, 4096, 32, 132) == q.RowTiles(8, 256, 8)
    assert q.gpu_row_tiles(2048, 576, 64, 132).cols == 64  # 576 = 9 x 64: no wider strip divides it
    assert q.gpu_row_tiles(16, 4096, 32, 132) == q.RowTiles(1, 256, 1)
