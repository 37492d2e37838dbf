"""Catch the first decoder block's inputs (hidden states and the keyword arguments the model passes it).

Only the modules outside the blocks (embeddings, rotary tables) and the first block are moved to the calibration
device, so a model larger than the GPU can still be calibrated one block at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.base import Adapter


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once block 0 has its inputs."""


def move_outside_blocks(model: nn.Module, adapter: Adapter, device: torch.device | str) -> None:
    """Move every parameter and buffer that does not belong to a decoder block to ``device``."""
    inside = {id(m) for block in adapter.blocks(model) for m in block.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every window (float32, on ``device``) and the block's kwargs.

    Windows are run one at a time, so the captured kwargs (rotary cos/sin, masks, positions) have batch size 1
    and broadcast over any calibration batch.
    """
    blocks = adapter.blocks(model)
    move_outside_blocks(model, adapter, device)
    first = blocks[0].to(device)
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach().float())
        kwargs_seen.clear()
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window.unsqueeze(0).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in kwargs_seen.items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return torch.cat(captured), kwargs
