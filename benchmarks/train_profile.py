"""Where the 4-bit training layer spends its time: bf16 ``nn.Linear`` against HQ+LSS, forward + backward.

    python benchmarks/train_profile.py --tokens 8192 --width 4096

One layer (``lowbit.train.QuantTrainLinear``, the default HQ+LSS config) and a bf16 ``nn.Linear`` of the same
shape, each profiled over one forward + backward after warm-up with torch.profiler: kernels by total GPU time,
host ops by self CPU time, and the synchronised wall time; both tables go to --out (JSON). The timed ratios
against bf16 live in ``train_kernels.py``; this script says where the gap is.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_profile.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_profile.py needs a CUDA GPU")
    torch.manual_seed(args.seed)
    x = torch.randn(args.tokens, args.width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(args.tokens, args.width, device="cuda", dtype=torch.bfloat16)
    dense = nn.Linear(args.width, args.width, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = QuantTrainLinear(nn.Linear(args.width, args.width, bias=False, device="cuda"), TrainQuantConfig(seed=args.seed))
    tables = {"bf16": kernel_table(layer_step(dense, x, grad, False)),
              "hq_lss4": kernel_table(layer_step(quant, x, grad, True))}
    print_tables(tables, f"forward + backward ({args.tokens} x {args.width} x {args.width})", args.top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "width": args.width, "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
