"""W4A16 for M >= 2 rows: bf16 cuBLAS vs the old paths vs ``lowbit.kernels.w4a16_gemm``, in one run (H100: ~2 min).

    export PYTHONPATH=$PWD/src; python benchmarks/w4a16_gemm_sweep.py --old benchmarks/baselines/w4a16_9648ba0.py \\
        --out $OUT/w4a16_gemm_sweep.json

Shapes (N out, K in) 4096x4096, 11008x4096, 4096x11008; M = 2, 4, 16, 64, 128, 512, 2048; bf16, group 128.
Per case, timed in the same run: dense bf16 cuBLAS ``F.linear``; the old ``w4a16_linear`` (``--old FILE``: its
fused GEMM for M <= 64, dequantize + cuBLAS above); the new ``w4a16_linear`` (the config its search picked); the
new fused GEMM's best config and the new dequantize + cuBLAS, each launched directly (so the threshold between them
can be read off). Timing as in ``inference_kernels.py``: CUDA graphs cycling through enough weight copies to miss
the 50 MB L2, CUDA events, warm-up (which runs the searches), median of --iters replays. Every method's output is
checked against the float32 reference with the tests' bound. The search's own do_bench times (L2 flushed) of every
candidate go to the JSON too (``tune_ms``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from inference_kernels import ROTATE_BYTES, Config, median_us, run_cases, short  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.report import print_markdown  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
ROWS = [2, 4, 16, 64, 128, 512, 2048]
TOL = 1e-2  # bf16 bound of tests/kernels/test_w4a16.py


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("old_w4a16", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def over_bound(y, x, weight) -> float:
    truth = F.linear(x.float(), weight.dequantize())
    bound = TOL * (x.float().abs() @ weight.dequantize().abs().T) + 1e-6
    return float(((y.float() - truth).abs() / bound).max())


def bench_case(n, k, m, group, cfg: Config, old) -> dict:
    from lowbit.kernels import PackedWeight, w4a16, w4a16_gemm as G, w4a16_linear

    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    weight = PackedWeight.quantize(torch.randn(n, k, device="cuda", generator=gen) / k**0.5, 4, group)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    copies = max(1, min(32, ROTATE_BYTES // (n * k * 2)))
    packed = [weight] + [PackedWeight(weight.packed.clone(), weight.scales.clone(), weight.zeros.clone(), 4, group,
                                      k, n) for _ in range(copies * 4 - 1)]
    layouts = [w4a16.prepare_w4a16(p, dtype) for p in packed]
    times, checks, failures = {}, {}, {}

    def timed(name, one, calls):
        try:
            checks[name] = over_bound(one(), x, weight)
            times[name] = median_us(calls, cfg)
        except Exception as err:  # noqa: BLE001 - one failing method must not hide the others
            failures[name] = short(err)
            print(f"  {name}: n/a ({failures[name]})", flush=True)

    dense = [weight.dequantize(dtype) for _ in range(copies)]
    timed("cublas_bf16", lambda d=dense[0]: F.linear(x, d), [lambda d=d: F.linear(x, d) for d in dense])
    del dense
    if old is not None:
        timed("old", lambda: old.w4a16_linear(x, weight), [lambda p=p: old.w4a16_linear(x, p) for p in packed])
    timed("new", lambda: w4a16_linear(x, weight), [lambda p=p: w4a16_linear(x, p) for p in packed])
    key = next((key for key in G._tuned if key[:2] == (n, k) and key[7] == G.bucket(m)), None)
    chosen, tune = G._tuned.get(key), {str(c): t for c, t in G.tune_log.get(key, {}).items()}
    fused = {c: t for c, t in G.tune_log.get(key, {}).items() if c != G.DEQUANT}
    best_fused = min(fused, key=fused.get) if fused else None
    if best_fused is not None and best_fused != chosen:
        timed("new_fused_best", lambda lay=layouts[0]: G.launch(x, weight, lay, None, best_fused),
              [lambda p=p, lay=lay: G.launch(x, p, lay, None, best_fused) for p, lay in zip(packed, layouts)])
    elif best_fused is not None:
        times["new_fused_best"], checks["new_fused_best"] = times.get("new"), checks.get("new")
    if m > 64 and chosen != G.DEQUANT:
        timed("new_dequant_cublas", lambda lay=layouts[0]: G.launch(x, weight, lay, None, G.DEQUANT),
              [lambda p=p, lay=lay: G.launch(x, p, lay, None, G.DEQUANT) for p, lay in zip(packed, layouts)])
    elif m > 64:
        times["new_dequant_cublas"], checks["new_dequant_cublas"] = times.get("new"), checks.get("new")
    base = times.get("cublas_bf16", float("nan"))
    row = {"n": n, "k": k, "m": m, "group": group, "dtype": "bfloat16", "us": times,
           "speedup_vs_cublas": {name: base / t for name, t in times.items() if t}, "chosen": str(chosen),
           "best_fused": str(best_fused), "tune_ms": tune, "error_over_bound": checks, "failures": failures,
           "all_pass": all(v <= 1 for v in checks.values() if v is not None), "weight_copies_cycled": len(packed)}
    del packed, layouts
    torch.cuda.empty_cache()
    return row


def print_table(rows) -> None:
    def cell(row, name):
        t = row["us"].get(name)
        if t is None:
            return "n/a"
        return f"{t:.1f}" if name == "cublas_bf16" else f"{t:.1f} ({row['speedup_vs_cublas'][name]:.2f}x)"

    print_markdown(
        ["N x K", "M", "bf16 cuBLAS us", "old", "new (chosen)", "chosen config", "new fused best", "best fused config",
         "new dequant + cuBLAS", "checks pass"],
        [f"| {r['n']}x{r['k']} | {r['m']} | {cell(r, 'cublas_bf16')} | {cell(r, 'old')} | {cell(r, 'new')} | "
         f"{r['chosen']} | {cell(r, 'new_fused_best')} | {r['best_fused']} | {cell(r, 'new_dequant_cublas')} | "
         f"{r['all_pass']} |" for r in rows])
    print("\n(us per call, speed-up over bf16 cuBLAS in parentheses; configs (BLOCK_N, BLOCK_M, WP, warps, stages, "
          "splits) or 'dequant')\n")
    for r in rows:
        ranked = sorted((t, c) for c, t in r["tune_ms"].items())[:4]
        print(f"{r['n']}x{r['k']} M={r['m']} search (ms, L2 flushed): " + ", ".join(f"{c} {t:.4f}" for t, c in ranked))
        for name, why in r["failures"].items():
            print(f"  n/a {name}: {why}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, help="an older w4a16.py whose w4a16_linear is timed as 'old'")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "w4a16_gemm_sweep.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise LowbitError("benchmarks/w4a16_gemm_sweep.py needs a CUDA GPU")
    import triton

    old = load_old(a.old) if a.old else None
    rows_m = [int(v) for v in a.rows.split(",")]
    cfg = Config(tuple(SHAPES), tuple(rows_m), a.iters, a.warmup, a.group, True, a.seed)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "argv": sys.argv[1:], "iters": a.iters}
    run_cases([(n, k, m) for n, k in SHAPES for m in rows_m], lambda n, k, m: [bench_case(n, k, m, a.group, cfg, old)],
              meta, a.out, lambda rows: print_table([r for r in rows if "us" in r]))


if __name__ == "__main__":
    main()
