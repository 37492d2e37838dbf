"""``lowbit`` command line: parses flags, calls the Python API, prints tables. No logic of its own.

A ``LowbitError`` (bad input) prints one line on stderr and exits with code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers, e.g. 1,16; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _add_inference_parsers(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, streamed token by token (KV cache)")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default), >0 to sample")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling draws (default 0)")

    b = sub.add_parser("bench", help="prefill / decode tokens/s and memory, quantized against fp16, in one run")
    _add_model_args(b)
    b.add_argument("--random-llama7b", action="store_true",
                   help="instead of --model: a random-weight LLaMA-7B-shaped model, packed to W4A16 by RTN")
    b.add_argument("--layers", type=int, default=None, help="with --random-llama7b: blocks to build (default 32)")
    b.add_argument("--wbits", type=int, default=4, help="bits of the RTN packing of float models (default 4)")
    b.add_argument("--group-size", type=int, default=128, help="group size of the RTN packing (default 128)")
    b.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default 512)")
    b.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per timed run (default 128)")
    b.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 16), help="comma-separated (default 1,16)")
    b.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    b.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA too (dynamic KV cache)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile each model's decode step before capturing it (fuses the small ops between "
                        "the matmuls; both models alike; adds compile time)")
    b.add_argument("--json", type=Path, default=None, help="write the rows as JSON to this file")

    x = sub.add_parser("export", help="write a quantized model in a format other tools load")
    x.add_argument("--model", required=True, help="a directory written by lowbit quantize (fake or packed)")
    x.add_argument("--format", required=True, choices=("lowbit", "gptq", "compressed-tensors"),
                   help="lowbit: packed checkpoint (any config); gptq / compressed-tensors: W4A16 only")
    x.add_argument("--output", type=Path, required=True, help="directory to write")
    x.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__
    from lowbit.config import GPTQ_GRIDS, METHODS, ROTATIONS, ROUNDINGS, SCALE_INITS

    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit transformers: quantize, evaluate, run, export.")
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
    c = q.add_argument_group("calibration recipe (smoothquant / omniquant / affinequant / gptq)")
    c.add_argument("--epochs", type=int, default=None, help="epochs per block (default 20, 40 at 2 bits; 0 for smoothquant)")
    c.add_argument("--calib-batch-size", type=int, default=1, help="calibration windows per optimisation step (default 1)")
    c.add_argument("--let-lr", type=float, default=None,
                   help="learning rate of scales, shifts and matrices "
                        "(default 5e-3; 1e-3 for AffineQuant weight-only)")
    c.add_argument("--lwc-lr", type=float, default=1e-2, help="learning rate of the weight clipping")
    c.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength of the initial scales")
    c.add_argument("--scale-init", default=None, choices=SCALE_INITS,
                   help="start of the learnt scales (omniquant, affinequant): SmoothQuant's, or the identity (the "
                        "plain model); default SmoothQuant's, the identity for AffineQuant weight-only")
    c.add_argument("--mlp-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="diagonal scales on the MLP's inner pair (up_proj → down_proj, fc1 → fc2), which the papers "
                        "leave out (smoothquant, omniquant with activation bits, affinequant); default on for "
                        "affinequant with activation bits, off otherwise (--no-mlp-scales: as in the papers)")
    c.add_argument("--sf", type=float, default=None, help="AffineQuant stability factor (default 0.1 with activation quantization, else 0.01)")
    c.add_argument("--aug-loss", action="store_true", help="also match the FP block on the quantized inputs")
    c.add_argument("--norm-matrices", action=argparse.BooleanOptionalAction, default=None,
                   help="AffineQuant: full matrices after the norms, kept as online ops (default: on after --rotate "
                        "inputs with activation bits, where they compose into the rotation for free; off otherwise)")
    c.add_argument("--weight-lr", type=float, default=None,
                   help="omniquant / affinequant: the weights learn too, at this rate, through the rounding, beside the "
                        "transforms and clipping (EfficientQAT's Block-AP; default: 3e-5 for affinequant weight-only, "
                        "0 otherwise; 0 keeps the weights as loaded, as the papers do)")
    c.add_argument("--e2e-epochs", type=int, default=0,
                   help="after the method, tune every weight scale end to end against the full-precision model's "
                        "logits on the calibration windows for this many epochs (weight-only; codes stay; default 0)")
    c.add_argument("--e2e-lr", type=float, default=3e-3, help="rate of the end-to-end scale gains (relative units)")
    q.add_argument("--rotate", default=None, choices=ROTATIONS,
                   help="rotate by a seeded Hadamard matrix before quantizing: inputs (each norm's output, online, "
                        "merged into the linears reading it) or residual (QuaRot's offline rotation of the residual "
                        "stream, RMSNorm models). Pays where activations are quantized (BENCHMARKS.md)")
    c.add_argument("--rounding", default=None, choices=ROUNDINGS,
                   help="final rounding of the weights (weight-only): gptq rounds the calibrated weights by GPTQ on "
                        "the grid the method learnt (default: the method's own; --method gptq is GPTQ alone). It helped "
                        "short calibrations but made a 20-epoch AffineQuant W3 worse (BENCHMARKS.md)")
    c.add_argument("--gptq-grid", default="minmax", choices=GPTQ_GRIDS,
                   help="GPTQ's grid where no clipping was learnt: min-max or an MSE clip search (default minmax)")
    c.add_argument("--gptq-act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ rounds columns in decreasing Hessian diagonal (default on)")
    c.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="per-block checkpoints for resuming (default: .<output>.calib beside --output)")
    q.add_argument("--compare-rtn", action="store_true", help="with --eval: also evaluate RTN at the same bits, side by side")
    q.add_argument("--output", type=Path, required=True, help="directory to write the quantized model to")
    q.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    q.add_argument("--format", default="fake", choices=("fake", "packed"),
                   help="fake: rounded weights stored dequantized (any HF tool loads them); packed: real integers "
                        "(lowbit.load_quantized runs them with the low-bit kernels) (default fake)")
    _add_eval_args(q, default_tasks=None)

    e = sub.add_parser("eval", help="evaluate a model: perplexity and zero-shot accuracy")
    _add_model_args(e)
    _add_eval_args(e, default_tasks="wikitext2")

    _add_inference_parsers(sub)

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
    from lowbit.ptq.recipes import default_let_lr
    from lowbit.eval import check_tasks
    from lowbit.report import eval_and_record, print_table, write_json

    config = QuantConfig(method=args.method, wbits=args.wbits, abits=args.abits, group_size=args.group_size,
                         nsamples=args.nsamples, seqlen=args.calib_seqlen, calib_data=args.calib_data, seed=args.seed,
                         epochs=args.epochs, batch_size=args.calib_batch_size, let_lr=args.let_lr, lwc_lr=args.lwc_lr,
                         alpha=args.alpha, sf=args.sf, scale_init=args.scale_init, mlp_scales=args.mlp_scales,
                         aug_loss=args.aug_loss,
                         norm_matrices=args.norm_matrices, rotate=args.rotate, weight_lr=args.weight_lr,
                         e2e_epochs=args.e2e_epochs, e2e_lr=args.e2e_lr, rounding=args.rounding, gptq_grid=args.gptq_grid, gptq_act_order=args.gptq_act_order)
    config = dataclasses.replace(config, let_lr=default_let_lr(config))  # quantization.json records the rate used
    if args.output.exists() and not args.overwrite:
        raise LowbitError(f"output {args.output} already exists; choose another --output or pass --overwrite")
    if args.format == "packed" and config.weight_spec is None:
        raise LowbitError(f"--format packed stores integer weights, but {config.name} keeps weights in floating "
                          "point; use --format fake or set --wbits")
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
        columns.append(f"{config.label} {config.name}")
        rows += eval_and_record(loaded, args.tasks, options, columns[-1], config)
    if args.format == "packed":
        from lowbit.export import save_packed

        out = save_packed(loaded, config, args.output, overwrite=args.overwrite)
    else:
        out = save_quantized(loaded, config, args.output, overwrite=args.overwrite)
    print(f"saved {config.method} {config.name} model{' (packed)' if args.format == 'packed' else ''} to {out}")
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
    label = loaded.source if loaded.quant_config is None else f"{loaded.quant_config.label} {loaded.quant_config.name}"
    rows = eval_and_record(loaded, args.tasks, options, label, loaded.quant_config)
    print_table(rows, [label])
    if args.json:
        write_json(rows, args.json)
    return 0


def _run_generate(args) -> int:
    from lowbit import load_model
    from lowbit.generate import GenerateOptions, generate

    options = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    device = _device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(loaded.model, loaded.tokenizer, args.prompt, options, on_text=write)
    if result.text:
        write("\n")
    log.info("%d prompt tokens, %d new tokens; prefill %.3f s, decode %.1f tokens/s", result.prompt_tokens,
             len(result.token_ids), result.prefill_seconds, result.decode_tokens_per_second)
    return 0


def _run_bench(args) -> int:
    from lowbit.bench import BenchOptions, compare_with_fp16, print_results, write_results

    if args.random_llama7b == (args.model is not None):
        raise LowbitError("pass exactly one of --model DIR and --random-llama7b")
    if args.layers is not None and (not args.random_llama7b or args.layers < 1):
        raise LowbitError("--layers is a positive number of blocks, and only applies with --random-llama7b")
    options = BenchOptions(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, batch_sizes=args.batch_sizes,
                           warmup=args.warmup, repeats=args.repeats, cuda_graph=not args.no_cuda_graph,
                           compile=args.compile)
    device = _device(args.device)
    layers = (args.layers or 32) if args.random_llama7b else None
    results = compare_with_fp16(args.model, options, device, args.dtype, random_layers=layers, wbits=args.wbits,
                                group_size=args.group_size)
    print_results(results)
    if args.json:
        write_results(results, options, args.json)
    return 0


def _run_export(args) -> int:
    from lowbit.export import save_packed
    from lowbit.export.compressed_tensors import save_compressed_tensors
    from lowbit.export.gptq import save_gptq
    from lowbit.export.w4a16 import load_result
    from lowbit.models.loading import is_packed_dir

    if args.output.exists() and not args.overwrite:
        raise LowbitError(f"output {args.output} already exists; choose another --output or pass --overwrite")
    if is_packed_dir(Path(args.model)) and args.format == "lowbit":
        raise LowbitError(f"{args.model} is already a lowbit packed checkpoint; copy it, or choose --format gptq "
                          "or compressed-tensors")
    loaded = load_result(args.model)
    writer = {"lowbit": save_packed, "gptq": save_gptq, "compressed-tensors": save_compressed_tensors}[args.format]
    out = writer(loaded, loaded.quant_config, args.output, overwrite=args.overwrite)
    print(f"exported {loaded.quant_config.method} {loaded.quant_config.name} as {args.format} to {out}")
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

        handler = {"quantize": _run_quantize, "eval": _run_eval, "train": run_train, "generate": _run_generate,
                   "bench": _run_bench, "export": _run_export}[args.command]
        return handler(args)
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
