"""Seeded orthogonal matrices of any order: a randomised Hadamard matrix where one can be built, else a random one.

A rotation ``Q`` of a model's residual stream is merged into the weights offline, so it need not be fast, only
orthogonal; a Hadamard matrix (every entry ``±1/√n``) spreads each coordinate evenly over all others, which is
what flattens activation outliers (QuaRot). Widths such as SmolLM2's 576 = 72·8 and 1536 = 384·4 are not powers
of two, so besides Sylvester's construction this module has Paley's: for a prime ``q ≡ 3 (mod 4)`` it gives a
Hadamard matrix of order ``q + 1``, and ``H_p ⊗ H_{2^k}`` covers ``n = p·2^k``. Orders neither reaches get a
Haar-random orthogonal matrix (QR of a seeded Gaussian). This module knows nothing of models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.quant.hadamard import hadamard_matrix, is_power_of_two, random_signs


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def paley_hadamard(order: int) -> torch.Tensor:
    """Unnormalised Hadamard matrix of ``order = q + 1`` (Paley I, ``q`` prime, ``q ≡ 3 mod 4``), float64."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley's construction needs order - 1 prime and 3 mod 4, got order {order}")
    residues = torch.zeros(q, dtype=torch.float64)
    residues[[(i * i) % q for i in range(1, q)]] = 1.0
    chi = 2 * residues - 1  # Legendre symbol of 1..q-1; index 0 is set below
    chi[0] = 0
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), antisymmetric since q ≡ 3 (mod 4)
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(order, dtype=torch.float64)


def hadamard_factor(n: int) -> int | None:
    """The Paley order ``p`` (1 for a power of two) with ``n = p · 2^k``, or None when neither construction fits."""
    if is_power_of_two(n):
        return 1
    p = n
    while p % 4 == 0:  # n, n/2, n/4, ... as the Paley order (a Hadamard order > 2 is a multiple of 4)
        if _is_prime(p - 1) and (p - 1) % 4 == 3:
            return p
        p //= 2
    return None


@dataclass(frozen=True)
class Rotation:
    """An orthogonal ``n × n`` matrix (float64) and how it was built (``hadamard`` or ``random``)."""

    matrix: torch.Tensor
    kind: str


def random_rotation(n: int, seed: int) -> Rotation:
    """``D · H / √n`` (random signs ``D``, Hadamard ``H``) when a Hadamard matrix of order ``n`` can be built;
    otherwise a Haar-random orthogonal matrix. Both are reproducible from ``seed``."""
    p = hadamard_factor(n)
    if p is not None:
        h = hadamard_matrix(n // p, torch.float64) * math.sqrt(n // p)  # unnormalised Sylvester part
        if p > 1:
            h = torch.kron(paley_hadamard(p), h)
        signs = random_signs(n, seed).double()
        return Rotation(signs[:, None] * h / math.sqrt(n), "hadamard")
    generator = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Rotation(q * torch.sign(torch.diagonal(r))[None, :], "random")  # sign fix: Haar-distributed
