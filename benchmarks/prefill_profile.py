"""Where batch-1 prefill spends its GPU time, fp16 against packed W4A16 (torch.profiler, kernel table).

    python benchmarks/prefill_profile.py --layers 4 --prompt-len 512

Builds the random-weight LLaMA-7B-shaped model of ``inference_e2e.py`` with a few blocks, profiles one prefill
(after warm-up) in fp16, packs it to W4A16 g128 in place and profiles again; prints the kernels by total GPU time
and writes both tables to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lowbit.bench import pack_rtn, random_llama


def kernel_table(run, warmup: int = 3) -> dict:
    """GPU kernels by total time, host ops by self CPU time, and the wall time of one synchronised ``run()``."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - begin) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    gpu, cpu = [], []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        # kernels only: a host op's device time is the sum of its kernels' (an autograd Function such as
        # _QuantLinearFnBackward would count them twice); older torch without device_type: by name
        kind = getattr(e, "device_type", None)
        kernel = kind == DeviceType.CUDA if kind is not None else e.key.startswith(
            ("void", "nvjet", "_", "cudnn", "triton", "sm90", "cutlass"))
        if us > 0 and kernel and "#" not in e.key:  # "Optimizer.step#AdamW.step": an annotation range, not a kernel
            gpu.append({"name": e.key[:90], "calls": e.count, "total_us": us})
        if e.self_cpu_time_total > 0:
            cpu.append({"name": e.key[:90], "calls": e.count, "total_us": e.self_cpu_time_total})
    gpu.sort(key=lambda r: -r["total_us"])
    cpu.sort(key=lambda r: -r["total_us"])
    return {"wall_ms": wall_ms, "gpu": gpu, "cpu": cpu}


def print_tables(tables: dict, what: str, top: int) -> None:
    for label, table in tables.items():
        total = sum(r["total_us"] for r in table["gpu"])
        print(f"\n{label}: {what} takes {table['wall_ms']:.2f} ms wall, {total / 1e3:.2f} ms of kernels")
        for kind in ("gpu", "cpu"):
            print(f" top {kind} (ms, calls):")
            for r in table[kind][:top]:
                print(f"  {r['total_us'] / 1e3:8.3f} ms  {r['calls']:5d}x  {r['name']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefill_profile.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_profile.py needs a CUDA GPU")
    model = random_llama("cuda", torch.float16, 0, num_hidden_layers=args.layers)
    prompt = torch.randint(model.config.vocab_size, (1, args.prompt_len), device="cuda")
    prefill = torch.inference_mode()(lambda: model(input_ids=prompt, use_cache=False))
    tables = {"fp16": kernel_table(prefill)}
    pack_rtn(model, 4, 128)
    tables["w4a16"] = kernel_table(prefill)
    print_tables(tables, f"one prefill ({args.layers} blocks)", args.top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "prompt_len": args.prompt_len, "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
