"""Quick CPU look at calibrating methods: WikiText-2 perplexity on the first windows plus per-block losses.

    python benchmarks/ptq_cpu_probe.py --runs omniquant:W4A4,affinequant:W4A4 --nsamples 8 --seqlen 512 --epochs 8

For diagnosing calibration on a small recipe without a GPU (float32, CPU); not the reported table.
"""

from __future__ import annotations

import argparse
import copy
import time

from lowbit import QuantConfig, load_model, quantize
from lowbit.eval import EvalOptions, evaluate
from ptq_table import parse_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--runs", required=True)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=2, help="evaluation windows of 2048 tokens (default 2)")
    args = p.parse_args()
    fp = load_model(args.model, device="cpu", dtype="float32")
    options = EvalOptions(seqlen=2048, batch_size=1, limit=args.limit, device="cpu", progress=False)
    for run in args.runs.split(","):
        config: QuantConfig = parse_run(run, args)
        loaded = copy.deepcopy(fp)
        start = time.perf_counter()
        quantize(loaded, config, device="cpu", progress=False)
        ppl = evaluate(loaded.model, loaded.tokenizer, ["wikitext2"], options)[0].metrics["perplexity"]
        print(f"{run}: wikitext2 ppl (first {args.limit} windows) {ppl:.2f}, calibration {time.perf_counter() - start:.0f} s")
        for e in loaded.calibration_log or []:
            print(f"  block {e.block:2d}: loss {e.loss_before:.4g} -> {e.loss_after:.4g}, epochs "
                  f"{[round(x, 4) for x in e.epoch_losses]}")


if __name__ == "__main__":
    main()
