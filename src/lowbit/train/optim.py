"""Optimizer parameter groups and the warmup schedule shared by ``lowbit train`` and the benchmark scripts.

Why a separate group for the LSQ steps: Adam normalises each parameter's update to about ``lr`` per step, so a
per-tensor step (one scalar that rescales a whole layer's quantized weights or activations) would move as fast
as a single weight while acting on the whole layer, i.e. like a per-layer gain. Giving the steps their own
learning rate (and no weight decay: a decayed step shrinks the grid, it does not regularise) keeps them a
quantizer parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import LowbitError

DEFAULT_LSQ_LR_RATIO = 0.1  # lsq_lr = 0.1 x lr unless given; see README "4-bit training" for the measurement


def lsq_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable LSQ steps (``act_step``, ``weight_step``) of every converted layer, each once."""
    from lowbit.train.linear import QuantTrainLinear

    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, QuantTrainLinear):
            for p in (module.act_step, module.weight_step):
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def param_groups(model: nn.Module, lr: float, lsq_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer groups: the model's weights (``lr``, ``weight_decay``) and the LSQ steps (``lsq_lr``, no decay).

    ``lsq_lr`` defaults to ``DEFAULT_LSQ_LR_RATIO * lr``. A float model gets one group. Each group carries a
    ``name`` (``weights`` / ``lsq_steps``) for logs.
    """
    for name, value in (("lr", lr), ("lsq_lr", lsq_lr)):
        if value is not None and (isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0)):
            raise LowbitError(f"{name} must be a positive number, got {value!r}")
    if isinstance(weight_decay, bool) or not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise LowbitError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    steps = lsq_parameters(model)
    step_ids = {id(p) for p in steps}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in step_ids]
    groups = [{"params": weights, "lr": float(lr), "weight_decay": float(weight_decay), "name": "weights"}]
    if steps:
        slr = float(lsq_lr) if lsq_lr is not None else DEFAULT_LSQ_LR_RATIO * float(lr)
        groups.append({"params": steps, "lr": slr, "weight_decay": 0.0, "name": "lsq_steps"})
    return groups


def warmup_schedule(opt: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.1,
                    decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_fraction`` of ``steps``, then cosine or linear decay to zero (every group)."""
    if decay not in ("cosine", "linear"):
        raise LowbitError(f"decay must be 'cosine' or 'linear', got {decay!r}")
    warmup = max(1, int(steps * warmup_fraction))

    def factor(s: int) -> float:
        t = min(1.0, s / steps)
        tail = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t
        return min(1.0, (s + 1) / warmup) * tail

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
