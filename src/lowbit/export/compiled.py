"""``torch.compile`` for packed models: the packed matmul as one opaque custom op, everything around it fused.

Why: at batch-1 decode a LLaMA block spends as long on its ~35 small kernels (norms, RoPE, cache writes,
attention glue) as on its matmuls, and both a float and a packed model pay that alike, capping what 4-bit weights
can gain end to end. ``torch.compile`` fuses those small ops, but it cannot trace lowbit's Triton launchers
(autotuning, split-K counters, layout caches). So ``PackedLinear`` calls ``lowbit::w4a16_linear`` under
compilation: Dynamo keeps the whole model in one graph, Inductor fuses what lies between the matmuls and calls
the op as is, and the op runs exactly what eager mode runs (same kernels, same bits).

The op's inputs are the weight's canonical tensors plus, on GPUs, its prepared kernel layout. A layout is built
from the weight's values (a data-dependent choice of metadata dtype), which cannot be traced, so it must exist
before tracing: ``prepare_for_compile(model, dtype)`` builds every layer's (one eager forward does too). Without
it the op stays correct but rebuilds the layout on every call.

    prepare_for_compile(model, torch.float16)
    step = torch.compile(model)          # or compile a function that calls it; CUDA-graph the result as usual
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels import w4a16
from lowbit.kernels.weights import PackedWeight

OP = "lowbit::w4a16_linear"


@torch.library.custom_op(OP, mutates_args=())
def w4a16_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias: torch.Tensor | None, words: torch.Tensor | None, layout_scales: torch.Tensor | None,
                    layout_zeros: torch.Tensor | None, bits: int, group_size: int, chunk: int) -> torch.Tensor:
    """``lowbit.kernels.w4a16_linear`` on a weight given as tensors (custom ops take no Python objects)."""
    n, k = qweight.shape[0], x.shape[-1]
    weight = PackedWeight(qweight, scales, zeros, bits, group_size, k, n)
    if words is not None:  # seed the cache with the layout prepared before tracing
        layout = w4a16.W4A16Layout(words, layout_scales, layout_zeros, chunk, group_size, k, n)
        weight.prepared(w4a16.layout_key(x.dtype), lambda: layout)
    return w4a16.w4a16_linear(x, weight, bias)


@w4a16_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, words, layout_scales, layout_zeros, bits, group_size, chunk):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def traced_w4a16(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """What ``PackedLinear.forward`` calls while being compiled: the op, fed the layout cached for x's dtype."""
    layout = weight.cached(w4a16.layout_key(x.dtype))
    words, layout_scales, layout_zeros, chunk = (None, None, None, 0) if layout is None else (
        layout.words, layout.scales, layout.zeros, layout.chunk)
    return w4a16_linear_op(x, weight.packed, weight.scales, weight.zeros, bias, words, layout_scales, layout_zeros,
                           weight.bits, weight.group_size, chunk)


def prepare_for_compile(model: nn.Module, dtype: torch.dtype) -> int:
    """Build the kernel layout of every weight-only ``PackedLinear`` for activations of ``dtype``, on the device
    each sits on, where a Triton kernel will run (the reference path needs none). Returns how many were built."""
    from lowbit.export.linear import PackedLinear
    from lowbit.kernels.dispatch import backend_for

    built = 0
    for module in model.modules():
        if not isinstance(module, PackedLinear) or module.act_bits is not None:
            continue
        weight = module.weight
        probe = torch.empty(0, dtype=dtype, device=weight.device)
        if backend_for(probe) == "triton" and weight.bits == 4 and w4a16.chunk_size(weight.group_size) is not None:
            w4a16.prepare_w4a16(weight, dtype)
            built += 1
    return built
