"""Where the 4-bit training layer spends its time: bf16 ``nn.Linear`` against HQ+LSS, forward + backward.

    python benchmarks/train_profile.py --tokens 8192 --width 4096
    python benchmarks/train_profile.py --lm      # one step of train_kernels.py's 365M LM instead, both paths

One layer (``lowbit.train.QuantTrainLinear``, the default HQ+LSS config) and a bf16 ``nn.Linear`` of the same
shape, each profiled over one forward + backward after warm-up with torch.profiler: kernels by total GPU time,
host ops by self CPU time, and the synchronised wall time; both tables go to --out (JSON). The timed ratios
against bf16 live in ``train_kernels.py``; this script says where the gap is. With ``--lm`` it profiles one
training step of ``train_kernels.py``'s LM (its defaults: 365M, 8192 tokens; a few steps first, so the LSQ steps are
initialised and the allocator warm): the synchronised wall time against the summed kernel time says whether the
step waits on the GPU or on the host launching its kernels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from prefill_profile import kernel_table, print_tables

from lowbit.train import QuantTrainLinear, TrainQuantConfig


def layer_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool):
    """One forward + backward; the 4-bit layer keeps an fp32 master weight under bf16 autocast, as in training."""
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(grad)

    return run


def lm_tables() -> dict:
    """One LM step per path, profiled after warm-up steps (``train_kernels.py``'s model, data and optimiser)."""
    from train_kernels import build_training, parse_args

    from lowbit.train.graphs import GraphedTrainStep, GraphStepConfig
    from lowbit.train.lm import lm_loss, random_windows

    args = parse_args([])
    tables = {}
    for label, quant in (("bf16", False), ("hq_lss4", True)):
        model, opt, sched, train_ids, gen, _ = build_training(args, quant)
        model.train()
        eager = GraphedTrainStep(model, opt, lm_loss, GraphStepConfig(enabled=False))

        def step(eager=eager, sched=sched) -> None:  # bound at definition: the del below unbinds the names
            eager(random_windows(train_ids, args.batch_size, args.seqlen, gen))
            sched.step()

        tables[label] = kernel_table(step, warmup=5)
        del model, opt, sched, step, eager  # each holds the model or its optimiser state: free them before the next path
        torch.cuda.empty_cache()
    return tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--lm", action="store_true", help="profile one step of train_kernels.py's LM instead of one layer")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/train_profile.json, with --lm "
                   "results/train_profile_lm.json)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_profile.py needs a CUDA GPU")
    out = args.out or Path(__file__).parent / "results" / ("train_profile_lm.json" if args.lm else "train_profile.json")
    if args.lm:
        tables = lm_tables()
        print_tables(tables, "one LM training step", args.top)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"lm": "train_kernels.py defaults", "tables": tables}, indent=1))
        return
    torch.manual_seed(args.seed)
    x = torch.randn(args.tokens, args.width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.width, device="cuda", dtype=torch.bfloat16)
    dense = nn.Linear(args.width, args.width, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = QuantTrainLinear(nn.Linear(args.width, args.width, bias=False, device="cuda"), TrainQuantConfig(seed=args.seed))
    tables = {"bf16": kernel_table(layer_step(dense, x, grad, False)),
              "hq_lss4": kernel_table(layer_step(quant, x, grad, True))}
    print_tables(tables, f"forward + backward ({args.tokens} x {args.width} x {args.width})", args.top)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "width": args.width, "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
