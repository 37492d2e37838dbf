"""4-bit training kernels on the GPU: GEMMs, fused quantizers, one training linear layer, one LLaMA training step.

    PYTHONPATH=$PWD/src python benchmarks/train_kernels.py            # H100: about 4-6 minutes
    PYTHONPATH=$PWD/src python benchmarks/train_kernels.py --quick    # small shapes, a sanity run (~1-2 minutes)

Every ratio is against bf16 measured in the same run (CUDA events, warm-up, median of >= 20 timed runs):
(1) one GEMM 8192 x 4096 x 4096: bf16 cuBLAS vs FP8 ``_scaled_mm`` (fp32 accumulation, and fast accumulation),
``torch._int_mm`` and the Triton INT8 kernel, with an exactness check of each on int4 data; (2) the fused kernels
alone; (3) a 4-bit training linear layer (HQ+LSS, ``lowbit.train``) forward + backward, 8192 tokens, 4096 x 4096,
vs a bf16 ``nn.Linear``; (4) a ~350M-parameter LLaMA-style training step (AdamW, bf16 autocast) 4-bit vs bf16,
plus the loss of a short run (same data, same seed) for both. JSON to benchmarks/results/train_kernels.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.report import print_markdown, write_json

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few steps: a sanity run")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the layer benchmark (default 8192)")
    p.add_argument("--width", type=int, default=4096, help="in = out features of the layer benchmark (default 4096)")
    p.add_argument("--iters", type=int, default=30, help="timed runs per measurement (>= 20; default 30)")
    p.add_argument("--steps", type=int, default=50, help="training steps of the LM runs (default 50)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=3584, help="MLP width (a multiple of the Hadamard block)")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-lm", action="store_true", help="only the GEMM, kernel and layer benchmarks")
    p.add_argument("--graph", action="store_true",
                   help="also run both LM steps as CUDA graphs (lowbit.train.graphs), each against bf16 captured too")
    p.add_argument("--lm-only", action="store_true", help="only the LM training steps")
    p.add_argument("--layer-only", action="store_true", help="only the layer, its parts and the backward detail")
    p.add_argument("--compare-sampling", action="store_true",
                   help="also time the sampled layer and backward with LOWBIT_SAMPLING=reference (the pure-PyTorch "
                        "sampling, ~40 ops per product, as before the fused sampling kernels) in the same run")
    p.add_argument("--out", type=Path, default=RESULTS / "train_kernels.json")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.width, args.iters, args.steps = 2048, 1024, 20, 12
        args.hidden, args.layers, args.heads, args.intermediate, args.seqlen, args.batch_size = 256, 2, 4, 704, 256, 4
    if args.iters < 20:
        raise LowbitError(f"--iters must be at least 20 (median of >= 20 runs), got {args.iters}")
    if args.lm_only and (args.skip_lm or args.layer_only):
        raise LowbitError("--lm-only runs only the LM steps; it contradicts --skip-lm and --layer-only")
    if args.graph and (args.skip_lm or args.layer_only):
        raise LowbitError("--graph applies to the LM steps, which --skip-lm and --layer-only leave out")
    return args


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds (CUDA events around each run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_gemms(m: int, n: int, k: int, iters: int) -> list[dict]:
    """One GEMM ``(m x k) @ (n x k)^T`` in bf16 and on the integer-exact low-bit paths."""
    from lowbit.kernels.int_gemm import FP8, fp8_matmul, int8_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randint(-8, 8, (m, k), device="cuda", generator=gen)
    b = torch.randint(-8, 8, (n, k), device="cuda", generator=gen)
    exact = (a.double() @ b.double().T)
    a16, b16 = a.bfloat16(), b.bfloat16()
    a8, b8 = a.to(FP8), b.to(FP8)
    ai, bi = a.to(torch.int8), b.to(torch.int8)
    bi_t = bi.T  # column-major (k x n), what cuBLASLt's int8 GEMM wants
    paths = {
        "bf16 cuBLAS": (lambda: a16 @ b16.T, None),
        "FP8 _scaled_mm (fp32 accum)": (lambda: fp8_matmul(a8, b8), lambda r: r),
        "FP8 _scaled_mm (fast accum)": (lambda: fp8_matmul(a8, b8, fast_accum=True), lambda r: r),
        "INT8 torch._int_mm": (lambda: torch._int_mm(ai, bi_t), lambda r: r),
        "INT8 Triton (lowbit)": (lambda: int8_matmul(ai, bi), lambda r: r),
    }
    flops = 2 * m * n * k
    rows, base = [], None
    for name, (fn, to_int) in paths.items():
        ms = median_ms(fn, iters)
        base = base or ms
        same = None if to_int is None else bool(torch.equal(to_int(fn()).double(), exact))
        rows.append({"bench": "gemm", "path": name, "shape": f"{m}x{n}x{k}", "ms": round(ms, 4),
                     "tflops": round(flops / ms / 1e9, 1), "speedup_vs_bf16": round(base / ms, 3), "exact": same})
    return rows


def bench_fused(m: int, k: int, iters: int) -> list[dict]:
    """The fused kernels alone, and the bytes they move as an effective bandwidth."""
    from lowbit.kernels.bitsplit import split_rows
    from lowbit.kernels.int_gemm import FP8
    from lowbit.kernels.quantize import hadamard_rotate, rotate_quantize

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([12345], device="cuda")  # the bit split draws its noise in-kernel (philox)
    step = torch.tensor([0.05], device="cuda")
    gf = g.float()
    cases = {
        "rotate+quantize x (bf16 -> fp8, writes v)": (lambda: rotate_quantize(x, 32, step, -8, 7, out_dtype=FP8),
                                                     m * k * (2 + 1 + 4)),
        "rotate+quantize x (bf16 -> fp8, no v)": (lambda: rotate_quantize(x, 32, step, -8, 7, out_dtype=FP8,
                                                                          save_v=False), m * k * 3),
        "rotate+quantize per token (2 passes)": (lambda: rotate_quantize(x, 32, None, -8, 7, out_dtype=FP8),
                                                 m * k * 5),
        "inverse Hadamard (fp32)": (lambda: hadamard_rotate(gf, 32, inverse=True), m * k * 8),
        "bit split + norms (bf16 -> 2x fp32)": (lambda: split_rows(g, seed), m * k * (2 + 8)),
        "bit split + norms (bf16 -> 2x fp8)": (lambda: split_rows(g, seed, FP8), m * k * (2 + 2)),
    }
    rows = []
    for name, (fn, nbytes) in cases.items():
        ms = median_ms(fn, iters)
        rows.append({"bench": "fused", "path": name, "shape": f"{m}x{k}", "ms": round(ms, 4),
                     "gbps": round(nbytes / ms / 1e6, 1)})
    return rows


def with_sampling(mode: str | None, fn):
    """``fn`` run under ``LOWBIT_SAMPLING=mode`` (None: as set)."""
    if mode is None:
        return fn

    def run():
        old = os.environ.get("LOWBIT_SAMPLING")
        os.environ["LOWBIT_SAMPLING"] = mode
        try:
            return fn()
        finally:
            os.environ.pop("LOWBIT_SAMPLING") if old is None else os.environ.__setitem__("LOWBIT_SAMPLING", old)
    return run


def bench_layer(tokens: int, width: int, iters: int, seed: int, compare: bool = False) -> list[dict]:
    """Forward + backward of one linear layer: bf16 ``nn.Linear`` vs the 4-bit HQ+LSS layer (fp32 master weight,
    bf16 autocast, as in training)."""
    from lowbit.train.config import TrainQuantConfig
    from lowbit.train.linear import QuantTrainLinear

    torch.manual_seed(seed)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    dense = nn.Linear(width, width, bias=False, device="cuda", dtype=torch.bfloat16)

    def run_dense():
        dense(x).backward(gy)

    layers = {"4-bit HQ+LSS (ratio 0.5)": (TrainQuantConfig(), None),
              "4-bit HQ, no sampling (ratio 1)": (TrainQuantConfig(sampling_ratio=1.0), None)}
    if compare:
        layers["4-bit HQ+LSS (ratio 0.5), reference sampling"] = (TrainQuantConfig(), "reference")
        layers["4-bit HQ, no sampling (ratio 1), reference sampling"] = (TrainQuantConfig(sampling_ratio=1.0),
                                                                         "reference")
    base = median_ms(run_dense, iters)
    rows = [{"bench": "layer", "path": "bf16 nn.Linear", "shape": f"{tokens}x{width}x{width}", "ms": round(base, 4),
             "speedup_vs_bf16": 1.0}]
    for name, (cfg, mode) in layers.items():
        layer = QuantTrainLinear(nn.Linear(width, width, bias=False, device="cuda"), cfg)

        def run_quant(layer=layer):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(gy)

        ms = median_ms(with_sampling(mode, run_quant), iters)
        rows.append({"bench": "layer", "path": name, "shape": f"{tokens}x{width}x{width}", "ms": round(ms, 4),
                     "speedup_vs_bf16": round(base / ms, 3)})
    return rows


def bench_layer_parts(tokens: int, width: int, iters: int) -> list[dict]:
    """Where the 4-bit layer's time goes: each part of its forward and backward timed alone (HQ+LSS, ratio 0.5)."""
    import lowbit.train.backward as bwd
    from lowbit.kernels.int_gemm import FP8
    from lowbit.train.dispatch import int_matmul_scaled
    from lowbit.kernels.lsq_inverse import lsq_backward_inverse
    from lowbit.train.hq import Rotation, rotate_quantize

    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(width, width, device="cuda") * 0.02
    g = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    rot, gen = Rotation(32, 0, None), torch.Generator(device="cuda").manual_seed(0)
    sx, sw = torch.tensor([0.05], device="cuda"), torch.tensor([0.002], device="cuda")
    qx, qw = rotate_quantize(x, rot, sx, 4, FP8), rotate_quantize(w, rot, sw, 4, FP8)
    xq, wq = qx.q, qw.q  # the forward's float8 operands, as the layer's backward reads them
    rows, weight, sq = bwd.split_rows_with_norms(g, gen)
    gxh = torch.randn(tokens, width, device="cuda")
    parts = {
        "fwd: rotate+quantize x (writes v)": lambda: rotate_quantize(x, rot, sx, 4, FP8),
        "fwd: rotate+quantize W": lambda: rotate_quantize(w, rot, sw, 4, FP8),
        "fwd: FP8 GEMM + epilogue scale": lambda: int_matmul_scaled(qx.q, qw.q, qx.step * qw.step),
        "bwd: bit split + norms (reads bf16 grad_y)": lambda: bwd.split_rows_with_norms(g, gen),
        "bwd: grad-input (sample + gathered GEMM, scattered)": lambda: bwd.int4_grad_input(rows, weight, wq, 0.5, gen, 4, sq),
        "bwd: grad-weight (sample + one K-gathered GEMM)": lambda: bwd.int4_grad_weight(rows, weight, xq, 0.5, gen, 4, sq),
        "bwd: LSQ backward x + inverse Hadamard (fused, bf16 out)": lambda: lsq_backward_inverse(
            gxh, qx.v, qx.step, 32, None, 0, -8, 7, None, torch.bfloat16),
    }
    return [{"bench": "layer_part", "path": name, "shape": f"{tokens}x{width}x{width}",
             "ms": round(median_ms(fn, iters), 4)} for name, fn in parts.items()]


