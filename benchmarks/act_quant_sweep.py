"""Sweep the W4A4 activation quantizer's launch shape: chunk width and warps per row, on the LLaMA input widths.

    PYTHONPATH=$PWD/src python benchmarks/act_quant_sweep.py      # H100: about 2 minutes

``quantize_activations_fp8`` reads a (M, K) bf16 x once and writes e4m3 codes plus per-row scales, so its floor
is DRAM speed over 3 bytes per element. Each variant is timed as CUDA-graph replays (median of 30, µs), its
effective bandwidth reported, and its output checked equal to the default launch's (``w4a4.act_launch``). JSON to
benchmarks/results/act_quant_sweep.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from inference_kernels import Config, median_us  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.report import print_markdown, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CHUNKS = (1024, 2048, 4096, 8192, 16384)
WARPS = (2, 4, 8, 16)


def sweep(m: int, k: int, cfg: Config) -> list[dict]:
    from lowbit.kernels.w4a4 import act_launch
    from lowbit.kernels.w4a4_fp8 import quantize_activations_fp8

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(m + k))
    want = quantize_activations_fp8(x, 4, False)
    rows = []
    for chunk in sorted({act_launch(k, c)[0] for c in CHUNKS}):  # chunks never exceed K's power of 2
        for warps in WARPS:
            if chunk < 32 * warps:
                continue
            got = quantize_activations_fp8(x, 4, False, max_chunk=chunk, num_warps=warps)
            same = all(torch.equal(a.float(), b.float()) for a, b in zip(got, want))
            us = median_us([lambda c=chunk, w=warps: quantize_activations_fp8(x, 4, False, max_chunk=c, num_warps=w)],
                           cfg)
            rows.append({"m": m, "k": k, "chunk": chunk, "num_warps": warps, "us": round(us, 2),
                         "tb_per_s": round(m * k * 3 / us / 1e6, 3), "equal_to_default": same,
                         "default": (chunk, warps) == act_launch(k), "device": torch.cuda.get_device_name()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "act_quant_sweep.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise LowbitError("benchmarks/act_quant_sweep.py needs a CUDA GPU")
    cfg = Config(shapes=(), tokens=(), iters=30, warmup=3, group=128, graphs=True, seed=0)
    rows = []
    for k in (4096, 11008):
        for m in (2048, 8192):
            found = sweep(m, k, cfg)
            best = min(found, key=lambda r: r["us"])
            default = next(r for r in found if r["default"])
            print(f"M={m} K={k}: default {default['us']} us ({default['tb_per_s']} TB/s); best chunk {best['chunk']} "
                  f"x {best['num_warps']} warps {best['us']} us ({best['tb_per_s']} TB/s)", flush=True)
            rows += found
    print_markdown(["M", "K", "chunk", "warps", "µs", "TB/s", "equal"],
                   [f"| {r['m']} | {r['k']} | {r['chunk']} | {r['num_warps']} | {r['us']} | {r['tb_per_s']} | "
                    f"{r['equal_to_default']} |" for r in rows])
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
