"""Fake-quant linear: quantize the input per token and the weight per channel/group, then a float matmul.

This is the simulation every method is calibrated and evaluated with. ``QuantLinear`` shares the parameters of
the ``nn.Linear`` it wraps. Weights are quantized on the fly while a method still learns them; ``bake_weight``
writes the rounded weights in place once they are final, after which only the activations are quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.quantizer import QuantSpec, fake_quantize


class QuantLinear(nn.Module):
    """An ``nn.Linear`` whose input and weight pass through fake quantizers."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        name: str = "linear",
    ) -> None:
        super().__init__()
        if weight_spec is not None:
            weight_spec.check_width(linear.in_features, what=name)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.weight_clip: nn.Module | None = None  # a method may attach learnable clipping here

    def quantized_weight(self) -> torch.Tensor:
        clip = self.weight_clip() if self.weight_clip is not None else None
        return fake_quantize(self.weight, self.weight_spec, clip=clip)

    @torch.no_grad()
    def bake_weight(self) -> None:
        """Replace the weight by its rounded value and stop quantizing it on every call."""
        if self.weight_spec is not None:
            self.weight.copy_(self.quantized_weight())
            self.weight_spec = None
            self.weight_clip = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize(x, self.act_spec)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight_spec}, act={self.act_spec}"
        )
