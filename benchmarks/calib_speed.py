"""Calibration step time, eager vs CUDA graph (float32 and TF32 matmuls), on the first blocks of a model (same data, same run).

    python benchmarks/calib_speed.py --model $LOWBIT_MODEL --blocks 2 --nsamples 32 --epochs 2

Times whole blocks (capture, warm-up and epoch syncs included) and divides by the optimisation steps.
Writes benchmarks/results/calib_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from lowbit import QuantConfig, load_model
from lowbit.data.texts import calibration_windows
from lowbit.ptq.engine import CalibOptions, calibrate
from lowbit.ptq.recipes import plan_for_model
from lowbit.report import print_markdown, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--method", default="affinequant")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calib_speed.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("calib_speed.py compares CUDA graph and eager steps: it needs a CUDA GPU")

    base = load_model(args.model, device="cpu", dtype="float32")
    layers = base.adapter.blocks(base.model)
    del layers[args.blocks:]
    base.model.config.num_hidden_layers = args.blocks
    config = QuantConfig(method=args.method, wbits=4, abits=4, nsamples=args.nsamples, seqlen=args.seqlen,
                         epochs=args.epochs, batch_size=args.batch_size)
    windows = calibration_windows(base.tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
    steps = args.blocks * args.epochs * -(-args.nsamples // args.batch_size)
    rows, lines = [], []
    for graph, tf32 in ((False, False), (True, False), (True, True)):
        loaded = copy.deepcopy(base)
        opts = CalibOptions(epochs=args.epochs, batch_size=args.batch_size, device="cuda", cuda_graph=graph,
                            tf32=tf32, progress=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        logs = calibrate(loaded, config, plan_for_model(config, loaded.adapter, loaded.model.config), opts, windows)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"cuda_graph": graph, "tf32": tf32, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps,
                     "loss_after": [e.loss_after for e in logs], "device": torch.cuda.get_device_name()})
    for row in rows:
        row["speedup_vs_eager"] = rows[0]["seconds"] / row["seconds"]
        lines.append(f"| {'CUDA graph' if row['cuda_graph'] else 'eager'} | {'TF32' if row['tf32'] else 'FP32'} | "
                     f"{row['ms_per_step']:.2f} | {row['speedup_vs_eager']:.2f}x | "
                     f"{', '.join(f'{x:.4g}' for x in row['loss_after'])} |")
    print_markdown(["step", "matmuls", "ms/step (all block work / steps)", "speed-up", "block losses after"], lines)
    write_json([{**r, "config": vars(args) | {"out": str(args.out)}} for r in rows], args.out)


if __name__ == "__main__":
    main()
