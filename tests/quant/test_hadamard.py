"""Block Hadamard: orthogonal, the fast transform equals the dense one, inverse exact, bad blocks refused."""

import time

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.hadamard import (
    dense_transform_matrix,
    hadamard_matrix,
    hadamard_transform,
    inverse_hadamard_transform,
    random_signs,
)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 256])
def test_hadamard_matrix_is_orthogonal_and_symmetric(n):
    h = hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.all(h.abs() == 1 / n**0.5)


@pytest.mark.parametrize("block", [1, 2, 8, 32, 64])
@pytest.mark.parametrize("use_signs", [False, True])
def test_fast_equals_dense(block, use_signs):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    signs = random_signs(64, seed=7).double() if use_signs else None
    t = dense_transform_matrix(64, block, signs)
    assert torch.allclose(t @ t.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(hadamard_transform(x, block, signs), x @ t, atol=1e-12)
    assert torch.allclose(inverse_hadamard_transform(x, block, signs), x @ t.T, atol=1e-12)
    assert torch.allclose(inverse_hadamard_transform(hadamard_transform(x, block, signs), block, signs), x, atol=1e-12)


def test_float32_and_product_invariance():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 128, generator=g), torch.randn(24, 128, generator=g)
    xh, wh = hadamard_transform(x, 32), hadamard_transform(w, 32)
    assert xh.dtype == torch.float32
    assert torch.allclose(xh @ wh.T, x @ w.T, atol=1e-4)
    # Not the identity: energy is really mixed within blocks
    assert (xh - x).abs().max() > 0.1


def test_fast_transform_is_not_dense():
    # A dense 65536 x 65536 matrix would need 16 GiB; the butterflies need a few vectors.
    x = torch.randn(2, 1 << 16)
    start = time.perf_counter()
    y = hadamard_transform(x, 1 << 16)
    assert time.perf_counter() - start < 5.0
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-4)
    e = torch.zeros(1, 1 << 16)
    e[0, 0] = 1.0
    assert torch.allclose(hadamard_transform(e, 1 << 16), torch.full((1, 1 << 16), 2.0**-8))


def test_random_signs_are_reproducible():
    a, b, c = random_signs(64, 1), random_signs(64, 1), random_signs(64, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("block", [0, 3, 12, -4])
def test_bad_block_is_refused(block):
    with pytest.raises(LowbitError, match="power of two"):
        hadamard_transform(torch.zeros(2, 24), block)


def test_untileable_width_is_refused():
    with pytest.raises(LowbitError, match="does not tile the width 48"):
        hadamard_transform(torch.zeros(2, 48), 32)
