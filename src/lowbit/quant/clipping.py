"""Learnable weight clipping (OmniQuant's LWC): the min-max range of each weight row or group shrinks by a
learned factor sigmoid(u) in (0, 1), trained through the straight-through rounding."""

from __future__ import annotations

import torch
from torch import nn

INIT = 4.0  # sigmoid(4) = 0.982: start close to plain min-max


class LearnableClipping(nn.Module):
    """One upper and one lower factor per quantization row (output channel, or output channel × group)."""

    def __init__(self, rows: int, device=None) -> None:
        super().__init__()
        self.upper = nn.Parameter(torch.full((rows,), INIT, device=device))
        self.lower = nn.Parameter(torch.full((rows,), INIT, device=device))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.upper), torch.sigmoid(self.lower)

    @staticmethod
    def rows_for(out_features: int, in_features: int, group_size: int | None) -> int:
        return out_features * (in_features // group_size if group_size else 1)
