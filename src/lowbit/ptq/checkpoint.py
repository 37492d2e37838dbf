"""Per-block calibration checkpoints, so a killed run restarted with the same command resumes where it stopped.

Each finished block is saved as ``block_NNN.safetensors`` (its merged, rounded weights and any online transform)
plus ``block_NNN.json`` (its log), each written to a temporary name and renamed. A ``manifest.json`` records
the command's configuration; a checkpoint directory written by a different configuration is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.transforms.online import ONLINE


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``section.key: saved value -> this run's`` for every entry that differs (nested dicts walked)."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "absent"), current.get(key, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class BlockCheckpoints:
    """Save and restore finished blocks under ``directory`` (disabled when it is None)."""

    def __init__(self, directory: str | Path | None, manifest: dict) -> None:
        self.dir = Path(directory) if directory else None
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "manifest.json"
        text = json.dumps(manifest, indent=2, sort_keys=True)
        if path.exists() and path.read_text() != text:
            changed = "; ".join(_differences(json.loads(path.read_text()), manifest)[:3])
            raise LowbitError(
                f"checkpoint directory {self.dir} belongs to a run with another configuration ({changed}); delete "
                "it, or rerun with that run's options to resume (recipe defaults can change between lowbit versions: "
                "--scale-init, --[no-]mlp-scales, --[no-]norm-matrices, --let-lr and --epochs set them explicitly)"
            )
        _atomic_write(path, lambda p: p.write_text(text))

    def _paths(self, b: int) -> tuple[Path, Path]:
        return self.dir / f"block_{b:03d}.safetensors", self.dir / f"block_{b:03d}.json"

    def load(self, b: int) -> tuple[dict, dict] | None:
        if self.dir is None:
            return None
        weights, meta = self._paths(b)
        if not (weights.exists() and meta.exists()):
            return None
        return load_file(weights), json.loads(meta.read_text())

    def restore(self, b: int, calib, saved: tuple[dict, dict]):
        """Put a saved block back into ``calib.block`` exactly as it was merged."""
        from lowbit.transforms.online import OnlineTransform, attach_online, detach_online
        from lowbit.ptq.engine import BlockLog

        tensors, meta = saved
        for q in calib.linears.values():
            q.weight_spec, q.weight_clip = None, None
        for name, module in calib.block.named_modules():  # the saved block is the whole truth: no other op runs
            if name not in meta["online_ops"]:
                detach_online(module)
        for norm_name in meta["online_ops"]:
            shift = tensors.pop(f"{norm_name}.{ONLINE}.shift", None)
            attach_online(calib.block.get_submodule(norm_name), OnlineTransform(tensors.pop(f"{norm_name}.{ONLINE}.inverse"), shift))
        calib.block.load_state_dict(tensors, strict=True)
        return BlockLog(**meta)

    def save(self, b: int, block: nn.Module, entry) -> None:
        if self.dir is None:
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}
        for name in entry.online_ops:
            op = block.get_submodule(name).lowbit_online
            tensors[f"{name}.{ONLINE}.inverse"] = op.inverse.detach().contiguous().cpu()
            if op.shift is not None:
                tensors[f"{name}.{ONLINE}.shift"] = op.shift.detach().contiguous().cpu()
        weights, meta = self._paths(b)
        _atomic_write(weights, lambda p: save_file(tensors, str(p)))
        _atomic_write(meta, lambda p: p.write_text(json.dumps(asdict(entry), indent=2)))


def stored_once(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Equal tensors written once: an input rotation repeats one matrix in every block (30 x 1536 x 1536 float32,
    283 MB, on SmolLM2). Returns the tensors to write and, for each one left out, the name of its equal."""
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        twin = next((kept for kept, t in out.items() if t.shape == tensor.shape and t.dtype == tensor.dtype
                     and torch.equal(t, tensor)), None)
        if twin is None:
            out[name] = tensor
        else:
            shared[name] = twin
    return out, shared


def online_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """What a saved model writes of its online ops: the tensors (equal ones once, ``stored_once``), the modules
    that run one, and the names left out with their equals."""
    tensors = online_tensors(model)
    unique, shared = stored_once(tensors)
    return unique, sorted({k.rsplit(".", 2)[0] for k in tensors}), shared


def online_names(ops) -> set[str]:
    """The tensor names the online ops of the modules ``ops`` may have (what a shared_online map may name)."""
    return {f"{op}.{ONLINE}.{part}" for op in ops if isinstance(op, str) for part in ("inverse", "shift")}


def with_shared(tensors: dict[str, torch.Tensor], shared: dict, allowed: set[str], where: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every name ``stored_once`` left out restored from its equal; a bad map is one clear line.
    Only online-op tensors (``allowed``) may be shared, so a map cannot stand in for a missing weight."""
    if not isinstance(shared, dict):
        raise LowbitError(f"{where} has a malformed shared_online map; the directory is corrupt")
    out = dict(tensors)
    for name, kept in shared.items():
        if not (isinstance(kept, str) and name in allowed and kept in allowed) or kept not in tensors or name in tensors:
            raise LowbitError(f"{where} shares {name} with {kept}, which the file does not hold once; the directory "
                              "is corrupt")
        out[name] = tensors[kept]
    return out


def online_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every online transform of ``model`` by full module name, for saving beside the weights."""
    out = {}
    for name, module in model.named_modules():
        op = getattr(module, ONLINE, None)
        if isinstance(op, nn.Module):
            out[f"{name}.{ONLINE}.inverse"] = op.inverse.detach().contiguous().cpu()
            if op.shift is not None:
                out[f"{name}.{ONLINE}.shift"] = op.shift.detach().contiguous().cpu()
    return out
