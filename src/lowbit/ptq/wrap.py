"""Swap a model's block linears for fake-quant ``QuantLinear`` modules (lm_head and embeddings stay float)."""

from __future__ import annotations

from torch import nn

from lowbit.models.base import Adapter
from lowbit.quant.fake_quant import QuantLinear
from lowbit.quant.quantizer import QuantSpec
from lowbit.transforms.online import carry_online


def wrap_linears(
    model: nn.Module, adapter: Adapter, weight_spec: QuantSpec | None, act_spec: QuantSpec | None
) -> list[QuantLinear]:
    """Replace every quantizable linear of every block; returns the wrappers in block order.

    Group sizes are checked against every layer's width before anything is replaced, so a bad group size
    leaves the model untouched.
    """
    blocks = adapter.blocks(model)
    targets = [(b, name, lin) for b, block in enumerate(blocks) for name, lin in adapter.block_linears(block).items()]
    if weight_spec is not None:
        for b, name, lin in targets:
            weight_spec.check_width(lin.in_features, what=f"layer {b} {name}")
    wrapped = []
    for b, name, lin in targets:
        if isinstance(lin, QuantLinear):
            lin.weight_spec, lin.act_spec = weight_spec, act_spec
            wrapped.append(lin)
            continue
        qlin = QuantLinear(lin, weight_spec, act_spec, name=f"layer {b} {name}")
        carry_online(lin, qlin)  # a rotation of its input (lowbit.transforms.rotation) keeps running
        parent_name, _, attr = name.rpartition(".")
        setattr(blocks[b].get_submodule(parent_name) if parent_name else blocks[b], attr, qlin)
        wrapped.append(qlin)
    return wrapped
