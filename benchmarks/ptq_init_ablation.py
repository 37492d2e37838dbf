"""Which part of AffineQuant costs it at 2 bits? Block losses of the first blocks under each variant, on the CPU.

    python benchmarks/ptq_init_ablation.py --wbits 2 --blocks 2 --nsamples 32 --seqlen 512 --epochs 16 --jobs 2

At W2A16 g64 (paper recipe, H100) AffineQuant from SmoothQuant's scales ended worse than OmniQuant's clipping
alone (112.1 against 104.6 perplexity), its block loss behind from block 0 on. The variants separate the pieces:
clipping alone (OmniQuant weight-only), clipping + learnt scales, AffineQuant (scales + v→o matrices), each
from SmoothQuant's scales or from the identity, at the papers' transform learning rate or a smaller one. The
first ``--blocks`` blocks of the model are calibrated on WikiText-2 validation windows (never the test split);
each variant runs in its own process (one thread each, ``--jobs`` at once). Each block's error is also measured
on held-out text (``--heldout``). Writes benchmarks/results/ptq_init_ablation_w{BITS}[a{ABITS}][_rotate_...].json.

``--recipes`` compares the methods as ``quantize()`` runs them (OmniQuant, AffineQuant without and with norm
matrices) for ``--wbits/--abits`` after an optional ``--rotate``, e.g. why AffineQuant lost to OmniQuant at W6A6
after ``--rotate inputs``:

    python benchmarks/ptq_init_ablation.py --recipes --wbits 6 --abits 6 --group-size 0 --rotate inputs \
        --blocks 2 --nsamples 32 --seqlen 512 --epochs 8 --jobs 1
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from lowbit.config import ROTATIONS, QuantConfig
from lowbit.data.texts import calibration_windows
from lowbit.models.loading import load_model
from lowbit.ptq.block import TransformPlan
from lowbit.ptq.engine import CalibOptions, calibrate
from lowbit.ptq.recipes import default_let_lr, plan_for
from lowbit.transforms.rotation import rotate
from lowbit.report import print_markdown, write_json


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    scales: bool = False
    matrices: bool = False
    scale_init: str = "smoothquant"
    let_lr: float = 5e-3
    weight_lr: float = 0.0  # > 0: the weights learn too (Block-AP)
    # None: the plan above; a dict: the method's real recipe (lowbit.ptq.recipes) for a config with these fields,
    # the command's --abits and --rotate (the fields above are then not used)
    recipe: dict | None = None


VARIANTS = (
    Variant("clipping only (OmniQuant weight-only)", "omniquant", False, False, "smoothquant", 5e-3),
    Variant("clipping + scales, SmoothQuant start", "omniquant", True, False, "smoothquant", 5e-3),
    Variant("clipping + scales, identity start", "omniquant", True, False, "identity", 5e-3),
    Variant("AffineQuant, SmoothQuant start, lr 5e-3 (papers)", "affinequant", True, True, "smoothquant", 5e-3),
    Variant("AffineQuant, SmoothQuant start, lr 1e-3", "affinequant", True, True, "smoothquant", 1e-3),
    Variant("AffineQuant, identity start, lr 5e-3", "affinequant", True, True, "identity", 5e-3),
    Variant("AffineQuant, identity start, lr 1e-3 (weight-only default)", "affinequant", True, True, "identity", 1e-3),
    Variant("clipping + weights 1e-5 (Block-AP)", "omniquant", False, False, "smoothquant", 5e-3, 1e-5),
    Variant("AffineQuant weight-only default + weights 1e-5", "affinequant", True, True, "identity", 1e-3, 1e-5),
    Variant("AffineQuant weight-only default + weights 3e-5", "affinequant", True, True, "identity", 1e-3, 3e-5),
    Variant("AffineQuant weight-only default + weights 1e-4", "affinequant", True, True, "identity", 1e-3, 1e-4),
    Variant("AffineQuant weight-only default + weights 3e-4", "affinequant", True, True, "identity", 1e-3, 3e-4),
)


# --recipes: the methods as they really run, e.g. why AffineQuant lost to OmniQuant at W6A6 after --rotate inputs
RECIPE_VARIANTS = (
    Variant("OmniQuant (recipe)", "omniquant", recipe={}),
    Variant("AffineQuant without norm matrices (recipe)", "affinequant", recipe={"norm_matrices": False}),
    Variant("AffineQuant with norm matrices (recipe)", "affinequant", recipe={"norm_matrices": True}),
)


@torch.no_grad()
def block_outputs(model, adapter, windows: torch.Tensor) -> list[torch.Tensor]:
    """Every (kept) block's output on ``windows``, each block reading the previous one's output."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: outs.append((out[0] if isinstance(out, tuple) else out).float()))
               for b in adapter.blocks(model)]
    model.model(windows)  # the decoder body: the blocks' outputs are all we need, not 49k-wide logits
    for h in handles:
        h.remove()
    return outs


