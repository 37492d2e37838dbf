"""Packed checkpoint round trip on a real model: fake-quant vs save_packed -> load_quantized, same perplexity?

    python benchmarks/packed_roundtrip.py --configs W4A16,W4A16g64,W3A16g64,W4A4 --limit 16

For each RTN config: quantize SmolLM2 (float32), score WikiText-2 with the fake-quant model, save it packed
(non-quantized tensors in ``--save-dtype``), load it back with ``lowbit.load_quantized`` and score again; also
the max abs logit difference on the first window and the quantized layers' memory against fp16 (embeddings counted
apart). Writes benchmarks/results/packed_roundtrip.json.
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
import time
from pathlib import Path

import torch

from lowbit import QuantConfig, load_model, quantize
from lowbit.eval import EvalOptions, evaluate
from lowbit.export import load_quantized, save_packed
from lowbit.export.linear import packed_weight_bytes
from lowbit.report import print_markdown, write_json


def parse(name: str) -> QuantConfig:
    m = re.fullmatch(r"W(\d+)A(\d+)(?:g(\d+))?", name)
    if not m:
        raise SystemExit(f"bad config {name!r}; expected e.g. W4A16g64")
    return QuantConfig(method="rtn", wbits=int(m[1]), abits=int(m[2]), group_size=int(m[3]) if m[3] else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--configs", default="W4A16,W4A16g64,W3A16g64,W4A4")
    p.add_argument("--limit", type=int, default=16, help="WikiText-2 test windows of 2048 tokens (None: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "packed_roundtrip.json")
    args = p.parse_args()

    fp = load_model(args.model, device="cpu", dtype="float32")
    options = EvalOptions(seqlen=2048, batch_size=1, limit=args.limit, device=args.device, progress=False)
    first = fp.tokenizer("\n\n".join(["The quick brown fox jumps over the lazy dog."] * 20), return_tensors="pt")
    rows, lines = [], []
    for name in args.configs.split(","):
        config = parse(name)
        loaded = quantize(copy.deepcopy(fp), config)
        fake = evaluate(loaded.model, loaded.tokenizer, ["wikitext2"], options)[0].metrics
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = save_packed(loaded, config, Path(tmp) / "packed", dtype=getattr(torch, args.save_dtype))
            save_s = time.perf_counter() - start
            file_bytes = sum(f.stat().st_size for f in out.iterdir())
            start = time.perf_counter()
            packed = load_quantized(out, device=args.device, dtype="float32")
            load_s = time.perf_counter() - start
            again = evaluate(packed.model, packed.tokenizer, ["wikitext2"], options)[0].metrics
            with torch.no_grad():
                ids = first.input_ids.to(args.device)
                diff = (loaded.model.to(args.device)(ids).logits - packed.model(ids).logits).abs().max().item()
            memory = packed_weight_bytes(packed.model)
        metric = next(k for k in fake if not k.endswith("_stderr"))
        row = {"config": name, "metric": metric, "fake_quant": fake[metric], "packed": again[metric],
               "max_abs_logit_diff": diff, "save_dtype": args.save_dtype, "save_seconds": save_s,
               "load_seconds": load_s, "checkpoint_bytes": file_bytes, "memory": memory.as_dict(),
               "limit": args.limit, "device": args.device}
        rows.append(row)
        lines.append(f"| {name} | {fake[metric]:.4f} | {again[metric]:.4f} | {diff:.2e} | {memory.ratio:.3f} | "
                     f"{file_bytes / 2**20:.1f} |")
        print(lines[-1], flush=True)
    print_markdown(["config (RTN)", f"fake-quant {metric}", "packed", "max |Δlogit|",
                    "quantized linears vs fp16", "checkpoint MiB"], lines)
    write_json(rows, args.out)


if __name__ == "__main__":
    main()
