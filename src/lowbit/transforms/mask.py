"""AffineQuant's gradual mask: the affine matrix starts diagonal and a band around the diagonal opens epoch by epoch.

Off-diagonal entries inside the band are weighted by the stability factor ``sf``; with a small ``sf`` the matrix
stays strictly diagonally dominant, hence invertible, while it learns. Built with one vectorised comparison
(the reference loops over diagonals with ``torch.diag``).
"""

from __future__ import annotations

import torch


def band_width(epoch: int, epochs: int, size: int) -> int:
    """Half-width ``t`` of the band at ``epoch`` (0-based): 1 (diagonal only) first, ``size`` (full) last.

    The reference's ``int((size - 1) / (epochs - 1) * epoch) + 1``, without its division by zero at one epoch.
    """
    if epochs <= 1:
        return size
    return int((size - 1) / (epochs - 1) * epoch) + 1


def gradual_mask(size: int, width: int, sf: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``M[i, j]`` = 1 on the diagonal, ``sf`` where ``0 < |i - j| < width``, 0 elsewhere."""
    idx = torch.arange(size, device=device)
    dist = (idx[:, None] - idx[None, :]).abs()
    mask = torch.where(dist < width, torch.full((), sf, dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device))
    return mask.fill_diagonal_(1.0)
