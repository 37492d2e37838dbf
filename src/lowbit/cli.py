"""``lowbit`` command line: parses flags, calls the Python API, prints tables. No logic of its own.

A ``LowbitError`` (bad input) prints one line on stderr and exits with code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("give at least one task, e.g. wikitext2,piqa")
    return tasks


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF model directory, .gguf file, lowbit output directory or hub id (default: SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16")


def _add_eval_args(p: argparse.ArgumentParser, default_tasks: str | None) -> None:
    p.add_argument("--seqlen", type=int, default=2048,
                   help="window length in tokens for perplexity (default 2048)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N windows / items of each task (quick CPU runs)")
    p.add_argument("--batch-size", type=int, default=None, help="perplexity windows per forward (default 1 on CPU, 8 on CUDA)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON to this file")
    tasks_help = "comma-separated: wikitext2, ptb, lambada_text, piqa, arc_easy, arc_challenge, lambada, or a .txt path"
    if default_tasks is None:
        p.add_argument("--eval", dest="tasks", type=_tasks, default=[], help=f"after quantizing, evaluate FP and quantized: {tasks_help}")
    else:
        p.add_argument("--tasks", type=_tasks, default=_tasks(default_tasks), help=f"{tasks_help} (default {default_tasks})")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__
    from lowbit.config import METHODS

    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit transformers: quantize, evaluate.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it (optionally evaluate before/after)")
    _add_model_args(q)
    q.add_argument("--method", default="rtn", choices=METHODS)
    q.add_argument("--wbits", type=int, default=4, help="weight bits, 2-8, or 16 for float (default 4)")
    q.add_argument("--abits", type=int, default=16, help="activation bits, 2-8, or 16 for float (default 16)")
    q.add_argument("--group-size", type=int, default=None, help="weight group size along the input (default: per channel)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (calibrating methods)")
    q.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    q.add_argument("--calib-data", default="wikitext2", help="wikitext2, ptb, lambada (non-test splits) or a .txt path")
    q.add_argument("--seed", type=int, default=0)
    c = q.add_argument_group("calibration recipe (smoothquant / omniquant / affinequant)")
    c.add_argument("--epochs", type=int, default=None, help="epochs per block (default 20, 40 at 2 bits; 0 for smoothquant)")
    c.add_argument("--calib-batch-size", type=int, default=1, help="calibration windows per optimisation step (default 1)")
    c.add_argument("--let-lr", type=float, default=5e-3, help="learning rate of scales, shifts and matrices")
    c.add_argument("--lwc-lr", type=float, default=1e-2, help="learning rate of the weight clipping")
    c.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength of the initial scales")
    c.add_argument("--sf", type=float, default=None, help="AffineQuant stability factor (default 0.1 with activation quantization, else 0.01)")
    c.add_argument("--aug-loss", action="store_true", help="also match the FP block on the quantized inputs")
    c.add_argument("--norm-matrices", action="store_true", help="AffineQuant: full matrices after the norms (kept as online ops)")
    c.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="per-block checkpoints for resuming (default: .<output>.calib beside --output)")
    q.add_argument("--compare-rtn", action="store_true", help="with --eval: also evaluate RTN at the same bits, side by side")
    q.add_argument("--output", type=Path, required=True, help="directory to write the quantized model to")
    q.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    _add_eval_args(q, default_tasks=None)

    e = sub.add_parser("eval", help="evaluate a model: perplexity and zero-shot accuracy")
    _add_model_args(e)
    _add_eval_args(e, default_tasks="wikitext2")

    from lowbit.train.cli import add_train_parser

    add_train_parser(sub)
    return parser


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    return name


def _eval_options(args, device: str):
    from lowbit.eval import EvalOptions

    if args.seqlen < 2:
        raise LowbitError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.limit is not None and args.limit < 1:
        raise LowbitError(f"--limit must be at least 1, got {args.limit}")
    batch = args.batch_size or (8 if device.startswith("cuda") else 1)
    return EvalOptions(seqlen=args.seqlen, batch_size=batch, limit=args.limit, device=device, progress=not args.quiet)


def _run_quantize(args) -> int:
    from lowbit import QuantConfig, load_model, quantize, save_quantized
    from lowbit.eval import check_tasks
    from lowbit.report import eval_and_record, print_table, write_json

    config = QuantConfig(method=args.method, wbits=args.wbits, abits=args.abits, group_size=args.group_size,
                         nsamples=args.nsamples, seqlen=args.calib_seqlen, calib_data=args.calib_data, seed=args.seed,
                         epochs=args.epochs, batch_size=args.calib_batch_size, let_lr=args.let_lr, lwc_lr=args.lwc_lr,
                         alpha=args.alpha, sf=args.sf, aug_loss=args.aug_loss, norm_matrices=args.norm_matrices)
    if args.output.exists() and not args.overwrite:
        raise LowbitError(f"output {args.output} already exists; choose another --output or pass --overwrite")
    check_tasks(args.tasks)
    device = _device(args.device)
    options = _eval_options(args, device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    rows, columns = [], []
    if args.tasks:
        columns.append(f"FP ({loaded.model.dtype})".replace("torch.", ""))
        rows += eval_and_record(loaded, args.tasks, options, columns[-1], None)
    if args.tasks and args.compare_rtn and config.method != "rtn":
        import copy

        rtn_config = QuantConfig(method="rtn", wbits=config.wbits, abits=config.abits, group_size=config.group_size)
        rtn = quantize(copy.deepcopy(loaded), rtn_config)
        columns.append(f"rtn {config.name}")
        rows += eval_and_record(rtn, args.tasks, options, columns[-1], rtn_config)
        del rtn
    checkpoint_dir = args.checkpoint_dir or args.output.parent / f".{args.output.name}.calib"
    start = time.perf_counter()
    quantize(loaded, config, device=device, checkpoint_dir=None if config.method == "rtn" else checkpoint_dir,
             progress=not args.quiet)
    loaded.model.to(device)
    log.info("quantized with %s %s in %.1f s", config.method, config.name, time.perf_counter() - start)
    if args.tasks:
        columns.append(f"{config.method} {config.name}")
        rows += eval_and_record(loaded, args.tasks, options, columns[-1], config)
    out = save_quantized(loaded, config, args.output, overwrite=args.overwrite)
    print(f"saved {config.method} {config.name} model to {out}")
    if config.method != "rtn" and checkpoint_dir.exists():
        import shutil

        shutil.rmtree(checkpoint_dir)  # the run finished: its resume points are no longer needed
    if rows:
        print_table(rows, columns)
        write_json(rows, args.json or out / "eval_results.json")
    return 0


def _run_eval(args) -> int:
    from lowbit import load_model
    from lowbit.eval import check_tasks
    from lowbit.report import eval_and_record, print_table, write_json

    check_tasks(args.tasks)
    device = _device(args.device)
    options = _eval_options(args, device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    label = loaded.source if loaded.quant_config is None else f"{loaded.quant_config.method} {loaded.quant_config.name}"
    rows = eval_and_record(loaded, args.tasks, options, label, loaded.quant_config)
    print_table(rows, [label])
    if args.json:
        write_json(rows, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        if args.quiet:
            transformers.utils.logging.disable_progress_bar()
        from lowbit.train.cli import run_train

        handler = {"quantize": _run_quantize, "eval": _run_eval, "train": run_train}[args.command]
        return handler(args)
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
