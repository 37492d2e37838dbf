"""Inference kernels on LLaMA-7B/8B layer shapes: W4A16 (decode) and W4A4 (prefill) against bf16 cuBLAS.

    PYTHONPATH=$PWD/src python benchmarks/inference_kernels.py              # H100: about 4-6 minutes (autotuning)
    PYTHONPATH=$PWD/src python benchmarks/inference_kernels.py --quick      # two shapes, M = 1, 16, 2048
    PYTHONPATH=$PWD/src python benchmarks/inference_kernels.py --w4a4-only  # W4A4 and bf16 only, M = 16 .. 8192

Shapes are (N out, K in): 4096x4096 (q/o proj), 11008x4096 and 4096x11008 (LLaMA-7B MLP up/down), 14336x4096
(LLaMA-3-8B MLP up), for M = 1, 16, 2048, 8192 tokens. Per shape and M, in the same run: bf16 ``F.linear``
(cuBLAS), torch's int4 tinygemm (``_weight_int4pack_mm``, group 128), ``lowbit.kernels.w4a16_linear`` (group 128),
and ``lowbit.kernels.wxax_linear`` W4A4 (per-channel weights, per-token asymmetric 4-bit activations quantized
inside the call) on its default path: from M = 2048 the FP8 path (``lowbit.kernels.w4a4_fp8``: FP8 activation
codes, the packed weight unpacked to FP8 **in every call**, cuBLAS ``_scaled_mm``, the fix-up kernel's check), below
it the INT8 Triton GEMM. Beside it: the INT8 path forced (the previous default), the FP8 path with its FP8 weight
cached (``cache_weight=True``, 1 extra byte per weight), and the FP8 path's parts alone (activation quantization,
weight unpack, ``_scaled_mm``); the INT8 path's parts (its activation quantization, its GEMM, the GEMM on
int8-stored weights), and for M >= 2048 two yardsticks on the same codes without zero points or epilogue: cuBLAS
``torch._int_mm`` and row-scaled FP8 ``torch._scaled_mm`` (with a check that FP8 returns exact integer sums).
``--w4a4-only`` times bf16 and the W4A4 columns only. Every call is timed inside a CUDA graph (so Python launch cost
is not measured, as in a graph-captured decode loop), cycling through enough weight copies that they do not fit in
the 50 MB L2; CUDA events around each graph replay, warm-up (which also runs Triton's autotuning) first, median of
>= 20 replays. Each method's output is also checked against ``lowbit``'s reference. A method that fails (compile
error, missing op) prints n/a and its error, and the others still run; for M >= 2048, W4A16's fused GEMM is also
compared with the whole weight dequantized by a kernel, then cuBLAS. JSON to benchmarks/results/inference_kernels.json
(``--w4a4-only``: inference_w4a4.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.report import print_markdown, write_json

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
TOKENS = [1, 16, 2048, 8192]
W4A4_TOKENS = [16, 1024, 2048, 8192]
ROTATE_BYTES = 256 * 2**20  # weight bytes cycled through per timed batch: five times the H100's L2


@dataclass(frozen=True)
class Config:
    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    iters: int
    warmup: int
    group: int
    graphs: bool
    seed: int
    w4a4_only: bool = False


def parse_args(argv=None) -> tuple[Config, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shapes 4096x4096 and 11008x4096, M = 1, 16, 2048")
    p.add_argument("--iters", type=int, default=30, help="timed graph replays per measurement (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--group", type=int, default=128, help="W4A16 group size (W4A4 is per-channel)")
    p.add_argument("--no-graphs", action="store_true", help="time eager calls (includes Python launch cost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w4a4-only", action="store_true", help="bf16 and W4A4 columns only, M = 16, 1024, 2048, 8192")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/inference_kernels.json, or "
                   "results/inference_w4a4.json with --w4a4-only)")
    a = p.parse_args(argv)
    if a.iters < 20:
        raise LowbitError(f"--iters must be at least 20 (median of >= 20 runs), got {a.iters}")
    shapes, tokens = (SHAPES[:2], TOKENS[:3]) if a.quick else (SHAPES, TOKENS)
    if a.w4a4_only:
        tokens = W4A4_TOKENS[:1] + W4A4_TOKENS[2:3] if a.quick else W4A4_TOKENS
    out = a.out if a.out is not None else RESULTS / ("inference_w4a4.json" if a.w4a4_only else "inference_kernels.json")
    return Config(tuple(shapes), tuple(tokens), a.iters, a.warmup, a.group, not a.no_graphs, a.seed, a.w4a4_only), out


def median_us(calls: list[Callable[[], object]], cfg: Config) -> float:
    """Median GPU time of one call, in microseconds: the calls run back to back (one graph), timed together."""
    for _ in range(cfg.warmup):
        for call in calls:
            call()
    torch.cuda.synchronize()
    if cfg.graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run = graph.replay
    else:
        def run():
            for call in calls:
                call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(cfg.iters):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def tinygemm_weight(weight, group: int):
    """torch's int4 layout of the same weight: w = (q - 8) * scale + zero, scales and zeros (K/G, N, 2) in bf16."""
    codes = weight.codes().to(torch.int32)
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    w_int4 = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    s, z = weight.scales, weight.zeros
    scale_zero = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return w_int4, scale_zero


