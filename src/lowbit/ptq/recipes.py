"""The calibrating methods as small declarative recipes: which transforms, which clipping, how long.

SmoothQuant: SmoothQuant-initialised diagonal scales, folded, no learning. OmniQuant: learnable weight clipping
plus learnable scales (and shifts where biases absorb them, i.e. OPT; LLaMA has none, as in OmniQuant), scales
only when activations are quantized, as its scripts do. AffineQuant: OmniQuant plus per-head affine matrices on
v→o (optionally full matrices at the norms, kept as online ops) under the gradual mask. GPTQ alone: no
transforms, nothing learnt; its rounding (``gptq_options``) is the whole method. Any weight-only method can end
with GPTQ rounding instead of round-to-nearest (``rounding="gptq"``).
"""

from __future__ import annotations

from lowbit.config import QuantConfig
from lowbit.ptq.block import TransformPlan
from lowbit.ptq.gptq import GPTQOptions


def plan_for(config: QuantConfig) -> TransformPlan:
    quant_acts = config.abits < 16
    if config.method == "gptq":
        return TransformPlan()
    if config.method == "smoothquant":
        return TransformPlan(scales=True, alpha=config.alpha)
    init = default_scale_init(config)
    if config.method == "omniquant":
        return TransformPlan(scales=quant_acts, shifts=quant_acts, lwc=config.wbits < 16, alpha=config.alpha,
                             scale_init=init)
    if config.method == "affinequant":
        sf = config.sf if config.sf is not None else (0.1 if quant_acts else 1e-2)
        return TransformPlan(scales=True, shifts=quant_acts, matrices=True, norm_matrices=config.norm_matrices,
                             lwc=config.wbits < 16, alpha=config.alpha, sf=sf, scale_init=init)
    raise ValueError(f"{config.method} is not a calibrating method")


def default_scale_init(config: QuantConfig) -> str:
    """Where the learnt scales start: SmoothQuant's, as the papers do, unless ``config.scale_init`` says."""
    return config.scale_init or "smoothquant"


def default_epochs(config: QuantConfig) -> int:
    """The papers' recipe: 20 epochs, 40 at 2 bits; SmoothQuant learns nothing, whatever ``epochs`` says
    (otherwise it would quietly become learnt scales without clipping, which is not SmoothQuant); nor does GPTQ."""
    if config.method in ("smoothquant", "gptq"):
        return 0
    if config.epochs is not None:
        return config.epochs
    return 40 if config.wbits <= 2 else 20


def gptq_options(config: QuantConfig) -> GPTQOptions | None:
    """GPTQ's settings when it does the final rounding, else None (round-to-nearest)."""
    if config.rounding_method != "gptq":
        return None
    return GPTQOptions(damp=config.gptq_damp, block_size=config.gptq_block_size, act_order=config.gptq_act_order,
                       grid=config.gptq_grid)
