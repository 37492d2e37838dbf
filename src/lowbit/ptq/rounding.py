"""GPTQ as the final rounding stage of one calibrated block, true-sequentially.

After a block's transforms are merged (weights in float, each ``QuantLinear`` still holding its ``weight_spec`` and
learnt clipping), the linears are rounded group by group in the order data flows through the block: the linears
that read one input together (q/k/v; gate/up; OPT's fc1), then the next group. Each group's Hessian comes from
forward pre-hooks on the block run over the *quantized-path* inputs with every earlier group already rounded, so
o_proj sees the attention of the rounded q/k/v, down_proj the MLP of the rounded gate/up: the inputs the
quantized model will see. A pre-hook sees a linear's actual input, after any online transform a norm carries.
``XᵀX`` is summed batch by batch (no input is stored), in float64; a forward stops as soon as the group has seen
its batch. Not-yet-rounded linears later in the block run fake-quantized meanwhile; they cannot affect the
inputs of earlier groups.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from lowbit.models.base import Adapter
from lowbit.ptq.gptq import GPTQOptions, Grid, gptq_round, mse_clip, output_error
from lowbit.quant.fake_quant import QuantLinear

log = logging.getLogger(__name__)


class _GroupDone(Exception):
    """Raised by the last hook of a group to stop the block's forward: later modules are not needed."""


def sequential_groups(adapter: Adapter) -> list[list[str]]:
    """The block's linears as groups sharing one input, in data-flow order (the adapter lists linears in the
    order they run): each norm or linear pair's targets form a group, every other linear is its own."""
    groups: list[list[str]] = [list(p.targets) for p in adapter.pairs if p.kind != "qk"]
    grouped = {name for g in groups for name in g}
    groups += [[name] for name in adapter.linears if name not in grouped]
    order = {name: i for i, name in enumerate(adapter.linears)}
    return sorted(groups, key=lambda g: min(order[n] for n in g))


@torch.no_grad()
def collect_hessians(block: nn.Module, modules: dict[str, nn.Module], inputs: torch.Tensor, kwargs: dict,
                     batch: int) -> dict[str, torch.Tensor]:
    """``XᵀX / tokens`` (float64) of each module's input over ``inputs`` run through ``block``, batch by batch.
    Modules fed the very same tensor (q, k and v) share one product per batch."""
    sums: dict[str, torch.Tensor] = {}
    tokens = {name: 0 for name in modules}
    seen: set[str] = set()
    last: list = [None, None]  # (input tensor, its XᵀX) of the latest hook call

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            if last[0] is not args[0]:  # q, k and v see the same input object: one XᵀX for the three
                flat = x.reshape(-1, x.shape[-1]).double()
                last[0], last[1] = args[0], flat.T @ flat
            sums[name] = last[1] if name not in sums else sums[name] + last[1]
            tokens[name] += x.numel() // x.shape[-1]
            seen.add(name)
            if len(seen) == len(modules):
                raise _GroupDone
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for start in range(0, inputs.shape[0], batch):
            seen.clear()
            try:
                block(inputs[start : start + batch], **kwargs)
            except _GroupDone:
                pass
            if len(seen) != len(modules):
                raise RuntimeError(f"GPTQ: the block's forward never reached {sorted(set(modules) - seen)}")
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return {name: sums[name] / tokens[name] for name in modules}


@torch.no_grad()
def round_linear(q: QuantLinear, hessian: torch.Tensor, options: GPTQOptions) -> dict[str, float]:
    """Round ``q``'s weight in place by GPTQ on its grid (learnt clipping if any, else ``options.grid``) and stop
    quantizing it on the fly (as ``bake_weight``); returns the output error of RTN and of GPTQ on that grid."""
    spec = q.weight_spec
    w = q.weight.detach().float()
    if q.weight_clip is not None:
        clip = q.weight_clip()
    else:
        clip = mse_clip(w, spec) if options.grid == "mse" else None
    grid = Grid.of(w, spec, clip)
    rounded = gptq_round(w, hessian, grid, options)
    stats = {"rtn": output_error(w, grid.snap(w), hessian), "gptq": output_error(w, rounded, hessian)}
    q.weight.copy_(rounded.to(q.weight.dtype))
    q.weight_spec, q.weight_clip = None, None
    return stats


def gptq_block(block: nn.Module, linears: dict[str, QuantLinear], adapter: Adapter, inputs: torch.Tensor,
               kwargs: dict, batch: int, options: GPTQOptions) -> dict[str, dict[str, float]]:
    """Round every still-unrounded linear of ``block`` by GPTQ, true-sequentially; returns per-linear errors
    (``rtn``/``gptq``: mean squared output error on the calibration inputs, same grid) and seconds."""
    stats: dict[str, dict[str, float]] = {}
    for group in sequential_groups(adapter):
        todo = {name: linears[name] for name in group if linears[name].weight_spec is not None}
        if not todo:
            continue
        start = time.perf_counter()
        hessians = collect_hessians(block, todo, inputs, kwargs, batch)
        for name, q in todo.items():
            stats[name] = round_linear(q, hessians[name], options)
        seconds = (time.perf_counter() - start) / len(todo)
        for name in todo:
            stats[name]["seconds"] = round(seconds, 3)
        del hessians
    return stats
