"""WikiText-2 perplexity of PTQ methods on one model, with calibration time per block and peak GPU memory.

    python benchmarks/ptq_table.py --model $LOWBIT_MODEL --device cuda \
        --runs rtn:W4A4,omniquant:W4A4,affinequant:W4A4 --nsamples 128 --epochs 20

Each run starts from a fresh copy of the full-precision model. ``--parallel N`` calibrates N runs at once, one
thread and CUDA stream each: a 135M model's block leaves most of an H100 idle, so this multiplies throughput
(``--tf32`` adds TF32 matmuls to that). Writes benchmarks/results/ptq_table.json and prints a markdown table.
Calibration text: WikiText-2 *validation* (never the test split that is scored).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import re
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit import QuantConfig, load_model, quantize
from lowbit.config import GPTQ_GRIDS, ROTATIONS, SCALE_INITS, SCALE_LEARNING_METHODS
from lowbit.eval import EvalOptions
from lowbit.ptq.recipes import default_epochs, default_let_lr, default_weight_lr
from lowbit.report import eval_and_record, print_markdown, write_json


def _flag(text: str) -> bool:
    if text not in ("true", "false"):
        raise SystemExit(f"expected true or false, got {text!r}")
    return text == "true"


# options one run may set for itself (``affinequant:W4A4@rotate=inputs``), over the command's flags
RUN_OPTIONS = {"rotate": str, "weight_lr": float, "let_lr": float, "epochs": int, "scale_init": str,
               "e2e_epochs": int, "e2e_lr": float,
               "norm_matrices": _flag, "mlp_scales": _flag}


def parse_run(text: str, args) -> QuantConfig:
    """``METHOD:W4A16g64``; ``METHOD+gptq:...`` rounds the calibrated weights by GPTQ (``gptq:...`` alone: GPTQ
    without transforms). GPTQ settings come from ``--gptq-grid`` / ``--gptq-act-order`` where ``args`` has them.
    ``@key=value`` suffixes set one of ``RUN_OPTIONS`` for this run only (``affinequant:W4A16@weight_lr=1e-4``)."""
    text, *options = text.split("@")
    overrides = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in RUN_OPTIONS or not value:
            raise SystemExit(f"bad run option {option!r}; expected KEY=VALUE with KEY one of {', '.join(RUN_OPTIONS)}")
        overrides[key] = RUN_OPTIONS[key](value)
    return dataclasses.replace(_parse_config(text, args), **overrides)


def option_suffix(text: str) -> str:
    """A run's own ``@key=value`` options, sorted, as they name its checkpoint folder and table row ('' if none):
    runs that differ only in them must not share either."""
    return "".join(f"@{option}" for option in sorted(text.split("@")[1:]))


def checkpoint_folder(config: QuantConfig, tag: str) -> str:
    """A run's block-checkpoint folder name. End-to-end tuning runs after the blocks, so it is left out: a run with it
    resumes the blocks of the same run without it (the engine's manifest leaves it out too)."""
    blocks = dataclasses.replace(config, e2e_epochs=0)
    own = "".join(f"@{o}" for o in tag.split("@")[1:] if not o.startswith("e2e_"))
    return f"{blocks.label.replace(' ', '-')}-{blocks.name}{own}"


def _parse_config(text: str, args) -> QuantConfig:
    label, _, name = text.partition(":")
    method, _, rounding = label.partition("+")
    m = re.fullmatch(r"W(\d+)A(\d+)(?:g(\d+))?", name)
    if not m or rounding not in ("", "gptq"):
        raise SystemExit(f"bad run {text!r}; expected METHOD:W4A16g64 or METHOD+gptq:W4A16g64")
    return QuantConfig(method=method, wbits=int(m[1]), abits=int(m[2]), group_size=int(m[3]) if m[3] else None,
                       nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed, rounding=rounding or None, gptq_grid=getattr(args, "gptq_grid", "minmax"),
                       gptq_act_order=getattr(args, "gptq_act_order", True),
                       scale_init=getattr(args, "scale_init", None) if method in SCALE_LEARNING_METHODS else None,
                       let_lr=getattr(args, "let_lr", None), mlp_scales=getattr(args, "mlp_scales", None),
                       norm_matrices=getattr(args, "norm_matrices", None) if method == "affinequant" else None,
                       rotate=getattr(args, "rotate", None),
                       weight_lr=getattr(args, "weight_lr", None) if method in SCALE_LEARNING_METHODS else None)


def _learning(config: QuantConfig, plan) -> dict:
    """What the run's transforms learnt with (nothing for rtn, which learns nothing); ``plan`` is the one it ran."""
    if config.method == "rtn":
        return {}
    return {"let_lr": default_let_lr(config), "lwc_lr": config.lwc_lr, "scale_init": plan.scale_init,
            "mlp_scales": plan.mlp_scales, "norm_matrices": plan.norm_matrices, "weight_lr": default_weight_lr(config)}


@dataclass
class Calibrated:
    loaded: object
    config: QuantConfig
    tag: str  # the run's own options (option_suffix)
    seconds: float  # calibration seconds summed over blocks (restored blocks keep their logged time)
    wall: float
    peak: float | None
    stream: object = None  # the run's CUDA stream when runs share the GPU; its evaluation runs there too


def calibrate_one(fp, config: QuantConfig, tag: str, args, parallel: bool, tf32: bool | None) -> Calibrated:
    """Calibrate a fresh copy of ``fp`` with ``config`` (on its own CUDA stream when runs share the GPU)."""
    loaded = copy.deepcopy(fp)
    cuda = args.device.startswith("cuda")
    stream = torch.cuda.Stream() if cuda and parallel else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if cuda and not parallel:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ckpt = None if args.checkpoint_dir is None else args.checkpoint_dir / checkpoint_folder(config, tag)
        quantize(loaded, config, device=args.device, checkpoint_dir=ckpt, progress=False, tf32=tf32)
        if stream is not None:
            stream.synchronize()
    wall = time.perf_counter() - start
    log = loaded.calibration_log or []
    seconds = sum(e.seconds for e in log) if log else wall
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return Calibrated(loaded, config, tag, seconds, wall, peak, stream)


def evaluate_one(cal: Calibrated, args, options: EvalOptions, parallel: bool, tf32: bool) -> tuple[list[dict], str]:
    """Evaluate a calibrated model on WikiText-2; returns its rows and its table line."""
    loaded, config, tag = cal.loaded, cal.config, cal.tag
    with torch.cuda.stream(cal.stream) if cal.stream is not None else contextlib.nullcontext():
        loaded.model.to(args.device)
        new = eval_and_record(loaded, ["wikitext2"], options, f"{config.label} {config.name}{tag}", config)
        if cal.stream is not None:
            cal.stream.synchronize()
    blocks = len(loaded.adapter.blocks(loaded.model))
    for row in new:
        row.update(method=config.label, run_options=tag, rounding=config.rounding_method,
                   gptq=None if config.rounding_method != "gptq" else {
                       "grid": config.gptq_grid, "act_order": config.gptq_act_order, "damp": config.gptq_damp,
                       "block_size": config.gptq_block_size},
                   calib_seconds=round(cal.seconds, 1), wall_seconds_this_process=round(cal.wall, 1),
                   seconds_per_block=round(cal.seconds / blocks, 2), concurrent_runs=args.parallel,
                   peak_gpu_gib=None if cal.peak is None else round(cal.peak, 2),
                   peak_gpu_scope="whole process, all concurrent runs" if parallel else "this run",
                   gpu_allocated_gib_per_block=[e.gpu_allocated_gib for e in loaded.calibration_log or []],
                   eager_blocks=[e.block for e in loaded.calibration_log or [] if e.cuda_graph is False],
                   e2e=None if loaded.e2e_log is None else {**loaded.e2e_log.to_dict(), "epochs": config.e2e_epochs,
                                                            "lr": config.e2e_lr},
                   recipe={"nsamples": config.nsamples, "seqlen": config.seqlen, **_learning(config, loaded.calibration_plan),
                           "epochs": default_epochs(config), "batch_size": config.batch_size, "tf32": tf32})
    line = (f"| {config.label}{tag} | {config.name} | {new[0]['value']:.3f} | {cal.seconds / blocks:.2f} | "
            f"{'-' if cal.peak is None else f'{cal.peak:.2f}'} |")
    loaded.model.to("cpu")
    return new, line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", required=True,
                   help="comma-separated METHOD:CONFIG, e.g. rtn:W4A4,affinequant:W4A16g64; METHOD+gptq rounds by GPTQ; "
                        "@KEY=VALUE sets an option for one run (affinequant:W4A4@rotate=inputs)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test windows")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window (baselines.md: 2048)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs calibrated at once, one thread and CUDA stream each (full float32 matmuls unless --tf32); "
                        "s/block is then measured with the GPU shared, and peak memory covers all runs together")
    p.add_argument("--tf32", action="store_true",
                   help="with --parallel: every run calibrates with TF32 matmuls (a process-wide switch, so all runs "
                        "calibrate first and are evaluated in full float32 once the last one ends)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="per-block checkpoints (one subfolder per run): a killed run resumes where it stopped")
    p.add_argument("--scale-init", default=None, choices=SCALE_INITS,
                   help="start of the learnt scales of the omniquant / affinequant runs (default: the recipe's)")
    p.add_argument("--norm-matrices", action=argparse.BooleanOptionalAction, default=None,
                   help="affinequant runs: full matrices at the norms, kept as online ops (default: the recipe's; "
                        "other methods ignore it)")
    p.add_argument("--weight-lr", type=float, default=None,
                   help="omniquant / affinequant runs: the weights learn too, at this rate (Block-AP; default: the "
                        "recipe's, 3e-5 for affinequant weight-only, else 0)")
    p.add_argument("--mlp-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="diagonal scales on the MLP's inner pair, up_proj → down_proj (default: the recipe's, on for "
                        "affinequant with activation bits; --no-mlp-scales runs every method as in the papers)")
    p.add_argument("--rotate", default=None, choices=ROTATIONS,
                   help="every run first rotates its linears' inputs or its residual stream (lowbit.transforms.rotation)")
    p.add_argument("--let-lr", type=float, default=None,
                   help="learning rate of scales and matrices (default: the recipe's)")
    p.add_argument("--gptq-grid", default="minmax", choices=GPTQ_GRIDS,
                   help="grid of gptq:... runs (runs after a calibrating method use its learnt clipping)")
    p.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ rounds columns in decreasing Hessian diagonal (default on)")
    p.add_argument("--dtype", default="float32", help="model dtype for calibration and evaluation (default float32)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ptq_table.json")
    args = p.parse_args(argv)

    fp = load_model(args.model, device="cpu", dtype=args.dtype)
    options = EvalOptions(seqlen=args.eval_seqlen, batch_size=8, limit=args.limit, device=args.device, progress=False)
    runs = [(parse_run(text, args), option_suffix(text)) for text in args.runs.split(",")]
    names = [f"{config.label} {config.name}{tag}" for config, tag in runs]
    if len(set(names)) < len(names):
        raise SystemExit(f"--runs names one run twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                         f"each run needs its own method, configuration or @options")
    folders = [checkpoint_folder(config, tag) for config, tag in runs]
    if args.parallel > 1 and args.checkpoint_dir is not None and len(set(folders)) < len(folders):
        raise SystemExit("runs that differ only in end-to-end tuning share their block checkpoints, so they cannot "
                         "calibrate at once: drop --parallel (the later run resumes the earlier one's blocks)")
    rows, lines, lock = [], [], threading.Lock()

    def record(result: tuple[list[dict], str]) -> None:
        with lock:  # results are written as each run ends, so a killed command keeps the finished runs
            rows.extend(result[0])
            lines.append(result[1])
            print(result[1], flush=True)
            write_json(rows, args.out)

    parallel = args.parallel > 1
    if parallel and args.device.startswith("cuda"):
        # PyTorch loads its CUDA linalg backend lazily and not thread-safely: two runs reaching their first
        # inverse at once crashed with "lazy wrapper should be called at most once" (H100, 2026-11-24)
        torch.linalg.inv_ex(torch.eye(2, device=args.device, dtype=torch.float64))
        torch.linalg.cholesky_ex(torch.eye(2, device=args.device, dtype=torch.float64))
    # Alone, a run switches TF32 on for its own calibration. In threads the switch is process-wide, so it is set here
    # once: TF32 for every run with --tf32 (evaluation then waits for the last calibration), full float32 otherwise.
    tf32 = args.tf32 or not parallel
    deferred = parallel and args.tf32

    def job(config: QuantConfig, tag: str):
        cal = calibrate_one(fp, config, tag, args, parallel, tf32=None if parallel else True)
        return cal if deferred else evaluate_one(cal, args, options, parallel, tf32)

    previous = torch.get_float32_matmul_precision()
    if parallel:
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    calibrated, errors = [], []
    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            for future in as_completed([pool.submit(job, c, t) for c, t in runs]):
                try:
                    result = future.result()
                except Exception as err:  # the other runs go on and are recorded; the first error is raised at the end
                    traceback.print_exception(err)
                    errors.append(err)
                    continue
                if deferred:
                    calibrated.append(result)
                else:
                    record(result)
    finally:
        torch.set_float32_matmul_precision(previous)
    for cal in calibrated:  # deferred runs, evaluated at the process's own precision as the runs of the other modes
        record(evaluate_one(cal, args, options, parallel, tf32))
    print_markdown(["method", "config", "wikitext2 ppl", "s/block", "peak GPU GiB"], lines)
    if errors:
        raise errors[0]


if __name__ == "__main__":
    sys.exit(main())
