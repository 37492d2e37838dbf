"""WikiText-2 perplexity of PTQ methods on one model, with calibration time per block and peak GPU memory.

    python benchmarks/ptq_table.py --model $LOWBIT_MODEL --device cuda \
        --runs rtn:W4A4,omniquant:W4A4,affinequant:W4A4 --nsamples 128 --epochs 20

Each run starts from a fresh copy of the full-precision model. Writes benchmarks/results/ptq_table.json and
prints a markdown table. Calibration text: WikiText-2 *validation* (never the test split that is scored).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch

from lowbit import QuantConfig, load_model, quantize
from lowbit.eval import EvalOptions
from lowbit.report import eval_and_record, print_markdown, write_json


def parse_run(text: str, args) -> QuantConfig:
    method, _, name = text.partition(":")
    m = re.fullmatch(r"W(\d+)A(\d+)(?:g(\d+))?", name)
    if not m:
        raise SystemExit(f"bad run {text!r}; expected METHOD:W4A16g64")
    return QuantConfig(method=method, wbits=int(m[1]), abits=int(m[2]), group_size=int(m[3]) if m[3] else None,
                       nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", required=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="per-block checkpoints (one subfolder per run): a killed run resumes where it stopped")
    p.add_argument("--dtype", default="float32", help="model dtype for calibration and evaluation (default float32)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ptq_table.json")
    args = p.parse_args()

    fp = load_model(args.model, device="cpu", dtype=args.dtype)
    options = EvalOptions(seqlen=2048, batch_size=8, limit=args.limit, device=args.device, progress=False)
    rows, lines = [], []
    for run in args.runs.split(","):
        config = parse_run(run, args)
        loaded = copy.deepcopy(fp)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ckpt = None if args.checkpoint_dir is None else args.checkpoint_dir / f"{config.method}-{config.name}"
        quantize(loaded, config, device=args.device, checkpoint_dir=ckpt, progress=False)
        wall = time.perf_counter() - start
        log = loaded.calibration_log or []
        seconds = sum(e.seconds for e in log) if log else wall  # blocks restored from checkpoints keep their time
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        loaded.model.to(args.device)
        new = eval_and_record(loaded, ["wikitext2"], options, f"{config.method} {config.name}", config)
        blocks = len(loaded.adapter.blocks(loaded.model))
        for row in new:
            row.update(calib_seconds=round(seconds, 1), wall_seconds_this_process=round(wall, 1), seconds_per_block=round(seconds / blocks, 2),
                       peak_gpu_gib=None if peak is None else round(peak, 2),
                       recipe={"nsamples": config.nsamples, "seqlen": config.seqlen, "epochs": args.epochs,
                               "batch_size": config.batch_size})
        rows += new
        lines.append(f"| {config.method} | {config.name} | {new[0]['value']:.3f} | {seconds / blocks:.2f} | "
                     f"{'-' if peak is None else f'{peak:.2f}'} |")
        print(lines[-1], flush=True)
        loaded.model.to("cpu")
        del loaded
    print_markdown(["method", "config", "wikitext2 ppl", "s/block", "peak GPU GiB"], lines)
    write_json(rows, args.out)


if __name__ == "__main__":
    sys.exit(main())
