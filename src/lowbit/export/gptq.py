"""Export a W4A16 result in the GPTQ layout, which transformers (optimum + gptqmodel), vLLM and others load.

Only weight-only 4-bit results are exported here. W4A4 / W6A6 (quantized activations) and the online transforms
of ``--norm-matrices`` cannot be expressed in GPTQ or compressed-tensors and no tool that reads those formats
would run them: such results are saved only in lowbit's own packed format (``lowbit export --format lowbit``).

Layout (GPTQ "v1", ``checkpoint_format: gptq``, as GPTQModel's ``BaseQuantLinear.pack_original`` writes it and
its ``dequantize_weight`` reads it), for a linear with N outputs, K inputs and G groups:

- ``qweight``: int32 (K/8, N), input rows packed 8 per word, row ``8i + j`` in bits ``[4j, 4j + 4)``;
- ``qzeros``: int32 (G, N/8), output columns packed the same way, each holding ``zero - 1``: the historical v1
  offset, undone by every loader (``convert_gptq_v1_to_v2_format_module`` adds ``0x11111111``);
- ``scales``: float16 (G, N); ``g_idx``: int32 (K,), ``k // group_size`` (no activation reordering);
- ``weight = scales[g_idx] * (code - zero)``.

The v1 offset means a stored zero point must lie in [1, 15]: a group whose zero is 0 (or, lowbit's zero points
being unclamped, 16 and above) is shifted together with its codes when that is exact, and refused otherwise.

This module also holds what the GPTQ and compressed-tensors exporters share (``w4a16_layers``, ``write_export``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.codes import LinearCodes, iter_quantized_linears

BITS = 4
PACK = 32 // BITS  # codes per int32 word
WEIGHTS_FILE = "model.safetensors"


def load_result(directory: str | Path):
    """A ``lowbit quantize`` output (fake-quant or packed) ready to export: packed weights as they are, fake-quant
    weights in the dtype they were stored in, so that reading their grid back sees exactly the stored values."""
    from lowbit.export.load import load_quantized
    from lowbit.generate import is_packed_dir
    from lowbit.models.loading import load_model

    directory = Path(directory).expanduser()
    if is_packed_dir(directory):
        return load_quantized(directory, device="cpu", dtype="float32")
    stored = "float32"
    if (directory / "config.json").is_file():
        hf_config = json.loads((directory / "config.json").read_text())
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype") or stored
    loaded = load_model(directory, dtype=stored if stored in ("float16", "bfloat16") else "float32", device="cpu")
    if loaded.quant_config is None:
        raise LowbitError(f"{directory} was not written by lowbit quantize (no quantization.json); quantize it first")
    return loaded


def check_w4a16(loaded, config, fmt: str) -> None:
    """Refuse what ``fmt`` cannot represent, before any work: activations, other bit widths, online transforms."""
    from lowbit.ptq.checkpoint import online_tensors

    if config.act_spec is not None or config.wbits != BITS:
        raise LowbitError(
            f"{fmt} export is for W4A16 results; {config.name} ({'quantized activations' if config.act_spec else f'{config.wbits}-bit weights'}) "
            "runs only in lowbit's format: use --format lowbit"
        )
    if online_tensors(loaded.model):
        raise LowbitError(f"this model keeps online transforms (--norm-matrices), which {fmt} cannot express; "
                          "use --format lowbit")


def w4a16_layers(model: nn.Module, config) -> Iterator[tuple[str, torch.Tensor | None, LinearCodes]]:
    """(name, bias, codes) of every quantized linear: packed modules are unpacked, float ones read off the grid."""
    from lowbit.export.linear import PackedLinear
    from lowbit.quant.packing import PackedInts, unpack

    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    if not packed:
        for name, module, codes in iter_quantized_linears(model, config):
            yield name, module.bias, codes
        return
    for name, module in packed:
        codes = unpack(PackedInts(module.qweight.cpu(), module.bits, module.in_features))
        yield name, module.bias, LinearCodes(codes, module.scales.cpu(), module.zeros.cpu(), module.bits,
                                             module.group_size)


def fit_zero_range(codes: LinearCodes, low: int, high: int, name: str, fmt: str, instead: str) -> LinearCodes:
    """Move every zero point into [low, high] by shifting its group's codes by the same amount (exact: each
    ``code - zero`` is unchanged); refuses a group whose codes leave no room for the shift."""
    zeros = codes.zeros.round()
    shift = (low - zeros).clamp(min=0) - (zeros - high).clamp(min=0)
    if not shift.any():
        return codes
    n, k = codes.codes.shape
    grouped = codes.codes.reshape(n, -1, codes.group_size).to(torch.int32)
    per_group = shift.to(torch.int32).unsqueeze(-1)
    moved = grouped + per_group
    qmax = 2**codes.bits - 1
    fits = ((moved >= 0) & (moved <= qmax)).all(-1)
    if not fits.all():
        row, group = (~fits).nonzero()[0].tolist()
        raise LowbitError(
            f"{name}: {int((~fits).sum())} group(s) have a zero point outside {low}..{high}, which {fmt} cannot store, "
            f"and their codes leave no room to shift it (first: output {row}, group {group}, zero "
            f"{int(zeros[row, group])}); export with {instead}, or quantize with symmetric weights"
        )
    return LinearCodes(moved.reshape(n, k).to(torch.int16), codes.scales, zeros + shift, codes.bits, codes.group_size)


def pack_int32(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack 4-bit unsigned values 8 per int32 along ``dim`` (0 or 1), element ``8i + j`` in bits ``[4j, 4j+4)``;
    a ragged end is zero-padded."""
    v = values.to(torch.int64)
    if dim == 1:
        v = v.t()
    pad = -v.shape[0] % PACK
    if pad:
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    words = (v.reshape(-1, PACK, v.shape[1]) << (torch.arange(PACK).view(1, -1, 1) * BITS)).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement, as stored
    return (words.t() if dim == 1 else words).contiguous()


def to_fp16_scales(scales: torch.Tensor, name: str) -> torch.Tensor:
    half = scales.to(torch.float16)
    if not torch.isfinite(half).all() or (half == 0).any():
        raise LowbitError(f"{name}: scales outside float16's range cannot be stored in this format; use --format lowbit")
    return half


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


def write_export(loaded, quantized: dict[str, torch.Tensor], layers: list[str], quantization_config: dict,
                 output: str | Path, overwrite: bool, dtype: torch.dtype = torch.float16) -> Path:
    """Write a Hugging Face directory: ``quantized`` tensors, every other tensor in ``dtype``, config.json with
    ``quantization_config``, generation config and tokenizer; into a temporary directory, then renamed."""
    from lowbit.export.packed import float_tensors

    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise LowbitError(f"output {output} already exists; choose another --output or pass --overwrite")
    model = loaded.model
    skip = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias", "qweight", "scales", "zeros")}
    rest, _tied = float_tensors(model, skip, dtype)  # a tied lm_head is stored once, as Hugging Face does
    hf_config = json.loads(model.config.to_json_string(use_diff=True))
    hf_config["architectures"] = [type(model).__name__]
    hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")  # new and old readers
    hf_config["quantization_config"] = quantization_config
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        save_file({**rest, **quantized}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


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
    check_w4a16(loaded, config, "GPTQ")
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, bias, codes in w4a16_layers(loaded.model, config):
        tensors.update(gptq_tensors(name, codes, bias))
        layers.append(name)
    if not layers:
        raise LowbitError("the model has no quantized linear layers to export")
    return write_export(loaded, tensors, layers, gptq_config(config), output, overwrite)
