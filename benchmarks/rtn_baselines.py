"""Reproduce the FP16 and RTN rows of the reference baselines (WikiText-2 test, 2048-token windows).

    python benchmarks/rtn_baselines.py --device cuda                # full test set, on the GPU
    python benchmarks/rtn_baselines.py --device cpu --limit 4 --configs W4A16g64   # quick look on a CPU

Writes benchmarks/results/rtn_baselines.json (one object per number) and prints a markdown table with the
reference value and the relative difference for each configuration.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

from lowbit import QuantConfig, load_model, quantize
from lowbit.eval import EvalOptions
from lowbit.report import eval_and_record, print_markdown, write_json

# Reference perplexities measured with the official AffineQuant code on the same model (baselines.md).
REFERENCE = {
    "FP16": 21.611, "W8A8": 21.910, "W6A6": 27.428, "W4A8": 39.473, "W4A16": 38.831, "W4A16g64": 28.638,
    "W3A16": 674.3, "W3A16g64": 77.285, "W2A16g64": 7.7e5, "W4A4": 1613.6,
}


def parse_config(name: str) -> QuantConfig | None:
    if name == "FP16":
        return None
    m = re.fullmatch(r"W(\d+)A(\d+)(?:g(\d+))?", name)
    if not m:
        raise SystemExit(f"bad config name {name!r}; expected e.g. W4A16g64")
    wbits, abits, group = int(m[1]), int(m[2]), m[3] and int(m[3])
    return QuantConfig(method="rtn", wbits=wbits, abits=abits, group_size=group or None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--configs", default=",".join(REFERENCE))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rtn_baselines.json")
    args = p.parse_args()

    fp = load_model(args.model, dtype=args.dtype, device=args.device)
    options = EvalOptions(seqlen=2048, batch_size=args.batch_size, limit=args.limit, device=args.device, progress=False)
    rows, table = [], []
    for name in args.configs.split(","):
        config = parse_config(name)
        loaded = copy.deepcopy(fp) if config else fp
        start = time.perf_counter()
        if config:
            quantize(loaded, config)
        new = eval_and_record(loaded, ["wikitext2"], options, name, config)
        seconds = time.perf_counter() - start
        ref = REFERENCE.get(name)
        for row in new:
            row["reference"] = ref
            row["relative_diff"] = None if ref is None else row["value"] / ref - 1
            row["seconds"] = round(seconds, 2)
        rows += new
        value = new[0]["value"]
        diff = "" if ref is None else f"{100 * (value / ref - 1):+.2f}%"
        table.append(f"| {name} | {ref} | {value:.4g} | {diff} |")
        print(table[-1], f"({seconds:.1f} s)", flush=True)
        del loaded
    print_markdown(["config", "reference", "lowbit", "diff"], table)
    write_json(rows, args.out)


if __name__ == "__main__":
    sys.exit(main())
