"""Post-training quantization methods behind one call: ``quantize(loaded, config)``."""

from __future__ import annotations

from collections.abc import Callable

from lowbit.config import QuantConfig
from lowbit.models.loading import LoadedModel
from lowbit.ptq.rtn import quantize_rtn

METHODS: dict[str, Callable[[LoadedModel, QuantConfig], None]] = {"rtn": quantize_rtn}


def quantize(loaded: LoadedModel, config: QuantConfig) -> LoadedModel:
    """Quantize ``loaded.model`` in place with ``config.method``; returns ``loaded`` for chaining."""
    METHODS[config.method](loaded, config)
    return loaded


__all__ = ["METHODS", "quantize"]