def bench_backward_detail(tokens: int, width: int, iters: int, compare: bool = False) -> list[dict]:
    """The sampled backward's pieces (not in the parts' sum): grad-weight with sampling off (all 2N split rows in
    the reduction) vs on, and its packed GEMM alone over N kept rows (the floor: about one INT8 GEMM)."""
    import lowbit.train.backward as bwd
    from lowbit.kernels import sampled_gemm

    g = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16).float()
    xq = torch.randint(-8, 8, (tokens, width), device="cuda", dtype=torch.int8)
    wq = torch.randint(-8, 8, (width, width), device="cuda", dtype=torch.int8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, weight, sq = bwd.split_rows_with_norms(g, gen)
    index = torch.randperm(2 * tokens, device="cuda")
    ends = torch.tensor([tokens // 2, tokens, tokens], device="cuda")  # N kept rows, hi and lo groups
    w = weight[[0, -1]]
    cases = {
        "grad-weight, ratio 0.5": lambda: bwd.int4_grad_weight(rows, weight, xq, 0.5, gen, 4, sq),
        "grad-weight, ratio 1 (2N rows reduced)": lambda: bwd.int4_grad_weight(rows, weight, xq, 1.0, gen, 4, sq),
        "grad-weight pack + GEMM only, N kept rows": lambda: sampled_gemm.grad_weight_gemm(rows, xq, index, ends, w),
        "grad-input, ratio 0.5": lambda: bwd.int4_grad_input(rows, weight, wq, 0.5, gen, 4, sq),
        "grad-input, ratio 1": lambda: bwd.int4_grad_input(rows, weight, wq, 1.0, gen, 4, sq),
        "int8 transpose of W (grad-input operand)": lambda: sampled_gemm.transpose_int8(wq),
    }
    if compare:
        for name in [n for n in cases if n.startswith("grad-")]:
            cases[name + ", reference sampling"] = with_sampling("reference", cases[name])
    return [{"bench": "backward_detail", "path": name, "shape": f"{tokens}x{width}x{width}",
             "ms": round(median_ms(fn, iters), 4)} for name, fn in cases.items()]


def build_training(args, quant: bool):
    """The LM run's model (converted to 4-bit HQ+LSS when ``quant``), AdamW with its schedule, the training bytes,
    the batch generator and the parameter count: the same for both paths, from one seed."""
    from lowbit.train.config import preset
    from lowbit.train.convert import convert
    from lowbit.train.lm import LMShape, build_lm, byte_splits
    from lowbit.train.optim import param_groups, warmup_schedule

    shape = LMShape(hidden=args.hidden, layers=args.layers, heads=args.heads, intermediate=args.intermediate,
                    seqlen=args.seqlen)
    model = build_lm(shape, args.seed, "cuda")
    params = sum(p.numel() for p in model.parameters())
    if quant:
        convert(model, preset("hq-lss4", seed=args.seed))
    train_ids, _ = byte_splits(["wikitext2", "lambada", "ptb"], args.seqlen)
    opt = torch.optim.AdamW(param_groups(model, args.lr))
    gen = torch.Generator().manual_seed(args.seed)
    return model, opt, warmup_schedule(opt, args.steps), train_ids.cuda(), gen, params


def train_run(args, quant: bool, graph: bool) -> tuple[list[float], list[float], int]:
    """``args.steps`` bf16-autocast AdamW steps (gradients clipped at 1) from one seed on the same byte windows,
    eager or as one CUDA graph per step (``lowbit.train.graphs``); per-step losses and times (ms)."""
    from lowbit.train.graphs import GraphedTrainStep, GraphStepConfig, make_capturable
    from lowbit.train.lm import lm_loss, random_windows

    model, opt, sched, train_ids, gen, params = build_training(args, quant)
    if graph:
        make_capturable(opt, "cuda")
    step = GraphedTrainStep(model, opt, lm_loss, GraphStepConfig(enabled=graph))
    losses, times = [], []
    model.train()
    for _ in range(args.steps):
        batch = random_windows(train_ids, args.batch_size, args.seqlen, gen)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses.append(step(batch))
        sched.step()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    del model, opt, sched, step  # the schedule holds the optimiser, which holds the parameters
    torch.cuda.empty_cache()
    return [float(v) for v in losses], [s.elapsed_time(e) for s, e in times], params


def bench_lm(args) -> list[dict]:
    """bf16 and 4-bit steps, eager, and with ``--graph`` also captured; each ratio against bf16 run the same way."""
    skip = min(10, args.steps // 2)  # warm-up steps (compilation, LSQ init, capture, allocator) are not timed
    rows = []
    for graph in (False, True) if args.graph else (False,):
        base = None
        for path, quant in (("bf16", False), ("4-bit HQ+LSS", True)):
            losses, times, params = train_run(args, quant, graph)
            ms = statistics.median(times[skip:])
            base = base or ms
            rows.append({"bench": "lm_step", "path": path + (", CUDA graph" if graph else ""), "graph": graph,
                         "params_m": round(params / 1e6, 1), "ms": round(ms, 3),
                         "speedup_vs_bf16": round(base / ms, 3), "timed_steps": len(times) - skip,
                         "tokens_per_step": args.batch_size * args.seqlen, "losses": [round(v, 4) for v in losses]})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise LowbitError("benchmarks/train_kernels.py needs a CUDA GPU (the kernels' CPU tests live in tests/kernels)")
    os.environ.setdefault("LOWBIT_KERNELS", "auto")
    device = torch.cuda.get_device_name()
    rows, fused = [], []
    if not (args.layer_only or args.lm_only):
        rows = bench_gemms(args.tokens, args.width, args.width, args.iters)
        print_markdown(["GEMM", "shape", "ms", "TFLOP/s", "x bf16", "exact"],
                       [f"| {r['path']} | {r['shape']} | {r['ms']} | {r['tflops']} | {r['speedup_vs_bf16']} | "
                        f"{r['exact']} |" for r in rows])
        fused = bench_fused(args.tokens, args.width, args.iters)
        print_markdown(["fused kernel", "shape", "ms", "GB/s"],
                       [f"| {r['path']} | {r['shape']} | {r['ms']} | {r['gbps']} |" for r in fused])
    if not args.lm_only:
        rows += fused + bench_layer_group(args)
    if not (args.skip_lm or args.layer_only):
        lm = bench_lm(args)
        print_markdown(["LM training step", "params (M)", "ms/step", "x bf16 run the same way (goal 1.25)"],
                       [f"| {r['path']} | {r['params_m']} | {r['ms']} | {r['speedup_vs_bf16']} |" for r in lm])
        marks = sorted({0, *range(9, args.steps, 10), args.steps - 1})
        print_markdown(["step", *(f"loss {r['path']}" for r in lm)],
                       [f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.4f}" for r in lm) + " |" for i in marks])
        rows += lm
    for r in rows:
        r["device"] = device
    write_json(rows, args.out if not args.quick else args.out.with_name("train_kernels_quick.json"))
    return 0


def bench_layer_group(args) -> list[dict]:
    """The layer, its parts and the backward detail, printed as they come."""
    layer = bench_layer(args.tokens, args.width, args.iters, args.seed, args.compare_sampling)
    print_markdown(["layer fwd+bwd", "shape", "ms", "x bf16 (goal 1.5)"],
                   [f"| {r['path']} | {r['shape']} | {r['ms']} | {r['speedup_vs_bf16']} |" for r in layer])
    parts = bench_layer_parts(args.tokens, args.width, args.iters)
    print_markdown(["4-bit layer part", "shape", "ms"], [f"| {r['path']} | {r['shape']} | {r['ms']} |" for r in parts]
                   + [f"| sum of parts | | {round(sum(r['ms'] for r in parts), 4)} |"])
    detail = bench_backward_detail(args.tokens, args.width, args.iters, args.compare_sampling)
    print_markdown(["4-bit backward detail", "shape", "ms"], [f"| {r['path']} | {r['shape']} | {r['ms']} |" for r in detail])
    return layer + parts + detail


if __name__ == "__main__":
    raise SystemExit(main())