def cublas_yardsticks(acts, codes: torch.Tensor, scales: torch.Tensor, errors: dict, cfg: Config) -> dict:
    """``torch._int_mm`` and row-wise scaled FP8 ``torch._scaled_mm`` on the int8 codes; records whether FP8 (with
    cuBLAS's default accumulation) returns the exact integer sums."""
    out = {}
    try:
        exact = torch._int_mm(acts.codes, codes.t())
        out["int8_cublas_gemm"] = median_us([lambda: torch._int_mm(acts.codes, codes.t())], cfg)
        a8, b8 = acts.codes.to(torch.float8_e4m3fn), codes.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        sums = torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        errors["fp8_cublas_exact_integer_sums"] = bool(torch.equal(sums, exact.float()))
        sx, sw = acts.scale[:, None].contiguous(), scales.T.contiguous()
        out["fp8_cublas_gemm"] = median_us([lambda: torch._scaled_mm(a8, b8.t(), scale_a=sx, scale_b=sw,
                                                                      out_dtype=torch.bfloat16)], cfg)
    except (RuntimeError, AttributeError, TypeError) as err:  # an op missing or refusing these layouts here
        errors["cublas_yardstick_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return out


def short(err: BaseException, limit: int = 200) -> str:
    """An exception in one line: its type and the last line of its message, cut at ``limit`` characters."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:limit]}"


def run_cases(cases, bench: Callable, meta: dict, out: Path, report: Callable, limit: int = 200) -> list[dict]:
    """Each (n, k, m) of ``cases`` through ``bench`` (it returns a list of rows): a failing case is recorded and
    the others still run; the JSON is rewritten after every case (partial results survive a timeout), ``report``
    prints the rows, and the JSON is written once more with the total seconds in ``meta``."""
    rows, start = [], time.time()
    for n, k, m in cases:
        print(f"{n}x{k} M={m} ({time.time() - start:.0f} s)", flush=True)
        try:
            rows.extend(bench(n, k, m))
        except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
            print(f"  case failed: {short(err, limit)}", flush=True)
            rows.append({"n": n, "k": k, "m": m, "case_error": short(err, limit)})
        write_json([{"meta": meta}] + rows, out)
    report(rows)
    meta["seconds"] = time.time() - start
    print(f"\n{meta['seconds']:.0f} s in all")
    write_json([{"meta": meta}] + rows, out)
    return rows


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def time_w4a4(x, w4, w4_copies: list, copies: int, timed: Callable, checked: Callable, times: dict, errors: dict,
              cfg: Config) -> None:
    """W4A4 columns: the default path, both paths forced, the FP8 path with a cached weight, and each path's parts.

    The default (``w4a4``) is what ``lowbit``'s W4A4 linear runs: from M = 2048 the FP8 path with the weight
    unpacked in the call. ``w4a4_fp8_cached`` keeps the FP8 weight (``cache_weight=True``): faster, 1 more byte per
    weight held, so it is a separate column, never the default's number."""
    from lowbit.kernels import w4a4_fp8, wxax_linear
    from lowbit.kernels.int8_gemm import wxax_gemm
    from lowbit.kernels.w4a4 import prepare_wxax, quantize_activations, wxax_linear_reference

    m, k = x.shape
    timed("w4a4", [lambda p=p: wxax_linear(x, p, 4, False) for p in w4_copies])
    timed("w4a4_int8", [lambda p=p: wxax_linear(x, p, 4, False, path="int8") for p in w4_copies])
    ref = wxax_linear_reference(x.float(), w4, 4, False)
    checked("w4a4", lambda: rel_error(wxax_linear(x, w4, 4, False), ref))
    checked("w4a4_int8", lambda: rel_error(wxax_linear(x, w4, 4, False, path="int8"), ref))
    if w4a4_fp8.fp8_applies(x, w4, 4, None):
        timed("w4a4_fp8", [lambda p=p: wxax_linear(x, p, 4, False, path="fp8") for p in w4_copies])
        timed("w4a4_fp8_cached", [lambda p=p: wxax_linear(x, p, 4, False, path="fp8", cache_weight=True)
                                  for p in w4_copies])
        checked("w4a4_fp8_cached", lambda: rel_error(wxax_linear(x, w4, 4, False, path="fp8", cache_weight=True), ref))
        timed("fp8_quant", [lambda: w4a4_fp8.quantize_activations_fp8(x, 4, False)])
        timed("fp8_unpack", [lambda p=p: w4a4_fp8.unpack_fp8(p) for p in w4_copies])
        if "fp8_quant" in times and "fp8_unpack" in times:
            acts8 = w4a4_fp8.quantize_activations_fp8(x, 4, False)
            w8s = [(w4a4_fp8.unpack_fp8(p), w4a4_fp8.prepare_fp8(p).scale_b) for p in w4_copies]
            timed("fp8_scaled_mm", [lambda w=w: w4a4_fp8.scaled_mm(acts8.codes, w[0], acts8.scale[:, None], w[1], None,
                                                                    torch.bfloat16) for w in w8s])
    timed("w4a4_quant", [lambda: quantize_activations(x, 4, False, k)])
    acts = quantize_activations(x, 4, False, k) if "w4a4_quant" in times else None
    if acts is not None:
        timed("w4a4_gemm", [lambda p=p: wxax_gemm(acts, prepare_wxax(p), None, torch.bfloat16) for p in w4_copies])
        if not cfg.w4a4_only:
            timed("w4a4_gemm_int8w", [lambda p=p: wxax_gemm(acts, prepare_wxax(p, unpacked=True), None,
                                                            torch.bfloat16) for p in w4_copies[:copies * 2]])
    if m >= 2048 and acts is not None and not cfg.w4a4_only:  # cuBLAS int8 and FP8 GEMMs on the same 4-bit codes
        times.update(cublas_yardsticks(acts, prepare_wxax(w4, unpacked=True).qweight, w4.scales, errors, cfg))


def bench_shape(n: int, k: int, cfg: Config) -> list[dict]:
    from lowbit.kernels import PackedWeight, w4a16, w4a16_linear

    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    w16 = PackedWeight.quantize(w, 4, cfg.group)
    w4 = PackedWeight.quantize(w, 4, k)
    dense = w16.dequantize(torch.bfloat16)
    tiny, tiny_error = None, "not run (--w4a4-only)"
    try:
        tiny = None if cfg.w4a4_only else tinygemm_weight(w16, cfg.group)
    except (RuntimeError, AttributeError) as err:  # op missing or changed in this torch
        tiny, tiny_error = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    rows = []
    for m in cfg.tokens:
        copies = max(1, min(32, ROTATE_BYTES // (n * k * 2))) if m <= 16 else 1
        x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        dense_copies = [dense.clone() for _ in range(copies)]
        w16_copies = [w16] + [PackedWeight(w16.packed.clone(), w16.scales.clone(), w16.zeros.clone(), 4, cfg.group,
                                           k, n) for _ in range(0 if cfg.w4a4_only else copies * 4 - 1)]
        w4_copies = [w4] + [PackedWeight(w4.packed.clone(), w4.scales.clone(), w4.zeros.clone(), 4, k, k, n)
                            for _ in range(copies * 4 - 1)]
        times, errors, failures = {}, {}, {}

        def timed(name: str, calls: list[Callable[[], object]]) -> None:
            """Time one method; a failure (compile error, missing op) is recorded and printed, not fatal."""
            try:
                times[name] = median_us(calls, cfg)
            except Exception as err:  # noqa: BLE001 - one failing method must not hide the others
                failures[name] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:200]}"
                print(f"{n}x{k} M={m}: {name} n/a ({failures[name]})", flush=True)

        def checked(name: str, fn: Callable[[], float]) -> None:
            if name in times:
                try:
                    errors[name] = fn()
                except Exception as err:  # noqa: BLE001
                    failures[name] = f"{type(err).__name__}: {str(err)[:200]}"

        timed("bf16", [lambda d=d: F.linear(x, d) for d in dense_copies])
        time_w4a4(x, w4, w4_copies, copies, timed, checked, times, errors, cfg)
        if not cfg.w4a4_only:
            timed("w4a16", [lambda p=p: w4a16_linear(x, p) for p in w16_copies])
            if m >= 2048:  # yardstick: the whole weight dequantized by a kernel, then cuBLAS
                timed("w4a16_dequant_cublas", [lambda p=p: F.linear(x, w4a16._dequantize(
                    p, w4a16.prepare_w4a16(p, x.dtype), x.dtype)) for p in w16_copies])
            checked("w4a16", lambda: rel_error(w4a16_linear(x, w16), F.linear(x.float(), w16.dequantize())))
        if tiny is not None and not cfg.w4a4_only:
            tiny_copies = [(tiny[0].clone(), tiny[1].clone()) for _ in range(copies * 4)]
            timed("tinygemm", [lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], cfg.group, t[1])
                               for t in tiny_copies])
            checked("tinygemm", lambda: rel_error(torch.ops.aten._weight_int4pack_mm(x, tiny[0], cfg.group, tiny[1]),
                                           F.linear(x.float(), w16.dequantize())))
        base = times.get("bf16", float("nan"))
        row = {"n": n, "k": k, "m": m, "us": times, "speedup_vs_bf16": {key: base / t for key, t in times.items()},
               "failures": failures,
               "rel_error_vs_reference": errors, "weight_copies_cycled": copies,
               "tflops_bf16": 2 * m * n * k / base / 1e6}
        if tiny is None and not cfg.w4a4_only:
            row["tinygemm_error"] = tiny_error
        rows.append(row)
        print(f"{n}x{k} M={m}: " + ", ".join(f"{key} {t:.1f} us" for key, t in times.items()), flush=True)
        del dense_copies, w16_copies, w4_copies
        torch.cuda.empty_cache()
    return rows


