"""How far cuBLAS's FP8 GEMM, as the W4A4 FP8 path calls it (``use_fast_accum=False``), is from exact integer sums.

    PYTHONPATH=$PWD/src python benchmarks/fp8_accum_bounds.py      # H100: under a minute

256 x 256 outputs of integer codes stored as e4m3, unit scales, float32 output, against a float64 matmul (exact
here), for K = 576, 1536, 4096, 11008, 14336 and four code patterns: same-sign large codes 9..16 (a third of the
rows negated, a quarter of the weight rows all 15: the worst case the tests use), all 16, uniform in [-16, 16], and
activations in [0, 15] against weights in [0, 16]. Per case: the largest absolute error, the largest error relative
to sum |a| |w| (the tolerance ``tests/kernels/test_w4a4_fp8.py`` states), the share of inexact outputs and the
largest exact sum. JSON to benchmarks/results/fp8_accum_bounds.json (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lowbit.report import write_json

FP8 = torch.float8_e4m3fn
KS = (576, 1536, 4096, 11008, 14336)


def measure(name: str, a: torch.Tensor, w: torch.Tensor) -> dict:
    from lowbit.kernels.w4a4_fp8 import scaled_mm

    ones_a, ones_b = torch.ones(a.shape[0], 1, device="cuda"), torch.ones(1, w.shape[0], device="cuda")
    got = scaled_mm(a.to(FP8), w.to(FP8), ones_a, ones_b, None, torch.float32).double()
    exact = a.double() @ w.double().T
    magnitude = a.double().abs() @ w.double().abs().T
    err = (got - exact).abs()
    return {"case": name, "k": a.shape[1], "max_abs_err": err.max().item(),
            "max_rel_to_abs_sum": (err / magnitude.clamp(min=1)).max().item(),
            "frac_inexact": (err > 0).double().mean().item(), "max_exact": exact.abs().max().item()}


def cases(k: int, gen: torch.Generator, m: int = 256, n: int = 256):
    def ints(lo, hi, rows):
        return torch.randint(lo, hi + 1, (rows, k), device="cuda", generator=gen).float()

    a, w = ints(9, 16, m), ints(9, 16, n)
    a[::3] *= -1
    w[1::4] = 15.0
    yield "same-sign 9..16", a, w
    yield "all 16", torch.full((m, k), 16.0, device="cuda"), torch.full((n, k), 16.0, device="cuda")
    yield "uniform -16..16", ints(-16, 16, m), ints(-16, 16, n)
    yield "a 0..15, w 0..16", ints(0, 15, m), ints(0, 16, n)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp8_accum_bounds.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("benchmarks/fp8_accum_bounds.py needs a CUDA GPU with FP8 tensor cores (sm_89+, e.g. an H100)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for k in KS:
        for name, a, w in cases(k, gen):
            rows.append(measure(name, a, w))
            print(rows[-1], flush=True)
    write_json([{"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__}}] + rows, args.out)


if __name__ == "__main__":
    main()
