"""Round-to-nearest: min-max scales, no calibration. The baseline every other method must beat."""

from __future__ import annotations

import torch

from lowbit.config import QuantConfig
from lowbit.models.loading import LoadedModel
from lowbit.ptq.wrap import wrap_linears


@torch.no_grad()
def quantize_rtn(loaded: LoadedModel, config: QuantConfig) -> None:
    """Round every block linear's weight in place and quantize its input per token at run time."""
    for qlin in wrap_linears(loaded.model, loaded.adapter, config.weight_spec, config.act_spec):
        qlin.bake_weight()
