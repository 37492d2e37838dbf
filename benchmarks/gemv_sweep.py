"""W4A16 batch-1 GEMV sweep: every config of ``lowbit``'s GEMV against bf16/fp16 cuBLAS and torch's int4 tinygemm.

    export PYTHONPATH=$PWD/src; python benchmarks/gemv_sweep.py --out $OUT/gemv_sweep.json   # H100: ~2-3 min
    python benchmarks/gemv_sweep.py --quick        # bf16, group 128 only (--quick --fp16: and fp16, group 128)
    python benchmarks/gemv_sweep.py --old FILE     # also time an older w4a16_gemv.py (its candidates and _launch)

    # new kernel vs the committed one vs tinygemm vs bf16 in one run (H100, ~2 min):
    git show HEAD:src/lowbit/kernels/w4a16_gemv.py > $OUT/old_gemv.py
    PYTHONPATH=$PWD/src python benchmarks/gemv_sweep.py --quick --old $OUT/old_gemv.py --out $OUT/gemv_sweep.json

M = 1, shapes (N out, K in) 4096x4096, 11008x4096, 4096x11008, 14336x4096 (plus 1024x4096, narrow enough that the
GEMV splits K), group 128 and per-channel, bf16 and fp16 activations. Per case, in the same run: dense cuBLAS
``F.linear`` in the activation dtype, tinygemm ``_weight_int4pack_mm`` (bf16, group 128 only), the autotuned
``w4a16_linear`` (what callers get), and every config ``w4a16_gemv.candidates`` lists for the case's step kinds
(``step_kinds``: the inline-PTX step of ``w4a16_gemv_asm``, asm True, and the plain-Triton one, asm False; with
``--tuned-only`` the tuned tile with each), launched directly. Each row records the tuned config, the step it runs
("tuned_step": ptx or plain) and the fastest config of each step ("best_by_step"). Timing as in
``inference_kernels.py`` (whose helpers this reuses): CUDA graphs cycling through enough weight copies to miss
the 50 MB L2, CUDA events, warm-up, median of >= 30 replays. Each config's output is checked against the float32
reference with the tests' bound (|error| <= tol * |x| @ |W|^T), for determinism (two eager calls, same bits) and
for CUDA-graph safety (a captured call replayed three times gives the eager bits). A config that fails prints n/a
and its error; the others still run. JSON to benchmarks/results/gemv_sweep.json (``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from inference_kernels import ROTATE_BYTES, Config, median_us, rel_error, short, tinygemm_weight  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.report import print_markdown, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (1024, 4096)]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # tests/kernels/test_w4a16.py


def label(kind: str, config) -> str:
    return f"{kind} {','.join(map(str, config))}"


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("old_w4a16_gemv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(y, x, weight) -> float:
    """The largest |error| / bound of the tests' check (<= 1 passes)."""
    truth = F.linear(x.float(), weight.dequantize())
    bound = TOL[x.dtype] * (x.float().abs() @ weight.dequantize().abs().T) + 1e-6
    return float(((y.float() - truth).abs() / bound).max())


def graph_bits(launch, y) -> bool:
    """A captured launch replayed three times writes the eager result's bits each time."""
    launch()
    torch.cuda.synchronize()
    eager = y.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    same = True
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        same &= bool(torch.equal(y, eager))
    return same


