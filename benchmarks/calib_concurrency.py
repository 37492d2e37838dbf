"""Does calibrating several configs at once, one thread and one CUDA stream each, raise GPU throughput?

    python benchmarks/calib_concurrency.py --model $LOWBIT_MODEL --threads 1,2,4 --blocks 2 --nsamples 32 --epochs 2

A block of a 135M model is a few hundred small kernels per step, far from filling an H100; streams of one process
can run concurrently where separate processes would only time-slice. Every thread calibrates the same truncated
model with the same recipe, so all results must equal the single-thread one. Writes
benchmarks/results/calib_concurrency.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from concurrent.futures import ThreadPoolExecutor
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
    p.add_argument("--threads", default="1,2,4")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calib_concurrency.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("calib_concurrency.py measures CUDA stream concurrency: it needs a CUDA GPU")

    base = load_model(args.model, device="cpu", dtype="float32")
    del base.adapter.blocks(base.model)[args.blocks:]
    base.model.config.num_hidden_layers = args.blocks
    config = QuantConfig(method=args.method, wbits=4, abits=4, nsamples=args.nsamples, seqlen=args.seqlen,
                         epochs=args.epochs)
    windows = calibration_windows(base.tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
    torch.set_float32_matmul_precision("high")  # set once: calibrate() restores what it found, per thread

    def one_run(_: int) -> list[float]:
        loaded = copy.deepcopy(base)
        with torch.cuda.stream(torch.cuda.Stream()):
            opts = CalibOptions(epochs=args.epochs, device="cuda", progress=False)
            logs = calibrate(loaded, config, plan_for_model(config, loaded.adapter, loaded.model.config), opts, windows)
            torch.cuda.current_stream().synchronize()
        return [e.loss_after for e in logs]

    rows, lines = [], []
    for n in [int(t) for t in args.threads.split(",")]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            losses = list(pool.map(one_run, range(n)))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"threads": n, "seconds": seconds, "runs_per_minute": 60 * n / seconds, "losses": losses})
    for row in rows:
        row["throughput_vs_one"] = row["runs_per_minute"] / rows[0]["runs_per_minute"]
        spread = max(abs(a - b) / b for ls in row["losses"] for a, b in zip(ls, rows[0]["losses"][0]))
        row["max_rel_loss_diff_vs_one"] = spread
        lines.append(f"| {row['threads']} | {row['seconds']:.1f} | {row['throughput_vs_one']:.2f}x | {spread:.2e} |")
    print_markdown(["threads", "wall s", "throughput vs 1", "max rel. loss diff vs 1 thread"], lines)
    write_json([{**r, "device": torch.cuda.get_device_name(), "config": vars(args) | {"out": str(args.out)}}
                for r in rows], args.out)


if __name__ == "__main__":
    main()
