"""``convert(model, config)``: swap a model's ``nn.Linear`` layers for ``QuantTrainLinear``, in place.

Layers named in ``config.keep`` (classifier / LM head by default) stay in high precision, as in the paper.
Every layer is checked before any is swapped, so a bad width leaves the model untouched. Layers are numbered
in ``named_modules`` order, which fixes each one's random stream from ``config.seed``.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from lowbit.errors import LowbitError
from lowbit.train.config import TrainQuantConfig
from lowbit.train.linear import QuantTrainLinear


def is_kept(name: str, keep: tuple[str, ...]) -> bool:
    """A name without a dot matches the last component; with a dot (or a wildcard), the full name."""
    last = name.rsplit(".", 1)[-1]
    for pattern in keep:
        if "." in pattern or any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif last == pattern:
            return True
    return False


def convert(model: nn.Module, config: TrainQuantConfig | None = None) -> nn.Module:
    """Replace every plain ``nn.Linear`` not kept by ``config.keep``; returns ``model`` (changed in place).

    Raises ``LowbitError`` (and changes nothing) when a layer's width cannot be tiled by the Hadamard block
    (unless ``config.pad``), when the model has no linear layer to convert, or when it was converted already.
    """
    config = config or TrainQuantConfig()
    if not isinstance(model, nn.Module):
        raise LowbitError(f"convert needs a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantTrainLinear) for m in model.modules()):
        raise LowbitError("model already has quantized-training layers; convert it only once")
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n and not is_kept(n, config.keep)]
    if not targets:
        raise LowbitError("no nn.Linear layer to convert (all kept in high precision, or none in the model)")
    replacements = [(name, QuantTrainLinear(m, config, index=i, name=name)) for i, (name, m) in enumerate(targets)]
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantTrainLinear]:
    """The converted layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantTrainLinear)}
