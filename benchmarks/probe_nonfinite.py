"""Diagnose a calibrated model that evaluates to NaN: find the first module whose output is non-finite in
float16, and compare WikiText-2 perplexity in float16 and float32 on the same quantized weights.

    python benchmarks/probe_nonfinite.py --model $LOWBIT_MODEL --device cuda --method omniquant --config W4A4
"""

from __future__ import annotations

import argparse
import copy

import torch

from lowbit import QuantConfig, load_model, quantize
from lowbit.data import eval_text, tokenize_text
from lowbit.eval.perplexity import perplexity


def first_nonfinite(model, ids) -> str | None:
    found: list[str] = []

    def hook(name):
        def check(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                found.append(f"{name} (max |input| {args[0].float().abs().max().item():.3g})" if args else name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return found[0] if found else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--method", default="omniquant")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float16")
    config = QuantConfig(method=args.method, wbits=args.wbits, abits=args.abits, nsamples=args.nsamples, epochs=args.epochs)
    quantize(loaded, config, device=args.device, progress=False)
    ids = tokenize_text(loaded.tokenizer, eval_text("wikitext2"))
    for dtype in (torch.float16, torch.float32):
        model = copy.deepcopy(loaded.model).to(args.device, dtype)
        window = ids[:2048].unsqueeze(0).to(args.device)
        print(f"{dtype}: first non-finite module: {first_nonfinite(model, window)}")
        ppl = perplexity(model, ids, batch_size=8, limit=args.limit, progress=False).perplexity
        print(f"{dtype}: {config.method} {config.name} wikitext2 perplexity {ppl:.3f}", flush=True)
        del model


if __name__ == "__main__":
    main()
