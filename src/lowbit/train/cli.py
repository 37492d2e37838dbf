"""``lowbit train``: a small LLaMA-style LM trained from scratch, float or with quantized matmuls.

For comparing the training recipes on a CPU: byte-level tokens (vocabulary 256, no tokenizer download) from a
shipped calibration text (WikiText-2 *validation* by default; test splits are refused), the first 90% for
training windows and the last 10% held out for the evaluation loss. Writes ``train_log.json`` (arguments,
config, per-step loss, held-out loss, bits per byte) and ``loss.png`` to ``--output``.
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

log = logging.getLogger("lowbit")

EVAL_FRACTION = 0.1


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    t = subparsers.add_parser("train", help="train a small LM from scratch, float or with 4-bit matmuls")
    t.add_argument("--quant", default="hq-lss4", choices=PRESETS,
                   help="none (float), int8, lsq4 (INT4 LSQ, no Hadamard, float backward), hq-lss4 (the paper; default)")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    t.add_argument("--seed", type=int, default=0, help="model init, data windows and quantizer randomness")
    t.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    t.add_argument("--layers", type=int, default=2, help="decoder blocks (default 2)")
    t.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    t.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden, rounded to 32)")
    t.add_argument("--seqlen", type=int, default=128, help="tokens (bytes) per window (default 128)")
    t.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay, 10%% warmup)")
    t.add_argument("--sampling-ratio", type=float, default=None, help="hq-lss4: fraction of bit-split rows kept (default 0.5)")
    t.add_argument("--block-size", default=None, help="hq-lss4: Hadamard block, a power of two or 'auto' (default 32)")
    t.add_argument("--data", default="wikitext2", help="wikitext2, ptb, lambada (non-test splits) or a .txt path")
    t.add_argument("--eval-batches", type=int, default=8, help="held-out windows batches for the final loss")
    t.add_argument("--output", type=Path, required=True, help="directory for train_log.json and loss.png")
    t.add_argument("--overwrite", action="store_true", help="write into --output even if it exists")
    return t


def _check(args) -> None:
    for name, low in (("steps", 1), ("hidden", 8), ("layers", 1), ("heads", 1), ("seqlen", 8), ("batch_size", 1),
                      ("eval_batches", 1)):
        if getattr(args, name) < low:
            raise LowbitError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.hidden % args.heads:
        raise LowbitError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if (args.hidden // args.heads) % 2:
        raise LowbitError(f"--hidden / --heads = {args.hidden // args.heads} must be even (rotary embeddings)")
    if not args.lr > 0:
        raise LowbitError(f"--lr must be positive, got {args.lr}")
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise LowbitError(f"output {args.output} already exists; choose another --output or pass --overwrite")


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


def _byte_tokens(source: str) -> torch.Tensor:
    from lowbit.data.texts import calibration_text

    data = calibration_text(source).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def build_model(args, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    inter = args.intermediate or max(32, (4 * args.hidden) // 32 * 32)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(args.seqlen, 64),
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _windows(ids: torch.Tensor, batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seqlen, (batch,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def run_train(args) -> int:
    from tqdm import tqdm

    from lowbit.train.convert import convert
    from lowbit.train.plot import line_plot

    _check(args)
    qconfig = _quant_config(args)
    ids = _byte_tokens(args.data)
    split = int(ids.numel() * (1 - EVAL_FRACTION))
    train_ids, eval_ids = ids[:split], ids[split:]
    if eval_ids.numel() <= args.seqlen + 1:
        raise LowbitError(f"text {args.data!r} is too short for --seqlen {args.seqlen}; use a longer text")
    model = build_model(args, args.seed)
    if qconfig is not None:
        convert(model, qconfig)  # refuses widths the Hadamard block cannot tile, before any training
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {args.quant}", unit="step", disable=getattr(args, "quiet", False))
    for step in bar:
        batch = _windows(train_ids, args.batch_size, args.seqlen, gen)
        loss = model(batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise LowbitError(f"loss became {float(loss)} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                        "time_s": round(time.perf_counter() - start, 3)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        losses = [float(model(b, labels=b).loss) for b in
                  (_windows(eval_ids, args.batch_size, args.seqlen, eval_gen) for _ in range(args.eval_batches))]
    eval_loss = sum(losses) / len(losses)
    args.output.mkdir(parents=True, exist_ok=True)
    ranges = line_plot({"train loss": [(h["step"], h["loss"]) for h in history]}, args.output / "loss.png")
    record = {
        "command": "train",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "handler"},
        "quant_config": None if qconfig is None else {k: getattr(qconfig, k) for k in qconfig.__dataclass_fields__},
        "data": {"source": args.data, "tokens": "utf-8 bytes", "train_tokens": int(train_ids.numel()),
                 "eval_tokens": int(eval_ids.numel()), "eval": "last 10% of the same (non-test) text"},
        "steps": history,
        "eval": {"loss": eval_loss, "bits_per_byte": eval_loss / math.log(2)},
        "plot": {"file": "loss.png", **ranges},
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    (args.output / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.quant}: final train loss {history[-1]['loss']:.4f}, held-out loss {eval_loss:.4f} "
          f"({record['eval']['bits_per_byte']:.3f} bits/byte) after {args.steps} steps; wrote {args.output}")
    return 0
