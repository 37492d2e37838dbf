"""Swap a model's linears between float and packed in memory, in place, one layer at a time; and a random model.

Converting in place keeps one copy of the weights in memory at a time, which a 7B model on one GPU needs:
``pack_rtn`` rounds a float model's block linears to nearest and packs them, ``pack_quantized`` packs a model
already on a ``lowbit quantize`` grid, ``to_float_linears`` turns packed or fake-quant linears back into float ones.
Speed does not depend on weight values, so ``random_llama`` builds a LLaMA-7B-shaped model with seeded random
weights directly on the device, for ``lowbit bench --random-llama7b`` and ``benchmarks/inference_e2e.py``.
"""

from __future__ import annotations

import torch
from torch import nn

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def random_llama(device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16, seed: int = 0,
                 **overrides) -> nn.Module:
    """A LLaMA-7B-shaped causal LM (``overrides`` change any config field) with seeded N(0, 0.02) weights.

    Built directly on ``device`` in ``dtype``: a 7B model is 13.5 GB in fp16 and is never materialised twice.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**LLAMA_7B, **overrides})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():  # norms at 1, as trained models keep them near
            if "Norm" in type(module).__name__:
                module.weight.fill_(1.0)
    return model.eval().requires_grad_(False)


def packed_linear(codes, bias: torch.Tensor | None, act_bits: int | None = None, act_symmetric: bool = False):
    """A ``PackedLinear`` holding ``codes`` (a ``LinearCodes``) packed, quantizing activations to ``act_bits``."""
    from lowbit.export.linear import PackedLinear
    from lowbit.quant.packing import pack

    qweight = pack(codes.codes, codes.bits).data.contiguous()
    return PackedLinear(qweight, codes.scales.contiguous(), codes.zeros.contiguous(), codes.bits, codes.group_size,
                        codes.in_features, bias=None if bias is None else bias.detach(), act_bits=act_bits,
                        act_symmetric=act_symmetric)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``; an online op the old one ran on its input (a
    rotation of down_proj's input, ``--rotate inputs``) runs on the new one."""
    from lowbit.transforms.online import carry_online

    carry_online(model.get_submodule(name), module)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


@torch.no_grad()
def pack_rtn(model: nn.Module, bits: int = 4, group_size: int | None = 128) -> int:
    """Round every block linear to nearest (asymmetric, min-max) and swap it for a packed W-only module, in place.

    One layer at a time, so peak memory is the model plus one layer's float32 work; returns the layers packed.
    """
    from lowbit.export.codes import LinearCodes
    from lowbit.models.registry import adapter_for
    from lowbit.quant.quantizer import QuantSpec, quantize

    adapter = adapter_for(model.config.model_type)
    spec = QuantSpec(bits, False, "channel") if group_size is None else QuantSpec(bits, False, "group", group_size)
    count = 0
    for b, block in enumerate(adapter.blocks(model)):
        for name, linear in adapter.block_linears(block).items():
            n, k = linear.weight.shape
            spec.check_width(k, what=f"layer {b} {name}")
            qt = quantize(linear.weight, spec)
            group = k if group_size is None else group_size
            codes = LinearCodes(qt.q.reshape(n, k).to(torch.int16), qt.scale.reshape(n, k // group),
                                qt.zero.reshape(n, k // group), bits, group)
            replace_module(block, name, packed_linear(codes, linear.bias))
            del qt, codes, linear
            count += 1
    return count


@torch.no_grad()
def pack_quantized(model: nn.Module, config) -> int:
    """Swap the block linears of a model already on ``config``'s grid (a ``lowbit quantize`` output) for packed
    modules that quantize activations as it was calibrated; returns the layers packed."""
    from lowbit.export.codes import iter_quantized_linears

    act_bits = None if config.act_spec is None else config.abits
    count = 0
    for name, module, codes in iter_quantized_linears(model, config):  # lazily: one layer's codes at a time
        replace_module(model, name, packed_linear(codes, module.bias, act_bits, config.act_symmetric))
        count += 1
    return count


@torch.no_grad()
def to_float_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """The fp16 twin of a quantized model, in place: packed and fake-quant linears become plain ``nn.Linear``
    (weights dequantized, activations no longer quantized). Returns the layers replaced."""
    from lowbit.export.linear import PackedLinear
    from lowbit.quant.fake_quant import QuantLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (PackedLinear, QuantLinear))]
    for name, module in targets:
        weight = module.weight.dequantize(dtype) if isinstance(module, PackedLinear) else module.quantized_weight()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        replace_module(model, name, linear.requires_grad_(False))
    return len(targets)