def run_variant(variant: Variant, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    loaded = load_model(args.model, dtype=torch.float32)
    layers = loaded.adapter.blocks(loaded.model)
    del layers[args.blocks:]  # the first blocks only: their inputs are the model's own
    windows = calibration_windows(loaded.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    # what is learnt and how comes from the plan and the options; the config gives the grid
    config = QuantConfig(method=variant.method, wbits=args.wbits, abits=args.abits, group_size=args.group_size or None,
                         rotate=args.rotate, **(variant.recipe or {}))
    if variant.recipe is None:
        plan = TransformPlan(lwc=True, scales=variant.scales, matrices=variant.matrices, sf=1e-2,
                             scale_init=variant.scale_init, weights=variant.weight_lr > 0)
        let_lr = variant.let_lr
    else:
        plan, let_lr = plan_for(config), default_let_lr(config)
    if args.rotate:
        rotate(loaded.model, loaded.adapter, args.rotate, seed=0)  # as quantize() does, before calibrating
    opts = CalibOptions(epochs=args.epochs, let_lr=let_lr, weight_lr=variant.weight_lr, device="cpu",
                        progress=False, tf32=None)
    # held-out: windows of another non-test text (LAMBADA's development text), so a variant that fits the
    # calibration windows without generalising shows here and not in the calibration loss
    heldout = calibration_windows(loaded.tokenizer, "lambada", nsamples=args.heldout, seqlen=args.seqlen, seed=0) \
        if args.heldout else None
    fp_outs = block_outputs(loaded.model, loaded.adapter, heldout) if args.heldout else []
    start = time.perf_counter()
    logs = calibrate(loaded, config, plan, opts, windows)
    seconds = round(time.perf_counter() - start, 1)
    q_outs = block_outputs(loaded.model, loaded.adapter, heldout) if args.heldout else []
    heldout_mse = [float(torch.nn.functional.mse_loss(q, f)) for q, f in zip(q_outs, fp_outs)]
    return {"variant": variant.name, "method": variant.method, "scales": plan.scales, "matrices": plan.matrices,
            "scale_init": plan.scale_init, "let_lr": let_lr, "weight_lr": variant.weight_lr, "config": config.name,
            "rotate": args.rotate, "plan": plan.to_dict(),
            "seconds": seconds,
            "blocks": [{"block": e.block, "loss_before": e.loss_before, "loss_after": e.loss_after,
                        "heldout_loss": heldout_mse[e.block] if heldout_mse else None,
                        "repaired_rows": e.repaired_rows, "epoch_losses": e.epoch_losses} for e in logs]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M)")
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64, help="weight group size; 0: one scale per output channel")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=16, help="epochs per block, --recipes runs too (not the recipes' own)")
    p.add_argument("--jobs", type=int, default=2, help="variants calibrated at once, one process each")
    p.add_argument("--only", default=None, help="comma-separated indices into the variant list (default: all)")
    p.add_argument("--abits", type=int, default=16, help="activation bits (16: float)")
    p.add_argument("--rotate", default=None, choices=ROTATIONS, help="rotate before calibrating (lowbit.transforms.rotation)")
    p.add_argument("--recipes", action="store_true",
                   help="compare the methods' real recipes (OmniQuant, AffineQuant without and with norm matrices) "
                        "instead of the weight-only variants")
    p.add_argument("--heldout", type=int, default=8,
                   help="windows of LAMBADA's development text on which each block's output error is also measured "
                        "(the quantized model's blocks reading their own outputs, as at inference); 0: none")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pool_of = RECIPE_VARIANTS if args.recipes else VARIANTS
    chosen = pool_of if args.only is None else [pool_of[int(i)] for i in args.only.split(",")]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_variant, chosen, [args] * len(chosen)))
    recipe = {k: getattr(args, k) for k in ("wbits", "abits", "rotate", "group_size", "blocks", "nsamples", "seqlen", "epochs")}
    for row in rows:
        row["recipe"] = recipe
    name = f"w{args.wbits}" + (f"a{args.abits}" if args.abits < 16 else "") + (f"_rotate_{args.rotate}" if args.rotate else "")
    write_json(rows, args.out or f"benchmarks/results/ptq_init_ablation_{name}{'_recipes' if args.recipes else ''}.json")
    heads = [f"block {b} loss" for b in range(args.blocks)]
    heads += [f"block {b} held-out" for b in range(args.blocks)] if args.heldout else []
    print_markdown(["variant", *heads],
                   [f"| {r['variant']} | " + " | ".join(f"{e['loss_after']:.4f}" for e in r["blocks"])
                    + "".join(f" | {e['heldout_loss']:.4f}" for e in r["blocks"] if e["heldout_loss"] is not None) + " |"
                    for r in rows])


if __name__ == "__main__":
    main()
