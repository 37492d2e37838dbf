"""The calibrating methods as small declarative recipes: which transforms, which clipping, how long.

SmoothQuant: SmoothQuant-initialised diagonal scales, folded, no learning. OmniQuant: learnable weight clipping
plus learnable scales (and shifts where biases absorb them, i.e. OPT; LLaMA has none, as in OmniQuant), scales
only when activations are quantized, as its scripts do. AffineQuant: OmniQuant plus per-head affine matrices on
v→o (optionally full matrices at the norms, kept as online ops) under the gradual mask. GPTQ alone: no
transforms, nothing learnt; its rounding (``gptq_options``) is the whole method. Any weight-only method can end
with GPTQ rounding instead of round-to-nearest (``rounding="gptq"``).
"""

from __future__ import annotations

from dataclasses import replace

from lowbit.config import QuantConfig
from lowbit.ptq.block import TransformPlan
from lowbit.ptq.gptq import GPTQOptions


def plan_for(config: QuantConfig) -> TransformPlan:
    quant_acts = config.abits < 16
    if config.method == "gptq":
        return TransformPlan()
    mlp_scales = default_mlp_scales(config)
    if config.method == "smoothquant":
        return TransformPlan(scales=True, alpha=config.alpha, mlp_scales=mlp_scales)
    init = default_scale_init(config)
    weights = default_weight_lr(config) > 0
    if config.method == "omniquant":  # weight-only: clipping alone, no scales to start anywhere
        return TransformPlan(scales=quant_acts, shifts=quant_acts, lwc=config.wbits < 16, alpha=config.alpha,
                             scale_init=init if quant_acts else "smoothquant",
                             mlp_scales=quant_acts and mlp_scales, weights=weights)
    if config.method == "affinequant":
        sf = config.sf if config.sf is not None else (0.1 if quant_acts else 1e-2)
        return TransformPlan(scales=True, shifts=quant_acts, matrices=True, norm_matrices=default_norm_matrices(config),
                             lwc=config.wbits < 16, alpha=config.alpha, sf=sf, scale_init=init,
                             mlp_scales=mlp_scales, weights=weights)
    raise ValueError(f"{config.method} is not a calibrating method")


def plan_for_model(config: QuantConfig, adapter, model_config) -> TransformPlan:
    """``plan_for``, with the default MLP scales left out on a model where they would not be exact (an OPT whose
    activation is not ReLU); asked for explicitly (``mlp_scales=True``) they are refused there instead."""
    plan = plan_for(config)
    if plan.mlp_scales and config.mlp_scales is None and not all(
            pair.exact_for(model_config) for pair in adapter.pairs if pair.elementwise):
        plan = replace(plan, mlp_scales=False)
    return plan


def default_mlp_scales(config: QuantConfig) -> bool:
    """Diagonal scales on the MLP's inner pair unless ``config.mlp_scales`` says: on for AffineQuant with quantized
    activations (lowbit's recipe; the papers leave down_proj's input untransformed), off elsewhere, so SmoothQuant
    and OmniQuant run as published. Paper recipe on SmolLM2 (H100, BENCHMARKS.md), without -> with: AffineQuant W6A6
    23.36 -> 22.75, W4A4 63.66 -> 56.45; OmniQuant given them too, W6A6 23.63 -> 22.83, W4A4 73.12 -> 59.14."""
    if config.mlp_scales is not None:
        return config.mlp_scales
    # after --rotate inputs a rotation runs on down_proj's input, between the scale and the weight it folds into
    return config.method == "affinequant" and config.abits < 16 and config.rotate != "inputs"


def default_norm_matrices(config: QuantConfig) -> bool:
    """AffineQuant's full matrices at the norms unless ``config.norm_matrices`` says: on after ``--rotate inputs``
    with activation bits, off otherwise. They stay online ops (a norm cannot absorb a full matrix), which costs a
    576 x 576 product per norm and token, unless a rotation already runs there: then they compose into its op and
    cost nothing more. Paper recipe on SmolLM2 (H100, BENCHMARKS.md), W6A6 rotated: without 22.20, with 22.09."""
    if config.norm_matrices is not None:
        return config.norm_matrices
    return config.method == "affinequant" and config.abits < 16 and config.rotate == "inputs"


def _affine_weight_only(config: QuantConfig) -> bool:
    """The one recipe that departs from the papers (OmniQuant learns no transforms without activation bits)."""
    return config.method == "affinequant" and config.abits >= 16


def default_scale_init(config: QuantConfig) -> str:
    """Where the learnt scales start unless ``config.scale_init`` says: SmoothQuant's, as the papers do, except for
    AffineQuant weight-only, where they start at the identity (see ``default_let_lr``)."""
    if config.scale_init is not None:
        return config.scale_init
    return "identity" if _affine_weight_only(config) else "smoothquant"


def default_let_lr(config: QuantConfig) -> float:
    """The transforms' learning rate unless ``config.let_lr`` says: the papers' 5e-3, except 1e-3 for AffineQuant
    weight-only. There SmoothQuant's scales, made for quantized activations, can only move activation outliers into
    the weights, and 5e-3 is a noisy step. On SmolLM2 (paper recipe, H100, BENCHMARKS.md), from SmoothQuant's start
    at 5e-3 against from the identity at 1e-3: W2A16 g64 112.1 (worse than OmniQuant's 104.6) against 99.4, W4A16
    per channel 27.01 against 26.53, W3A16 g64 31.37 against 31.47 (the one config where it lost, by 0.3%)."""
    if config.let_lr is not None:
        return config.let_lr
    return 1e-3 if _affine_weight_only(config) else 5e-3


def default_weight_lr(config: QuantConfig) -> float:
    """The learning rate of the block's own weights (Block-AP) unless ``config.weight_lr`` says: 3e-5 for AffineQuant
    weight-only, 0 (weights as loaded, as the papers keep them) elsewhere. Paper recipe on SmolLM2 (H100,
    BENCHMARKS.md), AffineQuant without -> with: W4A16 per channel 26.53 -> 23.72, W3A16 g64 31.47 -> 26.50; at
    W4A16 1e-4 read 23.84. With activation bits it is not measured, so it stays off there."""
    if config.weight_lr is not None:
        return config.weight_lr
    return 3e-5 if _affine_weight_only(config) and config.wbits < 16 else 0.0


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
