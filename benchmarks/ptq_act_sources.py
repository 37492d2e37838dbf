"""Where W6A6 loses perplexity on SmolLM2, and what the MLP inner-pair scales give plain SmoothQuant (CPU).

    python benchmarks/ptq_act_sources.py            # 2-core CPU: about 12 minutes

1. RTN W6A6 with the activation quantization of one linear kind turned off at a time (q/k/v, o_proj, gate/up,
   down_proj; then all, i.e. weight-only W6): how much of the gap to FP each kind's inputs cause.
2. Plain SmoothQuant W6A6 (α 0.5 and 0.8, calibrated on --nsamples x --seqlen WikiText-2 validation windows,
   nothing learnt) without and with ``mlp_scales`` (diagonal scales on up_proj → down_proj, which the papers leave
   without any transform).
WikiText-2 test, the baselines.md protocol on the first --limit windows of 2048 tokens, float32. JSON to
benchmarks/results/ptq_act_sources.json (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from lowbit.config import QuantConfig
from lowbit.data.texts import eval_text, tokenize_text
from lowbit.eval.perplexity import perplexity
from lowbit.models.loading import load_model
from lowbit.ptq import quantize
from lowbit.report import write_json

KINDS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down_proj": ("down_proj",)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ptq_act_sources.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    fp = load_model(args.model, dtype="float32", device="cpu")
    ids = tokenize_text(fp.tokenizer, eval_text("wikitext2"))
    rows = []

    def record(label: str, model, start: float) -> None:
        ppl = perplexity(model, ids, limit=args.limit, progress=False).perplexity
        rows.append({"run": label, "perplexity": ppl, "seconds": round(time.time() - start, 1)})
        print(f"{label:45s} {ppl:8.3f}", flush=True)
        write_json(rows, args.out)

    record("FP", fp.model, time.time())
    for label, names in [("RTN W6A6", ())] + [(f"RTN W6A6, {k} inputs in float", v) for k, v in KINDS.items()] + [
            ("RTN W6A16 (every input in float)", sum(KINDS.values(), ()))]:
        start, loaded = time.time(), copy.deepcopy(fp)
        quantize(loaded, QuantConfig(method="rtn", wbits=6, abits=6))
        for block in loaded.adapter.blocks(loaded.model):
            for name in loaded.adapter.linears:
                if name.rpartition(".")[2] in names:
                    block.get_submodule(name).act_spec = None
        record(label, loaded.model, start)
    for mlp_scales in (False, True):
        for alpha in (0.5, 0.8):
            start, loaded = time.time(), copy.deepcopy(fp)
            config = QuantConfig(method="smoothquant", wbits=6, abits=6, alpha=alpha, mlp_scales=mlp_scales,
                                 nsamples=args.nsamples, seqlen=args.seqlen)
            quantize(loaded, config, progress=False)
            record(f"SmoothQuant W6A6 alpha {alpha}, mlp_scales={mlp_scales}", loaded.model, start)


if __name__ == "__main__":
    main()
