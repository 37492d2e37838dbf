"""The linear layer of a loaded packed checkpoint: weights stay packed integers, the matmul is a lowbit kernel.

``PackedLinear`` holds ``qweight`` (uint8), ``scales`` and ``zeros`` (float32) as buffers under the same names as
the checkpoint, so its state dict is the file's layout. Weight-only layers call ``w4a16_linear``; layers whose
activations were quantized at calibration call ``wxax_linear``, which quantizes the input per token exactly as the
fake-quant model did. Both dispatch to Triton on CUDA and to exact references elsewhere (``lowbit.kernels``).

Moving the model moves the buffers; casting it (``.half()``, ``.to(dtype)``) casts only the bias. Scales and zero
points stay float32 on purpose: a zero point can lie far outside the integers fp16 holds exactly (a constant row's
zero is about ``-value / 1e-5``), and a rounded scale would no longer reproduce the calibrated weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.export.compiled import traced_w4a16
from lowbit.quant.packing import packed_bytes


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = (code - zero) · scale`` kept packed; the input optionally quantized per token."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 in_features: int, bias: torch.Tensor | None = None, act_bits: int | None = None,
                 act_symmetric: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.bits, self.group_size = bits, group_size
        self.act_bits, self.act_symmetric = act_bits, act_symmetric
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self._packed = self._build()

    def _build(self):
        from lowbit.kernels.weights import PackedWeight

        return PackedWeight(packed=self.qweight, scales=self.scales, zeros=self.zeros, bits=self.bits,
                            group_size=self.group_size, in_features=self.in_features,
                            out_features=self.out_features)

    @property
    def weight(self):
        """The packed weight as ``lowbit.kernels.PackedWeight`` (``.dequantize(dtype)`` for a float copy)."""
        return self._packed

    def _apply(self, fn, recurse: bool = True):
        # Where would ``fn`` send a float tensor? Follow it in device only, except for the bias.
        device = fn(torch.empty(0, device=self.scales.device)).device
        for name in ("qweight", "scales", "zeros"):
            setattr(self, name, getattr(self, name).to(device))
        if self.bias is not None:
            self.bias = fn(self.bias)
        self._packed = self._build()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            if torch.compiler.is_compiling():  # one opaque op, so the model stays one graph (export.compiled)
                return traced_w4a16(x, self._packed, self.bias)
            from lowbit.kernels.w4a16 import w4a16_linear

            return w4a16_linear(x, self._packed, self.bias)
        from lowbit.kernels.w4a4 import wxax_linear

        return wxax_linear(x, self._packed, self.act_bits, self.act_symmetric, self.bias)

    def packed_nbytes(self) -> int:
        """Bytes the weight takes in memory: packed codes, scales and zero points (the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def extra_repr(self) -> str:
        act = "float" if self.act_bits is None else f"int{self.act_bits} per token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, activations={act}")


@dataclass(frozen=True)
class WeightBytes:
    """Where a model's weight memory goes, against the same model with every weight in fp16.

    ``quantized``: packed linears (codes, scales, zeros); ``quantized_fp16``: those layers' weights as fp16;
    ``embeddings``: every ``nn.Embedding`` and an untied lm_head, counted apart because they stay floating point;
    ``other``: everything else (norms, biases, float linears, online transforms), as held.
    """

    quantized: int
    quantized_fp16: int
    embeddings: int
    other: int
    quantized_layers: int

    @property
    def total(self) -> int:
        return self.quantized + self.embeddings + self.other

    @property
    def ratio(self) -> float:
        """Quantized layers' bytes over the same layers in fp16 (embeddings excluded)."""
        return self.quantized / self.quantized_fp16 if self.quantized_fp16 else float("nan")

    def as_dict(self) -> dict:
        return {"quantized_linear_bytes": self.quantized, "quantized_linear_fp16_bytes": self.quantized_fp16,
                "ratio": self.ratio, "embedding_bytes": self.embeddings, "other_bytes": self.other,
                "total_bytes": self.total, "quantized_layers": self.quantized_layers}


def packed_weight_bytes(model: nn.Module) -> WeightBytes:
    """Count ``model``'s weight bytes (each storage once, so tied embeddings count once); see ``WeightBytes``."""
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None or t.device.type == "meta":
            return 0
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    quantized = fp16 = embeddings = layers = 0
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # OPT: positions too
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embedding_weights.add(id(output.weight))
    for module in model.modules():
        if isinstance(module, PackedLinear):
            quantized += sum(nbytes(t) for t in (module.qweight, module.scales, module.zeros))
            fp16 += module.out_features * module.in_features * 2
            layers += 1
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in embedding_weights:
            embeddings += nbytes(tensor)
    other = sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])
    return WeightBytes(quantized, fp16, embeddings, other, layers)


def expected_packed_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict:
    """The (shape, dtype) of each packed tensor of one layer, for checking a file before trusting it."""
    groups = in_features // group_size
    return {
        "qweight": ((out_features, packed_bytes(in_features, bits)), torch.uint8),
        "scales": ((out_features, groups), torch.float32),
        "zeros": ((out_features, groups), torch.float32),
    }
