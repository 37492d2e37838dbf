"""What limits the kernels behind issue 5's goals: Nsight Compute hardware counters, one case at a time.

    PYTHONPATH=$PWD/src python benchmarks/ncu_profile.py --out $OUT/ncu_profile.json      # H100, ~3-5 minutes
    PYTHONPATH=$PWD/src python benchmarks/ncu_profile.py --cases gemv_4096x4096           # one case

Each case builds its inputs, runs its calls a few times (Triton's autotuning happens there, outside the profiled
range), then runs each call once between ``cudaProfilerStart`` and ``cudaProfilerStop``. The script starts itself
under ``ncu --profile-from-start off --clock-control none`` once per case (METHOD.md: leave the clocks alone; ncu's
default cache control flushes L2 before every kernel, so a GEMV reads its weight from DRAM as in decode), exports
the raw page as CSV, and keeps per kernel what says where its time goes: duration, DRAM and SM throughput as % of
peak, achieved and theoretical occupancy, registers per thread, grid and block, L2 hit rate, bytes read from DRAM,
the tensor-pipe utilisation where the counter exists, cycles per issued instruction and the largest warp-stall
reasons (cycles a warp waits per issued instruction). The raw CSVs go beside the JSON (``<out stem>_csv/``).

Cases (``--cases``, default all):
- ``gemv_<N>x<K>``: W4A16 batch-1 GEMV (bf16, group 128): ``lowbit``'s tuned kernel, torch's tinygemm, bf16 cuBLAS.
- ``w4a4_<N>x<K>_m<M>``: W4A4 default path (per-token activation quantization + INT8 GEMM), bf16 cuBLAS, and
  cuBLAS FP8 ``_scaled_mm`` on the same codes (the ceiling).
- ``train_layer``: the 4-bit training layer (HQ+LSS, 8192 tokens, 4096x4096) forward + backward, and bf16 nn.Linear.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = ("gemv_4096x4096", "gemv_11008x4096", "w4a4_4096x4096_m2048", "w4a4_4096x11008_m2048", "train_layer")
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis",
            "ComputeWorkloadAnalysis", "SchedulerStats")
KEEP = {  # raw metric -> short name in the summary
    "gpu__time_duration.sum": "duration",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "memory_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "launch__registers_per_thread": "registers",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
    "launch__shared_mem_per_block": "shared_mem_per_block",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
    "dram__bytes.sum.per_second": "dram_bandwidth",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles_per_issued_inst",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_slots_busy_pct",
    "inst_executed": "warp_instructions",
    "launch__waves_per_multiprocessor": "waves",
    "launch__occupancy_limit_registers": "blocks_per_sm_by_registers",
}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
CALL_NAMES = {"gemv": ["lowbit_w4a16", "tinygemm", "bf16"], "w4a4": ["lowbit_w4a4", "bf16", "cublas_fp8"],
              "train": ["hq_lss4", "bf16"]}  # the NVTX ranges of each case
TENSOR = re.compile(r"sm__inst_executed_pipe_tensor_op_(\w+)\.avg\.pct_of_peak_sustained_active")


# ------------------------------------------------------------------------------------------------ the cases
def _profiled(calls: dict, warmup: int = 3) -> None:
    """Warm every call up (autotuning), then run each once inside the profiled range."""
    import torch

    for _ in range(warmup):
        for call in calls.values():
            call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, call in calls.items():
        torch.cuda.nvtx.range_push(name)
        call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()


def _gemv(n: int, k: int) -> dict:
    import torch
    import torch.nn.functional as F
    from inference_kernels import tinygemm_weight

    from lowbit.kernels import PackedWeight, w4a16_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = PackedWeight.quantize(torch.randn(n, k, device="cuda", generator=gen) / k**0.5, 4, 128)
    dense = w.dequantize(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    tiny, tiny_scales = tinygemm_weight(w, 128)
    return {"lowbit_w4a16": lambda: w4a16_linear(x, w),
            "tinygemm": lambda: torch.ops.aten._weight_int4pack_mm(x, tiny, 128, tiny_scales),
            "bf16": lambda: F.linear(x, dense)}


def _w4a4(n: int, k: int, m: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lowbit.kernels import PackedWeight, wxax_linear
    from lowbit.kernels.w4a4 import prepare_wxax, quantize_activations

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = PackedWeight.quantize(torch.randn(n, k, device="cuda", generator=gen) / k**0.5, 4, k)
    dense = w.dequantize(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    acts = quantize_activations(x, 4, False, k)
    a8 = acts.codes.to(torch.float8_e4m3fn)
    b8 = prepare_wxax(w, unpacked=True).qweight.to(torch.float8_e4m3fn)
    sx, sw = acts.scale[:, None].contiguous(), w.scales.T.contiguous().float()
    return {"lowbit_w4a4": lambda: wxax_linear(x, w, 4, False),
            "bf16": lambda: F.linear(x, dense),
            "cublas_fp8": lambda: torch._scaled_mm(a8, b8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)}


def _train_layer(tokens: int = 8192, width: int = 4096) -> dict:
    import torch
    from torch import nn
    from train_profile import layer_step

    from lowbit.train import QuantTrainLinear, TrainQuantConfig

    torch.manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    dense = nn.Linear(width, width, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = QuantTrainLinear(nn.Linear(width, width, bias=False, device="cuda"), TrainQuantConfig(seed=0))
    return {"hq_lss4": layer_step(quant, x, grad, True), "bf16": layer_step(dense, x, grad, False)}


def build(case: str) -> dict:
    if m := re.fullmatch(r"gemv_(\d+)x(\d+)", case):
        return _gemv(int(m[1]), int(m[2]))
    if m := re.fullmatch(r"w4a4_(\d+)x(\d+)_m(\d+)", case):
        return _w4a4(int(m[1]), int(m[2]), int(m[3]))
    if case == "train_layer":
        return _train_layer()
    raise SystemExit(f"unknown case {case!r}: use gemv_<N>x<K>, w4a4_<N>x<K>_m<M> or train_layer")


# ------------------------------------------------------------------------------------------------ ncu and its CSV
def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text or None


def summarise(raw_csv: str, names: list[str]) -> list[dict]:
    """One dict per profiled kernel: its call (the NVTX range among ``names``), the KEEP metrics (with units),
    tensor-pipe use and the top warp stalls."""
    rows = list(csv.reader(io.StringIO(raw_csv)))
    start = next((i for i, r in enumerate(rows) if r and r[0] == "ID"), None)
    if start is None or start + 1 >= len(rows) or "Kernel Name" not in rows[start]:
        raise ValueError("not an ncu raw-page CSV (no header row with 'ID' and 'Kernel Name')")
    header, units, data = rows[start], rows[start + 1], rows[start + 2:]
    col = {name: i for i, name in enumerate(header)}
    kernels, current = [], None
    for r in data:
        if len(r) != len(header):
            continue
        nvtx = " ".join(r[i] for h, i in col.items() if "nvtx" in h.lower() or "push/pop" in h.lower())
        # the autograd engine's thread sees no NVTX range: a backward kernel belongs to the call launched before it
        current = next((name for name in names if name in nvtx), current)
        out = {"range": current, "kernel": r[col["Kernel Name"]][:160]}
        for metric, short in KEEP.items():
            if metric in col:
                out[short] = _number(r[col[metric]])
                if units[col[metric]]:
                    out[f"{short}_unit"] = units[col[metric]]
        tensor = [(h, _number(r[i])) for h, i in col.items() if TENSOR.fullmatch(h)]
        out["tensor_pipe_pct"] = {TENSOR.fullmatch(h)[1]: v for h, v in tensor if isinstance(v, float) and v > 0}
        stalls = {STALL.fullmatch(h)[1]: _number(r[i]) for h, i in col.items() if STALL.fullmatch(h)}
        stalls = {k: v for k, v in stalls.items() if isinstance(v, float) and not k.endswith("_not_issued")}
        out["top_stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:5])
        kernels.append(out)
    return kernels


def profile_case(case: str, names: list[str], csv_dir: Path, ncu: str) -> list[dict]:
    """Run this script's ``--run-case`` under ncu, export the raw page, summarise it."""
    rep = csv_dir / f"{case}.ncu-rep"
    rep.unlink(missing_ok=True)  # a stale report must not pass for this run's
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--nvtx", "--force-overwrite",
           "--target-processes", "all", "-o", str(rep.with_suffix(""))]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, __file__, "--run-case", case]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=1800)
    if done.returncode != 0 or not rep.exists():
        raise RuntimeError(f"ncu failed on {case} (exit {done.returncode}): {done.stderr[-800:]}{done.stdout[-800:]}")
    exported = subprocess.run([ncu, "--import", str(rep), "--csv", "--page", "raw"], capture_output=True, text=True)
    if exported.returncode != 0:
        raise RuntimeError(f"ncu --import failed on {rep} (exit {exported.returncode}): {exported.stderr[-800:]}")
    raw = exported.stdout
    (csv_dir / f"{case}.csv").write_text(raw)
    return summarise(raw, names)


