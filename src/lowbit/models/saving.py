"""Write a quantized model as a Hugging Face directory plus ``quantization.json``, atomically.

The weights are stored already rounded (dequantized values in ``save_dtype``), so any HF tool loads them; the
activation quantizers, which are not weights, are described in ``quantization.json`` and re-attached by
``load_model``. The directory is written under a temporary name next to the target and renamed at the end, so
an interrupted run leaves nothing half-written. Packed integer checkpoints are ``lowbit.export``'s job.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.models.loading import QUANT_FILE, LoadedModel, read_meta

ONLINE_FILE = "online_transforms.safetensors"
FORMAT = "lowbit-fake-quant"
FORMAT_VERSION = 2  # the highest this lowbit reads; 2 adds shared_online
SHARED_ONLINE_VERSION = 2  # written only by files that share online tensors: the rest stay readable by 1


def _version() -> str:
    from lowbit import __version__

    return __version__


def replace_atomically(tmp: Path, output: Path) -> None:
    """Rename ``tmp`` to ``output``; an old ``output`` is moved aside first and deleted only once ``tmp`` is in."""
    old = None
    if output.exists():
        old = output.with_name(f"{tmp.name}.old")
        output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


@contextmanager
def atomic_output(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary directory beside ``output`` to write into: renamed to ``output`` when the block ends (an
    old ``output`` is deleted only once the new one is in place), removed if it raises. An existing ``output``
    is refused on entry unless ``overwrite``."""
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise LowbitError(f"output {output} already exists; choose another --output or pass --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        replace_atomically(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(
    loaded: LoadedModel, config, output: str | Path, save_dtype: torch.dtype = torch.float16, overwrite: bool = False
) -> Path:
    """Save ``loaded`` (quantized with ``config``) to ``output``; refuses to replace a directory unless asked."""
    output = Path(output).expanduser()
    with atomic_output(output, overwrite) as tmp:
        state = {k: v.detach().to("cpu", save_dtype) for k, v in loaded.model.state_dict().items()}
        loaded.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        config_file = tmp / "config.json"
        hf_config = json.loads(config_file.read_text())
        hf_config["dtype"] = str(save_dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(hf_config, indent=2))
        loaded.tokenizer.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            "format_version": 1,  # SHARED_ONLINE_VERSION only when online tensors are shared (below)
            "lowbit_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_model": loaded.source,
            "config": resolved_config(config, loaded.calibration_plan),
            "config_name": config.name,
            "weights": f"rounded to the {config.name} grid, stored dequantized as {hf_config['dtype']}",
            "activations": None if config.act_spec is None else {
                "bits": config.abits, "granularity": "token", "symmetric": config.act_symmetric, "dynamic": True,
            },
        }
        if loaded.rotation is not None:
            meta["rotation"] = loaded.rotation.to_dict()
        online, shared = _save_online(loaded.model, tmp)
        if online:
            meta["online_ops"] = online
            meta["note"] = ("online transforms (--norm-matrices, --rotate inputs) are in online_transforms.safetensors; "
                            "load this directory with lowbit.load_model, plain transformers would ignore them")
        if shared:
            meta["shared_online"] = shared
            meta["format_version"] = SHARED_ONLINE_VERSION
        if getattr(loaded, "calibration_log", None):
            from lowbit.ptq.engine import write_log

            write_log(loaded.calibration_log, tmp)
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return output


def resolved_config(config, plan) -> dict:
    """The config as written, with MLP scales, norm matrices and the weights' rate the run took by default spelled out (a later
    default cannot change what the file says); a run without them keeps the plain config, which reloads equal to
    the one given."""
    from lowbit.ptq.recipes import default_weight_lr

    data = config.to_dict()
    if plan is not None and config.mlp_scales is None and plan.mlp_scales:
        data["mlp_scales"] = True
    if plan is not None and config.norm_matrices is None and plan.norm_matrices:
        data["norm_matrices"] = True
    if config.weight_lr is None and default_weight_lr(config):
        data["weight_lr"] = default_weight_lr(config)
    if config.e2e_epochs:  # the rate too, default or not
        data["e2e_lr"] = config.e2e_lr
    return data


def _save_online(model, directory: Path) -> tuple[list[str], dict[str, str]]:
    """Write the online ops, equal ones once; returns the modules that run one and the names left out."""
    from safetensors.torch import save_file

    from lowbit.ptq.checkpoint import online_to_save

    tensors, ops, shared = online_to_save(model)
    if tensors:
        save_file(tensors, str(directory / ONLINE_FILE))
    return ops, shared


def _load_online(model, directory: Path, names: list[str], shared: dict) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lowbit.transforms.online import OnlineTransform, attach_online
    from lowbit.ptq.checkpoint import ONLINE, online_names, with_shared

    try:
        tensors = load_file(str(directory / ONLINE_FILE))
    except (OSError, SafetensorError) as err:
        raise LowbitError(f"{directory / ONLINE_FILE} is missing or corrupt ({err}); the model cannot run without it") from None
    tensors = with_shared(tensors, shared, online_names(names), str(directory / QUANT_FILE))
    for name in names:
        try:
            inverse = tensors[f"{name}.{ONLINE}.inverse"]
        except KeyError:
            raise LowbitError(f"{directory / ONLINE_FILE} has no transform for {name}; the directory is corrupt") from None
        attach_online(model.get_submodule(name), OnlineTransform(inverse, tensors.get(f"{name}.{ONLINE}.shift")))


def read_quantization(directory: Path):
    """Parse and check ``quantization.json``; returns (``QuantConfig``, online op names, shared_online map) or None
    if absent."""
    from lowbit.config import QuantConfig

    meta = read_meta(directory)
    if meta is None:
        return None
    path = directory / QUANT_FILE
    if meta.get("format") != FORMAT:
        raise LowbitError(f"{path} has format {meta.get('format')!r}; this lowbit reads {FORMAT!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LowbitError(
            f"{path} was written by lowbit {meta.get('lowbit_version')} (format {meta['format_version']}); "
            f"upgrade lowbit (this is {_version()})"
        )
    return QuantConfig.from_dict(meta["config"]), meta.get("online_ops", []), meta.get("shared_online", {})


def attach_saved_quantization(loaded: LoadedModel, directory: Path | None) -> None:
    """If ``directory`` was written by ``save_quantized``, quantize activations again as it was calibrated."""
    from lowbit.ptq.wrap import wrap_linears

    found = read_quantization(directory) if directory is not None else None
    if found is None:
        return
    config, online, shared = found
    loaded.quant_config = config
    if online:
        _load_online(loaded.model, directory, online, shared)
    if config.act_spec is not None:
        wrap_linears(loaded.model, loaded.adapter, None, config.act_spec)
    loaded.source = f"{loaded.source} ({config.method} {config.name})"
