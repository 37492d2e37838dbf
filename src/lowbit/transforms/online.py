"""Transforms that run at inference for what no weight could absorb: on a norm's output or a linear's input.

A full affine matrix after a norm (AffineQuant's norm matrices) or a rotation of the linears' inputs
(``lowbit.transforms.rotation``) cannot be folded into the norm's elementwise weight, nor can a rotation of
down_proj's input be folded into the gated product that feeds it, so each stays an explicit op ``(x - δ) A``
with ``A`` block-diagonal. It is saved beside the weights under the module's name and attached again on load,
never silently dropped: on a linear (a module with ``in_features``) it runs on the input, elsewhere on the output.
A module has at most one such op: a second transform on the same module composes into it.
"""

from __future__ import annotations

import torch
from torch import nn

ONLINE = "lowbit_online"  # the attribute (and state-dict prefix) an online op lives under
_HOOKED = "_lowbit_online_hooked"  # set once the module's hook is registered, so an op never runs twice


def _dense(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.double())


class OnlineTransform(nn.Module):
    """``(x - δ) A`` along the last dimension, frozen; ``inverse`` holds ``A`` as (blocks, block, block)."""

    def __init__(self, inverse: torch.Tensor, shift: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("inverse", inverse.detach().clone(), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x - self.shift.to(x.device, x.dtype)
        shape = x.shape
        n, b, _ = self.inverse.shape
        inverse = self.inverse.to(x.device, x.dtype)  # a no-op once attach_online moved it to its module's device
        return torch.einsum("...ni,nij->...nj", x.reshape(*shape[:-1], n, b), inverse).reshape(shape)

    def followed_by(self, inverse: torch.Tensor, shift: torch.Tensor | None) -> OnlineTransform:
        """One op equal to this one followed by ``(y - δ₂) A₂``: ``(x - δ₁ - δ₂ A₁⁻¹) A₁ A₂`` (float64 products)."""
        first, second = _dense(self.inverse), _dense(inverse.detach())
        combined_shift = None if self.shift is None else self.shift.double()
        if shift is not None:
            moved = shift.detach().double() @ torch.linalg.inv(first)
            combined_shift = moved if combined_shift is None else combined_shift + moved
        dtype = self.inverse.dtype
        return OnlineTransform((first @ second).to(dtype)[None],
                               None if combined_shift is None else combined_shift.to(dtype))


def _run_on_output(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    op = getattr(module, ONLINE, None)
    return out if op is None else op(out)


def _run_on_input(module: nn.Module, args):
    op = getattr(module, ONLINE, None)
    return None if op is None else (op(args[0]), *args[1:])


def _device(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.parameters(recurse=False)), None)
    if tensor is None:
        tensor = next(iter(module.buffers(recurse=False)), None)
    return None if tensor is None else tensor.device


def attach_online(module: nn.Module, op: OnlineTransform) -> None:
    """Run ``op`` from now on, on a linear's input or on any other module's output (kept as
    ``module.lowbit_online``, so it is saved, and moved to the module's device); an op already there is replaced,
    never run twice."""
    device = _device(module)
    setattr(module, ONLINE, op if device is None else op.to(device))
    if getattr(module, _HOOKED, False):
        return
    if hasattr(module, "in_features"):
        module.register_forward_pre_hook(_run_on_input)
    else:
        module.register_forward_hook(_run_on_output)
    setattr(module, _HOOKED, True)


def detach_online(module: nn.Module) -> None:
    """Stop running ``module``'s online op (its hook stays, passing inputs through)."""
    if online_op(module) is not None:
        setattr(module, ONLINE, None)


def online_op(module: nn.Module) -> OnlineTransform | None:
    op = getattr(module, ONLINE, None)
    return op if isinstance(op, OnlineTransform) else None


def carry_online(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a wrapper replacing the linear ``old``) the online op ``old`` ran on its input, if any."""
    op = online_op(old)
    if op is not None:
        attach_online(new, op)
