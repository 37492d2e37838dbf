"""FP8 accumulation on Hopper: which Triton ``max_num_imprecise_acc`` returns exact integer sums, and how fast (GPU).

    PYTHONPATH=$PWD/src python benchmarks/fp8_accum_probe.py --out $OUT/fp8_accum_probe.json   # H100: a few minutes
    PYTHONPATH=$PWD/src python benchmarks/fp8_accum_probe.py --quick    # 4096x4096, M = 2048 only

Shapes (N out, K in) 4096x4096, 11008x4096, 4096x11008, 14336x4096 and M = 2048, 8192 tokens. Operands are random
integer codes in [-8, 7] (4-bit codes minus their zero point) stored as float8_e4m3fn, a (M, K) and b (N, K). Timed
in the same run: bf16 ``F.linear`` of the same codes in bf16 (the baseline); cuBLAS row-scaled ``torch._scaled_mm``
with ``use_fast_accum`` False (through ``lowbit.kernels.w4a4_fp8.scaled_mm``) and True; ``lowbit.kernels.fp8_gemm``'s
Triton kernel ``fp8_scaled_gemm`` with ``imprecise_acc`` None (Triton's default: never promote), 32, 64, 128 (float32
promotion every that many products of K). All produce bf16 with row/column scales and no bias. Timing: warm-up
first (which runs Triton's autotuning), then CUDA events around each replay of a CUDA graph holding one call
(``inference_kernels.median_us``), median of --iters replays; no L2 flushing (these operands exceed the 50 MB L2).

Exactness, per FP8 variant: max |integer sum - exact sum| with unit scales and float32 output (``integer_sums``; for
``_scaled_mm`` scale tensors of ones), for the [-8, 7] codes and for worst-case codes uniform in [-16, 16]; the
exact sums are a float64 matmul on the GPU (exact here: integer products and sums far below 2^53, as an int64 matmul,
which CUDA lacks). The autotuner's chosen config of each Triton variant is recorded. A failing variant records its
error and the others still run. JSON to benchmarks/results/fp8_accum_probe.json (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from inference_kernels import Config, median_us, run_cases, short  # noqa: E402

from lowbit.report import print_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
ROWS = [2048, 8192]
IMPRECISE = [None, 32, 64, 128]
FP8 = torch.float8_e4m3fn


def codes(rows: int, k: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (rows, k), device="cuda", generator=gen).to(torch.float32).to(FP8)


def exact_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double().T


def cublas_fp8(a, b, scale_a, scale_b, fast: bool, out_dtype):
    """Row-scaled cuBLAS FP8 as ``w4a4_fp8.scaled_mm`` calls it (scale_a (M, 1), scale_b (1, N)); that helper has
    no ``use_fast_accum`` argument, so the fast variant calls ``torch._scaled_mm`` the same way with it True."""
    from lowbit.kernels.w4a4_fp8 import scaled_mm

    if not fast:
        return scaled_mm(a, b, scale_a, scale_b, None, out_dtype)
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=True)


def cublas_sums(a, b, fast: bool, row: dict) -> torch.Tensor:
    """Unit-scale float32 sums through the timed row-wise path; where torch allows row-wise scaling only with bf16
    output (CUTLASS instead of cuBLAS < 12.9), tensor-wise unit scales instead, noted in ``row``."""
    try:
        ones_a, ones_b = torch.ones(a.shape[0], 1, device="cuda"), torch.ones(1, b.shape[0], device="cuda")
        return cublas_fp8(a, b, ones_a, ones_b, fast, torch.float32)
    except (RuntimeError, ValueError) as err:
        row["sums_scaling"] = f"tensor-wise (row-wise with float32 output: {short(err, 300)})"
        one = torch.ones((), device="cuda")
        return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast)


def variants():
    """name -> (timed call on (a, b, sa, sb), unit-scale float32 sums of (a, b, row) or None, read its config)."""
    from lowbit.kernels import fp8_gemm as G

    out = {
        "bf16_linear": (lambda x16, w16, sa, sb: F.linear(x16, w16), None, None),
        "cublas_fp8": (lambda a, b, sa, sb: cublas_fp8(a, b, sa[:, None], sb[None, :], False, torch.bfloat16),
                       lambda a, b, row: cublas_sums(a, b, False, row), None),
        "cublas_fp8_fast": (lambda a, b, sa, sb: cublas_fp8(a, b, sa[:, None], sb[None, :], True, torch.bfloat16),
                            lambda a, b, row: cublas_sums(a, b, True, row), None),
    }
    for imp in IMPRECISE:
        out[f"triton_imprecise_{imp}"] = (
            lambda a, b, sa, sb, imp=imp: G.fp8_scaled_gemm(a, b, sa, sb, None, torch.bfloat16, imp),
            lambda a, b, row, imp=imp: G.integer_sums(a, b, imp), G.tuned_config)
    return out


def bench_case(n: int, k: int, m: int, cfg: Config) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed + n + k + m)
    a8, b8 = codes(m, k, -8, 7, gen), codes(n, k, -8, 7, gen)
    a16, b16 = codes(m, k, -16, 16, gen), codes(n, k, -16, 16, gen)
    x_bf16, w_bf16 = a8.to(torch.bfloat16), b8.to(torch.bfloat16)
    sa = torch.rand(m, device="cuda", generator=gen) + 0.5
    sb = torch.rand(n, device="cuda", generator=gen) * 1e-2 + 1e-3
    exact8, exact16 = exact_sums(a8, b8), exact_sums(a16, b16)
    rows, base = [], None
    for name, (call, sums, config) in variants().items():
        row = {"n": n, "k": k, "m": m, "variant": name, "us": None, "speedup_vs_bf16": None, "tflops": None,
               "max_err_codes8": None, "max_err_codes16": None, "config": None, "sums_config": None, "error": None}
        try:
            if sums is not None:  # also compiles and autotunes the Triton variants (same autotune key)
                row["max_err_codes8"] = (sums(a8, b8, row).double() - exact8).abs().max().item()
                row["max_err_codes16"] = (sums(a16, b16, row).double() - exact16).abs().max().item()
                row["sums_config"] = config() if config else None  # float32 output: its own autotune key
        except Exception as err:  # noqa: BLE001 - still time it
            row["error"] = f"exactness check: {short(err, 300)}"
            print(f"  {name}: exactness n/a ({row['error']})", flush=True)
        try:
            args = (x_bf16, w_bf16, sa, sb) if name == "bf16_linear" else (a8, b8, sa, sb)
            row["us"] = median_us([lambda call=call, args=args: call(*args)], cfg)
            row["config"] = config() if config else None
            row["tflops"] = 2 * m * n * k / row["us"] / 1e6
            base = row["us"] if name == "bf16_linear" else base
            row["speedup_vs_bf16"] = base / row["us"] if base else None
        except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
            row["error"] = "; ".join(filter(None, (row["error"], short(err, 300))))
            print(f"  {name}: n/a ({row['error']})", flush=True)
        rows.append(row)
        print(f"  {name}: {row['us'] and round(row['us'], 1)} us, errors {row['max_err_codes8']} / "
              f"{row['max_err_codes16']}, {row['config']}", flush=True)
    del a8, b8, a16, b16, x_bf16, w_bf16, exact8, exact16
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    def note(r):
        return r["error"] or r["config"] or r.get("sums_scaling") or ""

    print_markdown(
        ["N x K", "M", "variant", "us", "x bf16", "TFLOPS", "max err [-8,7]", "max err [-16,16]", "config / error"],
        [f"| {r['n']}x{r['k']} | {r['m']} | {r['variant']} | {num(r['us'], '.1f')} | "
         f"{num(r['speedup_vs_bf16'], '.2f')} | {num(r['tflops'], '.0f')} | {num(r['max_err_codes8'], 'g')} | "
         f"{num(r['max_err_codes16'], 'g')} | {note(r)} |" for r in rows])
    print("\n(max err: max |float32 sum - exact integer sum| with unit scales; 0 = exact)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shape 4096x4096 and M = 2048 only")
    p.add_argument("--iters", type=int, default=30, help="timed graph replays per measurement (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-graphs", action="store_true", help="time eager calls (includes Python launch cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "fp8_accum_probe.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fp8_accum_probe.py needs a CUDA GPU with FP8 tensor cores (H100); none is visible")
    if torch.cuda.get_device_capability() < (8, 9):
        sys.exit(f"benchmarks/fp8_accum_probe.py needs FP8 tensor cores (sm_89+), got {torch.cuda.get_device_name()}")
    if a.iters < 20:
        sys.exit(f"--iters must be at least 20 (median of >= 20 runs), got {a.iters}")
    import triton

    from lowbit.kernels.w4a16 import use_fixed_config

    shapes, rows_m = (SHAPES[:1], ROWS[:1]) if a.quick else (SHAPES, ROWS)
    cfg = Config(tuple(shapes), tuple(rows_m), a.iters, a.warmup, 128, not a.no_graphs, a.seed)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "argv": sys.argv[1:], "iters": a.iters, "graphs": cfg.graphs, "autotuned": not use_fixed_config(),
            "lowbit_kernels": os.environ.get("LOWBIT_KERNELS", "auto")}
    run_cases([(n, k, m) for n, k in shapes for m in rows_m], lambda n, k, m: bench_case(n, k, m, cfg), meta,
              a.out, lambda rows: print_table([r for r in rows if "variant" in r]), limit=300)


if __name__ == "__main__":
    main()