def bench_case(n, k, group, dtype, cfg: Config, old, all_configs: bool) -> dict:
    from lowbit.kernels import PackedWeight, w4a16_linear
    from lowbit.kernels import w4a16, w4a16_gemv as G

    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    weight = PackedWeight.quantize(w, 4, group)
    x = torch.randn(1, k, device="cuda", generator=gen).to(dtype)
    copies = max(1, min(32, ROTATE_BYTES // (n * k * 2)))
    packed = [weight] + [PackedWeight(weight.packed.clone(), weight.scales.clone(), weight.zeros.clone(), 4, group,
                                      k, n) for _ in range(copies * 4 - 1)]
    layouts = [w4a16.prepare_w4a16(p, dtype) for p in packed]
    times, errors, failures, checks = {}, {}, {}, {}

    def timed(name, calls):
        try:
            times[name] = median_us(calls, cfg)
        except Exception as err:  # noqa: BLE001 - one failing method must not hide the others
            failures[name] = short(err)
            print(f"  {name}: n/a ({failures[name]})", flush=True)

    dense = [weight.dequantize(dtype) for _ in range(copies)]
    timed("dense_cublas", [lambda d=d: F.linear(x, d) for d in dense])
    del dense
    if group == 128 and dtype == torch.bfloat16:
        try:
            tiny = [tinygemm_weight(p, group) for p in packed]
            errors["tinygemm_rel_error"] = rel_error(torch.ops.aten._weight_int4pack_mm(x, tiny[0][0], group,
                                                                                         tiny[0][1]),
                                                     F.linear(x.float(), weight.dequantize()))
            timed("tinygemm", [lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], group, t[1]) for t in tiny])
            del tiny
        except Exception as err:  # noqa: BLE001 - op missing or changed in this torch
            failures["tinygemm"] = short(err)
    timed("lowbit_tuned", [lambda p=p: w4a16_linear(x, p) for p in packed])
    key = next((key for key in G._tuned if key[:2] == (n, k) and key[3] == group and key[4] == dtype), None)
    tuned = G._tuned.get(key)
    meta_dtype = layouts[0].scales.dtype

    def step(config) -> str:  # the step a config of this module runs in this case
        return "ptx" if G.uses_asm(config, dtype, meta_dtype) else "plain"

    if "lowbit_tuned" in times:
        checks["lowbit_tuned"] = check(w4a16_linear(x, weight), x, weight)

    y = torch.empty((1, n), dtype=dtype, device="cuda")
    steps = G.step_kinds(dtype, meta_dtype)
    mine = G.candidates(layouts[0], steps) if all_configs else [tuned[:5] + (s,) for s in steps] if tuned else []
    configs = [("new", c, G._launch) for c in mine]  # --tuned-only: the tuned tile with each step
    step_of = {label("new", c): step(c) for c in mine}
    if old is not None:
        old_configs = old.candidates(layouts[0]) if hasattr(old, "candidates") else old.CONFIGS
        configs += [("old", c, old._launch) for c in old_configs]
    for kind, config, launch in configs:
        name = label(kind, config)
        try:
            def one(layout=layouts[0], launch=launch, config=config):
                launch(x, layout, None, y, config)
            one()
            first = y.clone()
            one()
            checks[name] = check(y, x, weight)
            errors[name] = {"deterministic": bool(torch.equal(first, y)), "graph_replay_same_bits": graph_bits(one, y)}
        except Exception as err:  # noqa: BLE001 - a config that does not compile is reported, not fatal
            failures[name] = short(err)
            print(f"  {name}: n/a ({failures[name]})", flush=True)
            continue
        timed(name, [lambda lay=lay, launch=launch, config=config: launch(x, lay, None, y, config) for lay in layouts])
    base = times.get("dense_cublas", float("nan"))
    new = {key: t for key, t in times.items() if key.startswith("new ")}
    by_step = {}  # step -> the name of its fastest "new" config
    for name in sorted(new, key=new.get):
        by_step.setdefault(step_of[name], name)
    old_t = {key: t for key, t in times.items() if key.startswith("old ")}
    row = {"n": n, "k": k, "m": 1, "group": group, "dtype": str(dtype).replace("torch.", ""), "us": times,
           "speedup_vs_dense": {key: base / t for key, t in times.items()}, "tuned_config": tuned,
           "tuned_step": step(tuned) if tuned else None, "best_by_step": by_step,
           "best_new": min(new, key=new.get) if new else None, "best_old": min(old_t, key=old_t.get) if old_t else None,
           "error_over_bound": checks, "checks": errors, "failures": failures, "weight_copies_cycled": len(packed),
           "all_pass": all(v <= 1 for v in checks.values()) and all(
               all(c.values()) for c in errors.values() if isinstance(c, dict))}
    del packed, layouts
    torch.cuda.empty_cache()
    return row


