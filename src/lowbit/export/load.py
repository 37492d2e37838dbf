"""Load a packed checkpoint (``save_packed``) into a model whose quantized linears keep their weights packed.

The Hugging Face skeleton is built from ``config.json`` on the meta device (``accelerate.init_empty_weights``), so
no full-precision copy of the quantized weights is ever allocated. Each quantized linear becomes a ``PackedLinear``
holding the file's packed tensors; the remaining tensors are loaded in place; online transforms are attached again.
Every tensor is checked against what the config implies (names, shapes, dtypes) before the model is assembled,
and each problem is one ``LowbitError`` line. Loading reads and never writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.linear import PackedLinear, expected_packed_shapes
from lowbit.export.packed import FORMAT, FORMAT_VERSION, QUANT_FILE, WEIGHTS_FILE, lowbit_version
from lowbit.models.loading import LoadedModel, resolve_dtype
from lowbit.transforms.online import ONLINE
MAX_LISTED = 4


def read_packed_metadata(directory: Path) -> dict:
    """``quantization.json`` of a packed checkpoint, checked for format and version."""
    path = directory / QUANT_FILE
    if not directory.is_dir():
        raise LowbitError(f"packed checkpoint directory does not exist: {directory}")
    if not path.is_file():
        raise LowbitError(f"{directory} has no {QUANT_FILE}: it is not a lowbit checkpoint (load it with load_model)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LowbitError(f"{path} is not valid JSON ({err}); the directory may be corrupt") from None
    if meta.get("format") == "lowbit-fake-quant":
        raise LowbitError(f"{directory} holds fake-quant (dequantized) weights, not packed ones: load it with load_model")
    if meta.get("format") != FORMAT:
        raise LowbitError(f"{path} has format {meta.get('format')!r}; load_quantized reads {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise LowbitError(f"{path} has no integer format_version; the directory is corrupt")
    if version > FORMAT_VERSION:
        raise LowbitError(
            f"{path} was written by lowbit {meta.get('lowbit_version')} (packed format {version}); this is lowbit "
            f"{lowbit_version()}, which reads up to format {FORMAT_VERSION}: upgrade lowbit"
        )
    return meta


def _listing(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _open_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``; a missing, truncated or garbled file is one clear line."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise LowbitError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LowbitError(f"{path} is truncated or corrupt ({first}); save the checkpoint again") from None


def _check(path: Path, key: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype | None) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise LowbitError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model config needs {tuple(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise LowbitError(f"{path}: {key} is {tensor.dtype}, expected {dtype}")


def _skeleton(directory: Path, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise LowbitError(f"could not read {directory / 'config.json'}: {str(err).strip().splitlines()[0]}") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def load_quantized(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = "auto") -> LoadedModel:
    """Rebuild the model saved by ``save_packed`` in ``directory``: packed linears, float tensors in ``dtype``.

    ``dtype="auto"`` is float16 on CUDA and float32 on CPU, as ``load_model``; scales and zero points stay float32.
    """
    from transformers import AutoTokenizer

    from lowbit.config import QuantConfig
    from lowbit.models.registry import adapter_for
    from lowbit.transforms.online import OnlineTransform, attach_online

    directory = Path(directory).expanduser()
    meta = read_packed_metadata(directory)
    if not isinstance(meta.get("config"), dict):
        raise LowbitError(f"{directory / QUANT_FILE} has no quantization config; the directory is corrupt")
    config = QuantConfig.from_dict(meta["config"])
    spec = config.weight_spec
    if spec is None:
        raise LowbitError(f"{directory / QUANT_FILE} describes float weights; it is not a packed checkpoint")
    torch_dtype = resolve_dtype(dtype, device)
    model = _skeleton(directory, torch_dtype)
    adapter = adapter_for(model.config.model_type)
    adapter.validate(model)
    path = directory / WEIGHTS_FILE
    from lowbit.ptq.checkpoint import online_names, with_shared

    tensors = with_shared(_open_tensors(path), meta.get("shared_online", {}), online_names(meta.get("online_ops", [])),
                          str(directory / QUANT_FILE))

    # what the config implies the file must hold
    layers = [f"{adapter.blocks_path}.{b}.{n}" for b in range(len(adapter.blocks(model))) for n in adapter.linears]
    tied = meta.get("tied", {})
    for alias, kept in tied.items():
        if alias not in model.state_dict() or kept not in model.state_dict() or kept in tied:
            raise LowbitError(f"{directory / QUANT_FILE} ties {alias} to {kept}, which this model does not have")
    linear_keys = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    float_expected = {k: v for k, v in model.state_dict().items() if k not in linear_keys and k not in tied}
    expected = set(float_expected)
    for layer in layers:
        expected |= {f"{layer}.{suffix}" for suffix in ("qweight", "scales", "zeros")}
        if model.get_submodule(layer).bias is not None:
            expected.add(f"{layer}.bias")
    online_ops = meta.get("online_ops", [])
    for norm in online_ops:
        expected.add(f"{norm}.{ONLINE}.inverse")
    optional = {f"{norm}.{ONLINE}.shift" for norm in online_ops}
    missing = expected - set(tensors)
    extra = set(tensors) - expected - optional
    if missing:
        raise LowbitError(f"{path} lacks {len(missing)} tensor(s) the model needs: {_listing(missing)}")
    if extra:
        raise LowbitError(f"{path} holds {len(extra)} tensor(s) this model does not have: {_listing(extra)}")

    # quantized linears: checked, then swapped in while still packed
    act_bits = config.abits if config.act_spec is not None else None
    for layer in layers:
        skeleton = model.get_submodule(layer)
        group = spec.group_size or skeleton.in_features
        spec.check_width(skeleton.in_features, what=layer)
        for suffix, (shape, kind) in expected_packed_shapes(skeleton.out_features, skeleton.in_features,
                                                            spec.bits, group).items():
            _check(path, f"{layer}.{suffix}", tensors[f"{layer}.{suffix}"], shape, kind)
        scales, zeros = tensors[f"{layer}.scales"], tensors[f"{layer}.zeros"]
        if not (torch.isfinite(scales).all() and (scales > 0).all() and torch.equal(zeros, zeros.round())):
            raise LowbitError(f"{path}: {layer} has non-positive or non-finite scales or non-integer zero points; "
                              "the file is corrupt")
        bias = tensors.get(f"{layer}.bias")
        if bias is not None:
            _check(path, f"{layer}.bias", bias, (skeleton.out_features,), None)
            bias = bias.to(torch_dtype)
        _replace(model, layer, PackedLinear(
            tensors[f"{layer}.qweight"], tensors[f"{layer}.scales"], tensors[f"{layer}.zeros"], spec.bits, group,
            skeleton.in_features, bias=bias, act_bits=act_bits, act_symmetric=config.act_symmetric,
        ))

    # everything else: shapes from the skeleton, floats cast to the requested dtype
    state = {}
    for key, like in float_expected.items():
        tensor = tensors[key]
        _check(path, key, tensor, like.shape, None)
        if tensor.is_floating_point() != like.is_floating_point():
            raise LowbitError(f"{path}: {key} is {tensor.dtype}, expected {like.dtype}")
        state[key] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    for alias, kept in tied.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(kept))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise LowbitError(f"{path} left {len(left)} tensor(s) unset: {_listing(left)}; the checkpoint is incomplete")
    for norm in online_ops:
        inverse = tensors[f"{norm}.{ONLINE}.inverse"]
        attach_online(model.get_submodule(norm), OnlineTransform(inverse, tensors.get(f"{norm}.{ONLINE}.shift")))

    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.to(device).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise LowbitError(f"could not load the tokenizer from {directory}: {str(err).strip().splitlines()[0]}") from None
    source = f"{directory} ({config.method} {config.name}, packed)"
    return LoadedModel(model, tokenizer, adapter, source, quant_config=config)