def names_for(case: str) -> list[str]:
    kind = case.split("_")[0]
    if kind not in CALL_NAMES:
        raise ValueError(f"unknown case {case!r}: names start with one of {', '.join(CALL_NAMES)}")
    return CALL_NAMES[kind]


def device_of(raw_csv: str) -> str | None:
    """The GPU's name as ncu recorded it (the raw page's device__attribute_display_name column)."""
    rows = [r for r in csv.reader(io.StringIO(raw_csv)) if r]
    start = next((i for i, r in enumerate(rows) if r[0] == "ID"), None)
    if start is None or "device__attribute_display_name" not in rows[start] or len(rows) < start + 3:
        return None
    return rows[start + 2][rows[start].index("device__attribute_display_name")]


def print_case(case: str, kernels: list[dict]) -> None:
    for kern in kernels:
        print(f"{case} [{kern['range']}] {kern['kernel'][:60]}: {kern.get('duration')} "
              f"{kern.get('duration_unit', '')}, dram {kern.get('dram_pct')}%, sm {kern.get('sm_pct')}%, "
              f"occ {kern.get('achieved_occupancy_pct')}%, regs {kern.get('registers')}, "
              f"stalls {kern['top_stalls']}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default results/ncu_profile.json; with --from-csv: <csv folder without _csv>.json)")
    p.add_argument("--from-csv", type=Path, default=None,
                   help="summarise the raw CSVs of an earlier run (a folder of <case>.csv) again; needs no GPU")
    p.add_argument("--run-case", help=argparse.SUPPRESS)  # internal: the process ncu profiles
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    if args.run_case:
        _profiled(build(args.run_case))
        return 0
    result = {"sections": list(SECTIONS), "cases": {}, "failures": {}}
    if args.from_csv is not None:
        if args.out is None:
            args.out = args.from_csv.with_name(args.from_csv.name.removesuffix("_csv") + ".json")
        result["from_csv"] = str(args.from_csv)
        for path in sorted(args.from_csv.glob("*.csv")):
            text = path.read_text()
            try:
                result["cases"][path.stem] = summarise(text, names_for(path.stem))
            except ValueError as err:
                raise SystemExit(f"{path}: {err}") from None
            result.setdefault("device", device_of(text))
            print_case(path.stem, result["cases"][path.stem])
    else:
        args.out = args.out or RESULTS / "ncu_profile.json"
        ncu = shutil.which("ncu")
        import torch

        if ncu is None or not torch.cuda.is_available():
            raise SystemExit("ncu_profile.py needs a CUDA GPU and Nsight Compute's `ncu` on PATH (or --from-csv)")
        result.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
        csv_dir = args.out.parent / f"{args.out.stem}_csv"
        csv_dir.mkdir(parents=True, exist_ok=True)
        for case in args.cases:
            try:
                result["cases"][case] = profile_case(case, names_for(case), csv_dir, ncu)
            except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
                result["failures"][case] = f"{type(err).__name__}: {str(err)[-600:]}"
                print(f"{case}: failed: {result['failures'][case]}", flush=True)
                continue
            print_case(case, result["cases"][case])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
