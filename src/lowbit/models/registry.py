"""Architecture name → adapter; anything else is refused with the list of what is supported."""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.models.base import Adapter
from lowbit.models.llama import LLAMA
from lowbit.models.opt import OPT

ADAPTERS: tuple[Adapter, ...] = (LLAMA, OPT)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise LowbitError(
        f"unsupported architecture {model_type!r}; lowbit supports: {', '.join(SUPPORTED)} (SmolLM2 is llama)"
    )
