"""What the W4A16 exporters (GPTQ, compressed-tensors) share: refusing what they cannot express, reading each
quantized linear's codes, moving zero points into a format's range, int32 packing, and writing the directory.

Both formats hold 4-bit weights only: W4A4 / W6A6 (quantized activations) and the online transforms of
``--norm-matrices`` and ``--rotate inputs`` cannot be expressed in them and no tool that reads them would run
those, so such results are refused here with one line pointing to lowbit's own packed format (``lowbit export --format lowbit``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.codes import LinearCodes, iter_quantized_linears

BITS = 4
PACK = 32 // BITS  # codes per int32 word
WEIGHTS_FILE = "model.safetensors"

# one linear's format tensors from (name, codes, bias)
EncodeLayer = Callable[[str, LinearCodes, "torch.Tensor | None"], dict[str, torch.Tensor]]


def load_result(directory: str | Path):
    """A ``lowbit quantize`` output (fake-quant or packed) ready to export, in the dtype its float tensors were
    stored in, so that reading a fake-quant model's grid back sees exactly the stored values (packed weights are
    read as they are)."""
    from lowbit.models.loading import load_model

    directory = Path(directory).expanduser()
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
        raise LowbitError(f"this model keeps online transforms (--norm-matrices, --rotate inputs), which {fmt} cannot express; "
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


def write_export(loaded, quantized: dict[str, torch.Tensor], layers: list[str], quantization_config: dict,
                 output: str | Path, overwrite: bool, dtype: torch.dtype = torch.float16) -> Path:
    """Write a Hugging Face directory: ``quantized`` tensors, every other tensor in ``dtype``, config.json with
    ``quantization_config``, generation config and tokenizer; into a temporary directory, then renamed."""
    from lowbit.export.packed import float_tensors
    from lowbit.models.saving import atomic_output

    output = Path(output).expanduser()
    model = loaded.model
    with atomic_output(output, overwrite) as tmp:
        skip = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias", "qweight", "scales", "zeros")}
        rest, _tied = float_tensors(model, skip, dtype)  # a tied lm_head is stored once, as Hugging Face does
        hf_config = json.loads(model.config.to_json_string(use_diff=True))
        hf_config["architectures"] = [type(model).__name__]
        hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")  # new and old readers
        hf_config["quantization_config"] = quantization_config
        save_file({**rest, **quantized}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return output


def export_w4a16(loaded, config, fmt: str, encode: EncodeLayer,
                 quantization_config: Callable[[list[str]], dict], output: str | Path, overwrite: bool) -> Path:
    """Check, encode every quantized linear with ``encode``, then write: everything is encoded and checked before
    the first byte is written. ``quantization_config`` gets the exported layer names."""
    check_w4a16(loaded, config, fmt)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, bias, codes in w4a16_layers(loaded.model, config):
        tensors.update(encode(name, codes, bias))
        layers.append(name)
    if not layers:
        raise LowbitError("the model has no quantized linear layers to export")
    return write_export(loaded, tensors, layers, quantization_config(layers), output, overwrite)
