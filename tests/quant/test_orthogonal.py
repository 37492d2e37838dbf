"""Seeded rotations of any width: Hadamard where Sylvester or Paley builds one, Haar-random otherwise."""

import math

import pytest
import torch

from lowbit.quant.orthogonal import hadamard_factor, paley_hadamard, random_rotation


@pytest.mark.parametrize("order", [4, 12, 20, 24, 72, 384])
def test_paley_matrices_are_hadamard(order):
    h = paley_hadamard(order)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, order * torch.eye(order, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.parametrize("order", [10, 16, 28, 36])
def test_paley_refuses_orders_it_cannot_build(order):
    with pytest.raises(ValueError, match="Paley"):
        paley_hadamard(order)


def test_hadamard_factor_of_model_widths():
    # SmolLM2 576 = 72 * 8 and 1536 = 384 * 4; LLaMA widths; orders no construction here reaches
    assert {n: hadamard_factor(n) for n in (576, 1536, 4096, 11008, 14336, 12, 6, 100, 18)} == {
        576: 72, 1536: 384, 4096: 1, 11008: 5504, 14336: 3584, 12: 12, 6: None, 100: None, 18: None}


@pytest.mark.parametrize("n", [12, 64, 576, 1536])
def test_hadamard_rotation_is_orthogonal_with_flat_entries(n):
    r = random_rotation(n, seed=3)
    assert r.kind == "hadamard" and r.matrix.dtype == torch.float64
    torch.testing.assert_close(r.matrix @ r.matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(r.matrix.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_fallback_is_a_random_orthogonal_matrix_and_seeds_repeat():
    r = random_rotation(100, seed=1)
    assert r.kind == "random"
    torch.testing.assert_close(r.matrix @ r.matrix.T, torch.eye(100, dtype=torch.float64), atol=1e-12, rtol=0)
    for n in (100, 576):
        assert torch.equal(random_rotation(n, 1).matrix, random_rotation(n, 1).matrix)
        assert not torch.equal(random_rotation(n, 1).matrix, random_rotation(n, 2).matrix)


def test_rotation_flattens_an_outlier():
    x = torch.randn(32, 576, dtype=torch.float64)
    x[:, 7] *= 100  # one massive channel
    ratio = lambda t: float((t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    assert ratio(x @ random_rotation(576, 0).matrix) < ratio(x) / 5
