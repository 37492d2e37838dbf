"""Export a W4A16 result in the GPTQ layout, which transformers (optimum + gptqmodel), vLLM and others load.

Only weight-only 4-bit results are exported here (``lowbit.export.w4a16`` refuses the rest, and holds what this
exporter shares with compressed-tensors).

Layout (GPTQ "v1", ``checkpoint_format: gptq``, as GPTQModel's ``BaseQuantLinear.pack_original`` writes it and
its ``dequantize_weight`` reads it), for a linear with N outputs, K inputs and G groups:

- ``qweight``: int32 (K/8, N), input rows packed 8 per word, row ``8i + j`` in bits ``[4j, 4j + 4)``;
- ``qzeros``: int32 (G, N/8), output columns packed the same way, each holding ``zero - 1``: the historical v1
  offset, undone by every loader (``convert_gptq_v1_to_v2_format_module`` adds ``0x11111111``);
- ``scales``: float16 (G, N); ``g_idx``: int32 (K,), ``k // group_size`` (no activation reordering);
- ``weight = scales[g_idx] * (code - zero)``.

The v1 offset means a stored zero point must lie in [1, 15]: a group whose zero is 0 (or, lowbit's zero points
being unclamped, 16 and above) is shifted together with its codes when that is exact, and refused otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.export.codes import LinearCodes
from lowbit.export.w4a16 import BITS, PACK, export_w4a16, fit_zero_range, pack_int32, to_fp16_scales


def gptq_tensors(name: str, codes: LinearCodes, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one linear (see the module docstring)."""
    n, k = codes.codes.shape
    if k % PACK or n % PACK:
        raise LowbitError(f"{name}: GPTQ packs 8 codes per int32, so both widths must be multiples of 8, got {n}x{k}")
    codes = fit_zero_range(codes, 1, 2**BITS - 1, name, "GPTQ (v1)",
                           "--format compressed-tensors (zero points 0..15) or --format lowbit (any)")
    out = {
        f"{name}.qweight": pack_int32(codes.codes.t(), dim=0),
        f"{name}.qzeros": pack_int32((codes.zeros.t() - 1).to(torch.int64), dim=1),
        f"{name}.scales": to_fp16_scales(codes.scales.t().contiguous(), name),
        f"{name}.g_idx": (torch.arange(k) // codes.group_size).to(torch.int32),
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to("cpu", torch.float16).contiguous()
    return out


def gptq_config(config) -> dict:
    return {
        "quant_method": "gptq",
        "bits": BITS,
        "group_size": config.group_size or -1,  # -1: one group per output channel
        "desc_act": False,
        "sym": config.weight_symmetric,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": False,
        "checkpoint_format": "gptq",
    }


def save_gptq(loaded, config, output: str | Path, overwrite: bool = False) -> Path:
    """Export ``loaded`` (a W4A16 result of ``config``) in the GPTQ v1 layout; everything is encoded and checked
    before the first byte is written."""
    return export_w4a16(loaded, config, "GPTQ", gptq_tensors, lambda _layers: gptq_config(config), output, overwrite)
