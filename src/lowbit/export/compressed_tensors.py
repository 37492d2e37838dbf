"""Export a W4A16 result as compressed-tensors ``pack-quantized``: the format llm-compressor writes and vLLM serves.

Only weight-only 4-bit results are exported (see ``lowbit.export.w4a16``: W4A4 / W6A6 run only in lowbit's format).

Layout (compressed-tensors' ``PackedQuantizationCompressor``), for a linear with N outputs, K inputs, G groups:

- ``weight_packed``: int32 (N, K/8), codes packed along the input, code ``8i + j`` in bits ``[4j, 4j + 4)`` of
  word ``i``; the format's integers are signed (``q`` in [-8, 7]) and stored offset by 8, which is exactly
  lowbit's unsigned code;
- ``weight_scale``: float16 (N, G); ``weight_shape``: int64 ``[N, K]``;
- ``weight_zero_point`` (asymmetric only): int32 (N/8, G), the signed zero point ``zero - 8`` packed the same way
  along the *output* dimension, so it must lie in [-8, 7]: lowbit's zero in [0, 15]. Groups outside are shifted
  with their codes when that is exact, and refused otherwise;
- ``weight = (q - zero_point) * weight_scale``.

``quantization_config`` in config.json carries one config group targeting every ``Linear``; linears that stay
float (lm_head) are listed under ``ignore``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.codes import LinearCodes
from lowbit.export.w4a16 import BITS, PACK, export_w4a16, fit_zero_range, pack_int32, to_fp16_scales

OFFSET = 2 ** (BITS - 1)  # the format's signed integers are stored as value + 8


def ct_tensors(name: str, codes: LinearCodes, bias: torch.Tensor | None, symmetric: bool) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear (see the module docstring)."""
    n, k = codes.codes.shape
    if k % PACK:
        raise LowbitError(f"{name}: pack-quantized stores {PACK} codes per int32, so the input width must be a multiple "
                          f"of {PACK}, got {k}")
    codes = fit_zero_range(codes, 0, 2**BITS - 1, name, "compressed-tensors", "--format lowbit (any zero point)")
    if symmetric and not (codes.zeros == OFFSET).all():
        raise LowbitError(f"{name}: symmetric weights need every zero point at {OFFSET}; the model is not symmetric")
    out = {
        f"{name}.weight_packed": pack_int32(codes.codes, dim=1),
        f"{name}.weight_scale": to_fp16_scales(codes.scales.contiguous(), name),
        f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(codes.zeros.to(torch.int64), dim=0)
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to("cpu", torch.float16).contiguous()
    return out


def ct_config(config, ignore: list[str]) -> dict:
    weights = {
        "num_bits": BITS,
        "type": "int",
        "symmetric": config.weight_symmetric,
        "group_size": config.group_size,
        "strategy": "group" if config.group_size else "channel",
        "dynamic": False,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                        "output_activations": None},
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def save_compressed_tensors(loaded, config, output: str | Path, overwrite: bool = False) -> Path:
    """Export ``loaded`` (a W4A16 result of ``config``) as compressed-tensors pack-quantized; everything is
    encoded and checked before the first byte is written."""

    def encode(name: str, codes: LinearCodes, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return ct_tensors(name, codes, bias, config.weight_symmetric)

    def quantization_config(layers: list[str]) -> dict:
        quantized = set(layers)
        ignore = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        return ct_config(config, ignore)

    return export_w4a16(loaded, config, "compressed-tensors", encode, quantization_config, output, overwrite)