W4A16_COLUMNS = [("tinygemm int4 g128", "tinygemm"), ("lowbit W4A16 g128", "w4a16"),
                 ("W4A16 dequant + cuBLAS", "w4a16_dequant_cublas")]
W4A4_COLUMNS = [
    ("lowbit W4A4, default path (act. quant incl.)", "w4a4"), ("INT8 path (previous default)", "w4a4_int8"),
    ("FP8 path, unpack per call", "w4a4_fp8"), ("FP8 path, cached FP8 weight", "w4a4_fp8_cached"),
    ("FP8 act. quant alone", "fp8_quant"), ("FP8 unpack alone", "fp8_unpack"), ("_scaled_mm alone", "fp8_scaled_mm"),
    ("INT8 act. quant alone", "w4a4_quant"), ("INT8 GEMM alone", "w4a4_gemm"),
]
YARDSTICK_COLUMNS = [("INT8 GEMM, int8 weights", "w4a4_gemm_int8w"), ("cuBLAS int8 GEMM", "int8_cublas_gemm"),
                     ("cuBLAS FP8 GEMM (no zero points)", "fp8_cublas_gemm")]
PLAIN_US = {"bf16", "w4a4_quant", "fp8_quant", "fp8_unpack"}  # no speed-up printed: parts, or the baseline itself


