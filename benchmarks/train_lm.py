"""LLaMA-style byte-level LM (~26 M parameters) trained from scratch: full precision vs HQ+LSS 4-bit, same seed,
same data windows, same steps. Both training-loss curves go into one PNG, the final held-out perplexity into JSON.

    PYTHONPATH=$PWD/src python benchmarks/train_lm.py --device cuda      # about 4 minutes on an H100 (estimate)
    PYTHONPATH=$PWD/src python benchmarks/train_lm.py --device cpu --steps 3 --hidden 64 --layers 1 --heads 2 \\
        --intermediate 128 --seqlen 32 --batch-size 2 --out /tmp/lm.json          # smoke run

Data: the shipped non-test texts (WikiText-2 validation, LAMBADA development novels, PTB validation) as UTF-8 bytes;
the first 90% of each trains, the last 10% of each is held out. Validation perplexity is per byte,
exp(mean next-byte loss) over every non-overlapping held-out window. Test splits are never read.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.report import print_markdown, write_json
from lowbit.train.cli import config_dict, device_of
from lowbit.train.config import PRESETS, preset
from lowbit.train.convert import convert
from lowbit.train.lm import LMRecipe, LMShape, build_lm, byte_splits, eval_lm_all, train_lm
from lowbit.train.plot import line_plot

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="bytes per window (default 256)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408, help="MLP width (a multiple of the Hadamard block 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (10%% warmup, cosine)")
    p.add_argument("--lsq-lr", type=float, default=None, help="LSQ step learning rate (default 0.1 x --lr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quants", default="none,hq-lss4", help="presets to compare (default none,hq-lss4)")
    p.add_argument("--data", default="wikitext2,lambada,ptb", help="comma-separated non-test texts")
    p.add_argument("--out", type=Path, default=RESULTS / "train_lm.json", help="JSON; the PNG goes beside it")
    p.add_argument("--val-windows", type=int, default=None, help="evaluate only the first N held-out windows (smoke runs)")
    p.add_argument("--no-tf32", action="store_true",
                   help="keep full-fp32 matmuls on CUDA (TF32 is on by default: exact for the integer operands, "
                        "which are at most 8-bit, and the usual setting for float training)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    quants = [q for q in args.quants.split(",") if q]
    if not quants or any(q not in PRESETS for q in quants):
        raise LowbitError(f"--quants must list presets from {', '.join(PRESETS)}, got {args.quants!r}")
    for name in ("steps", "batch_size", "seqlen", "layers", "heads"):
        if getattr(args, name) < 1:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        raise LowbitError(f"--hidden {args.hidden} / --heads {args.heads} must be an even integer (rotary)")
    if args.val_windows is not None and args.val_windows < 1:
        raise LowbitError("--val-windows must be at least 1")
    device = device_of(args.device)
    torch.backends.cuda.matmul.allow_tf32 = device.startswith("cuda") and not args.no_tf32
    shape = LMShape(args.hidden, args.layers, args.heads, args.intermediate, args.seqlen)
    train_ids, eval_ids = byte_splits([s for s in args.data.split(",") if s], args.seqlen)
    train_ids, eval_ids = train_ids.to(device), eval_ids.to(device)
    recipe = LMRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lsq_lr=args.lsq_lr, seed=args.seed)
    rows, curves, table = [], {}, []
    for quant in quants:
        model = build_lm(shape, args.seed, device)  # same seed: identical initial weights for every variant
        params = sum(p.numel() for p in model.parameters())
        qconfig = preset(quant, seed=args.seed)
        if qconfig is not None:
            convert(model, qconfig)
        start = time.perf_counter()
        history = train_lm(model, train_ids, args.seqlen, recipe, desc=f"train {quant}", progress=not args.quiet)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        val_ids = eval_ids if args.val_windows is None else eval_ids[: args.val_windows * args.seqlen]
        loss, windows = eval_lm_all(model, val_ids, args.seqlen, max(args.batch_size, 32))
        row = {"name": f"train_lm {quant}", "quant": quant, "metric": "val_perplexity_per_byte",
               "value": math.exp(loss), "val_loss": loss, "bits_per_byte": loss / math.log(2),
               "val_windows": windows, "final_train_loss": history[-1]["loss"], "train_s": round(train_s, 1),
               "ms_per_step": round(1000 * train_s / args.steps, 1), "parameters": params,
               "shape": vars(shape) | {"mlp_width": shape.mlp_width}, "recipe": vars(recipe),
               "quant_config": config_dict(qconfig), "data": args.data, "train_bytes": int(train_ids.numel()),
               "val_bytes": int(eval_ids.numel()), "tokens_per_step": args.batch_size * args.seqlen,
               "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "tf32": torch.backends.cuda.matmul.allow_tf32, "history": history}
        rows.append(row)
        curves[quant] = [(h["step"], h["loss"]) for h in history]
        table.append(f"| {quant} | {params / 1e6:.1f} M | {args.steps} x {args.batch_size} x {args.seqlen} | "
                     f"{history[-1]['loss']:.4f} | {loss:.4f} | {math.exp(loss):.4f} | {train_s:.0f} |")
        print(f"{quant}: val loss {loss:.4f} (perplexity per byte {math.exp(loss):.4f}) in {train_s:.0f} s", flush=True)
        del model
    write_json(rows, args.out)
    ranges = line_plot(curves, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')} (training loss per step; colours {ranges['colors']})")
    print_markdown(["variant", "params", "steps x batch x bytes", "final train loss", "val loss (nats/byte)",
                    "val perplexity (per byte)", "train s"], table)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LowbitError as err:
        raise SystemExit(f"train_lm: error: {err}") from None