def print_table(rows):
    def cell(row, key):
        if key is None or key not in row["us"]:
            return "n/a"
        t = row["us"][key]
        return f"{t:.1f}" if key == "dense_cublas" else f"{t:.1f} ({row['speedup_vs_dense'][key]:.2f}x)"

    print_markdown(
        ["N x K", "dtype", "group", "dense cuBLAS us", "tinygemm", "old best", "new tuned", "tuned config",
         "tuned step", "best ptx", "best plain", "new best", "best config", "checks pass"],
        [f"| {r['n']}x{r['k']} | {r['dtype']} | {r['group']} | {cell(r, 'dense_cublas')} | {cell(r, 'tinygemm')} | "
         f"{cell(r, r['best_old'])} | {cell(r, 'lowbit_tuned')} | {r['tuned_config']} | {r['tuned_step']} | "
         f"{cell(r, r['best_by_step'].get('ptx'))} | {cell(r, r['best_by_step'].get('plain'))} | "
         f"{cell(r, r['best_new'])} | {r['best_new']} | {r['all_pass']} |" for r in rows])
    print("\n(us per call, speedup over dense cuBLAS in the activation dtype in parentheses)\n")
    for r in rows:
        ranked = sorted((t, key) for key, t in r["us"].items() if key.startswith(("new ", "old ")))
        print(f"{r['n']}x{r['k']} {r['dtype']} g{r['group']}: " + ", ".join(f"{key} {t:.1f}" for t, key in ranked))
        for key, why in r["failures"].items():
            print(f"  n/a {key}: {why}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="bf16, group 128 only")
    p.add_argument("--fp16", action="store_true", help="with --quick: fp16, group 128 as well")
    p.add_argument("--tuned-only", action="store_true", help="time the autotuned call, not every config")
    p.add_argument("--old", type=Path, help="an older w4a16_gemv.py to time too (its candidates through its _launch)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "gemv_sweep.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise LowbitError("benchmarks/gemv_sweep.py needs a CUDA GPU")
    if a.iters < 30:
        raise LowbitError(f"--iters must be at least 30, got {a.iters}")
    import triton

    from lowbit.kernels.w4a16_gemv_asm import asm_supported

    old = load_old(a.old) if a.old else None
    cfg = Config(tuple(SHAPES), (1,), a.iters, a.warmup, 128, True, a.seed)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "argv": sys.argv[1:], "iters": a.iters, "asm_path": asm_supported(torch.bfloat16, torch.bfloat16)}
    rows, start = [], time.time()
    cases = [(torch.bfloat16, 128)] + ([(torch.float16, 128)] if a.quick and a.fp16 else [] if a.quick else
                                      [(torch.bfloat16, 0), (torch.float16, 128), (torch.float16, 0)])
    for dtype, group in cases:
        for n, k in SHAPES:
            g = group or k
            print(f"{n}x{k} {dtype} group {g} ({time.time() - start:.0f} s)", flush=True)
            try:
                rows.append(bench_case(n, k, g, dtype, cfg, old, not a.tuned_only))
            except Exception as err:  # noqa: BLE001
                print(f"  case failed: {short(err)}", flush=True)
                rows.append({"n": n, "k": k, "group": g, "dtype": str(dtype), "case_error": short(err)})
    ok = [r for r in rows if "us" in r]
    print_table(ok)
    meta["seconds"] = time.time() - start
    print(f"\n{meta['seconds']:.0f} s in all")
    write_json([{"meta": meta}] + rows, a.out)


if __name__ == "__main__":
    main()