def print_tables(rows: list[dict], w4a4_only: bool) -> None:
    def cell(row, key):
        if key not in row["us"]:
            return "n/a"
        if key in PLAIN_US:
            return f"{row['us'][key]:.1f}"
        return f"{row['us'][key]:.1f} ({row['speedup_vs_bf16'][key]:.2f}x)"

    def table(columns):
        print_markdown(["N x K", "M", "bf16 cuBLAS us"] + [title for title, _ in columns],
                       [f"| {r['n']}x{r['k']} | {r['m']} | {cell(r, 'bf16')} | "
                        + " | ".join(cell(r, key) for _, key in columns) + " |" for r in rows])

    if not w4a4_only:
        table(W4A16_COLUMNS)
    table(W4A4_COLUMNS + ([] if w4a4_only else YARDSTICK_COLUMNS))
    print("\n(us per call, speedup over bf16 cuBLAS in parentheses; errors vs reference in the JSON)")
    for r in rows:
        for key, why in r["failures"].items():
            print(f"n/a {r['n']}x{r['k']} M={r['m']} {key}: {why}")


def main(argv=None) -> None:
    cfg, out = parse_args(argv)
    if not torch.cuda.is_available():
        raise LowbitError("benchmarks/inference_kernels.py needs a CUDA GPU")
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "config": {**cfg.__dict__, "shapes": [list(s) for s in cfg.shapes]},
            "command": "python benchmarks/inference_kernels.py" + (" --quick" if cfg.shapes != tuple(SHAPES) else "")
            + (" --w4a4-only" if cfg.w4a4_only else "")}
    rows = []
    for n, k in cfg.shapes:
        rows += bench_shape(n, k, cfg)
    print_tables(rows, cfg.w4a4_only)
    write_json([{"meta": meta}] + rows, out)


if __name__ == "__main__":
    main()
