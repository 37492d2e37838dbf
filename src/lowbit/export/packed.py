"""Write a quantized model as lowbit's packed checkpoint: real integer weights, everything else in float.

Layout of the directory (``FORMAT``, version ``FORMAT_VERSION``):

- ``model.safetensors``: for each quantized linear ``<layer>.qweight`` (uint8, codes packed along the input
  dimension by ``lowbit.quant.packing``: int4 two per byte, low nibble first; int3 eight per three bytes),
  ``<layer>.scales`` and ``<layer>.zeros`` (float32, one per output channel and group; the weight is
  ``(code - zero) · scale``) and ``<layer>.bias``; every other tensor (embeddings, norms, lm_head) under its
  Hugging Face name in ``dtype``; transforms left online (full affine matrices after norms) as
  ``<norm>.lowbit_online.inverse`` / ``.shift`` in float32. A tensor tied to another (lm_head to the embedding) is
  stored once and listed under ``tied``.
- ``config.json`` and the tokenizer files, as ``save_pretrained`` writes them.
- ``quantization.json``: format, version, method, bits, group size, activation scheme, online ops, source.

Everything is checked and encoded before the first byte is written, then written into a temporary directory
beside ``output`` and renamed, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.codes import iter_quantized_linears
from lowbit.models.saving import atomic_output, resolved_config
from lowbit.quant.packing import pack

FORMAT = "lowbit-packed"
FORMAT_VERSION = 2  # the highest this lowbit reads; 2 adds shared_online
SHARED_ONLINE_VERSION = 2  # written only by files that share online tensors: the rest stay readable by 1
WEIGHTS_FILE = "model.safetensors"
QUANT_FILE = "quantization.json"
PACKED_SUFFIXES = ("qweight", "scales", "zeros")
SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lowbit_version() -> str:
    from lowbit import __version__

    return __version__


def quantized_tensors(model: nn.Module, config, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``<layer>.qweight/.scales/.zeros/.bias`` of every quantized linear, and the layer names in order."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for name, module, codes in iter_quantized_linears(model, config):
        tensors[f"{name}.qweight"] = pack(codes.codes, codes.bits).data.contiguous()
        tensors[f"{name}.scales"] = codes.scales.cpu()
        tensors[f"{name}.zeros"] = codes.zeros.cpu()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().to("cpu", dtype).contiguous()
        layers.append(name)
    return tensors, layers


def float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every other state-dict tensor in ``dtype``, tied duplicates stored once; returns (tensors, alias → kept)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        value = value.detach().to("cpu")
        tensors[key] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return tensors, tied


def _metadata(loaded, config, layers: list[str], online: list[str], tied: dict[str, str], dtype: torch.dtype) -> dict:
    return {
        "format": FORMAT,
        "format_version": 1,  # SHARED_ONLINE_VERSION only when online tensors are shared (below)
        "lowbit_version": lowbit_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": loaded.source,
        "method": config.method,
        "config_name": config.name,
        "config": resolved_config(config, loaded.calibration_plan),
        "weights": {
            "bits": config.wbits,
            "group_size": config.group_size,  # null: one scale per output channel
            "symmetric": config.weight_symmetric,
            "layout": "qweight uint8 (out, packed bytes of in) by lowbit.quant.packing, little-endian within a "
                      "packing group; weight = (code - zero) * scale, scales and zeros float32 (out, in / group)",
            "layers": layers,
        },
        "activations": None if config.act_spec is None else {
            "bits": config.abits, "granularity": "token", "symmetric": config.act_symmetric, "dynamic": True,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "online_ops": online,
        "tied": tied,
    }


def save_packed(loaded, config, output: str | Path, overwrite: bool = False,
                dtype: torch.dtype = torch.float16) -> Path:
    """Save ``loaded`` (quantized with ``config``) to ``output`` as a packed checkpoint; see the module docstring.

    ``dtype`` is the storage type of the tensors that stay floating point (float16, bfloat16 or float32).
    """
    from lowbit.ptq.checkpoint import online_to_save

    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise LowbitError(f"output {output} already exists; choose another --output or pass --overwrite")
    if config.weight_spec is None:
        raise LowbitError(f"{config.name} keeps weights in floating point: nothing to pack; save it with save_quantized")
    if dtype not in SAVE_DTYPES:
        raise LowbitError(f"packed checkpoints keep float tensors as float16, bfloat16 or float32, not {dtype}")
    model = loaded.model
    packed, layers = quantized_tensors(model, config, dtype)  # refuses weights off the grid, before any write
    if not layers:
        raise LowbitError("the model has no quantized linear layers to pack")
    skip = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    rest, tied = float_tensors(model, skip, dtype)
    online, online_ops, shared = online_to_save(model)  # an input rotation repeats one matrix in every block
    tensors = {**rest, **packed, **online}
    meta = _metadata(loaded, config, layers, online_ops, tied, dtype)
    if shared:
        meta["shared_online"] = shared
        meta["format_version"] = SHARED_ONLINE_VERSION

    with atomic_output(output, overwrite) as tmp:  # checked above; the old output goes only once the new is in
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lowbit": FORMAT})
        hf_config = json.loads(model.config.to_json_string(use_diff=True))
        hf_config.pop("quantization_config", None)  # a GGUF origin; these weights are lowbit's own
        hf_config["architectures"] = [type(model).__name__]
        hf_config["dtype"] = meta["dtype"]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if getattr(loaded, "calibration_log", None):
            from lowbit.ptq.engine import write_log

            write_log(loaded.calibration_log, tmp)
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return output
