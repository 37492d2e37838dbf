"""Block-diagonal normalised Hadamard transforms along the last dimension.

A Hadamard rotation spreads an outlier over a whole block, so a 4-bit grid with one scale loses less to it;
because the normalised transform is orthogonal, rotating both operands of a matmul along the reduction
dimension leaves the product unchanged: ``(X T)(W T)^T = X W^T``.

``hadamard_transform`` is the fast Walsh–Hadamard transform (``O(n log n)`` butterflies on views, no dense
matrix), ``hadamard_matrix`` the dense Sylvester matrix it is tested against. The transform is
``T = D · blockdiag(H_b, ..., H_b)`` with ``D`` an optional diagonal of random signs (seeded), ``H_b`` the
normalised Sylvester Hadamard matrix of size ``b`` (a power of two). ``H_b`` is symmetric, so the inverse is
``x -> (x · blockdiag(H)) · D``. This module knows nothing of models.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError

MAX_BLOCK = 1 << 16


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def check_block(block: int, width: int | None = None, what: str = "tensor") -> None:
    """Refuse a block that is not a power of two or does not tile ``width`` (no silent padding here)."""
    if not is_power_of_two(block) or block > MAX_BLOCK:
        raise LowbitError(f"Hadamard block size must be a power of two from 1 to {MAX_BLOCK}, got {block!r}")
    if width is not None and width % block != 0:
        fits = [b for b in (8, 16, 32, 64, 128, 256) if b <= width and width % b == 0]
        hint = f"block sizes that tile it: {', '.join(map(str, fits))}" if fits else "no power-of-two block >= 8 tiles it"
        raise LowbitError(f"Hadamard block {block} does not tile the width {width} of {what}; {hint}, or pad")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense normalised Sylvester Hadamard matrix ``H_n`` (``H_n @ H_n = I``): the reference for the fast one."""
    check_block(n)
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A reproducible vector of ``n`` random +-1 (float32), drawn from its own generator."""
    generator = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (n,), generator=generator)
    return (bits * 2 - 1).to(dtype=torch.float32, device=device)


def _fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Unnormalised Sylvester-ordered butterflies within each block of the last dimension."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(shape)


def hadamard_transform(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``x · D · blockdiag(H_block)`` along the last dimension (fast, differentiable, dtype of ``x``).

    ``signs`` (length ``x.shape[-1]``, +-1) is the optional random diagonal ``D``; ``block`` must be a power of
    two that tiles the last dimension.
    """
    check_block(block, x.shape[-1])
    if signs is not None:
        x = x * signs.to(x.dtype)
    if block == 1:
        return x
    return _fwht(x, block) * (1.0 / math.sqrt(block))


def inverse_hadamard_transform(y: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse (= transpose) of ``hadamard_transform``: ``y · blockdiag(H_block) · D``."""
    check_block(block, y.shape[-1])
    x = y if block == 1 else _fwht(y, block) * (1.0 / math.sqrt(block))
    if signs is not None:
        x = x * signs.to(x.dtype)
    return x


def dense_transform_matrix(width: int, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """The full ``width x width`` matrix ``D · blockdiag(H_block)`` (float64), for tests and small references."""
    check_block(block, width)
    h = hadamard_matrix(block, torch.float64)
    t = torch.block_diag(*([h] * (width // block)))
    if signs is not None:
        t = signs.double().reshape(-1, 1) * t
    return t
