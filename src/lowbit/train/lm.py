"""A small LLaMA-style byte-level LM and its training loop, shared by ``lowbit train --task lm`` and
``benchmarks/train_lm.py`` (so both reproductions run the same code).

Byte tokens (vocabulary 256) need no tokenizer download. Every text is cut 90/10: the first part gives random
training windows, the last part held-out windows; test splits are refused by ``calibration_text``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from lowbit.errors import LowbitError

EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class LMShape:
    """Decoder shape. ``intermediate`` None means 4 x hidden rounded down to a multiple of 32."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int | None = None
    seqlen: int = 128

    @property
    def mlp_width(self) -> int:
        return self.intermediate or max(32, (4 * self.hidden) // 32 * 32)


def build_lm(shape: LMShape, seed: int, device: str | torch.device = "cpu"):
    """A randomly initialised ``LlamaForCausalLM`` (tied embeddings, MHA), initialised from ``seed``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=shape.hidden, intermediate_size=shape.mlp_width,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=max(shape.seqlen, 64),
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)


def byte_tokens(source: str) -> torch.Tensor:
    """A shipped non-test text (or a file) as UTF-8 byte ids."""
    from lowbit.data.texts import calibration_text

    data = calibration_text(source).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def byte_splits(sources: Sequence[str], seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / held-out byte ids: each source's first 90% and last 10%, concatenated in the given order."""
    if not sources:
        raise LowbitError("give at least one text source")
    train, held = [], []
    for source in sources:
        ids = byte_tokens(source)
        split = int(ids.numel() * (1 - EVAL_FRACTION))
        train.append(ids[:split])
        held.append(ids[split:])
    train_ids, eval_ids = torch.cat(train), torch.cat(held)
    if eval_ids.numel() <= seqlen + 1:
        raise LowbitError(f"text {','.join(sources)!r} is too short for --seqlen {seqlen}; use a longer text")
    return train_ids, eval_ids


def random_windows(ids: torch.Tensor, batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows at seeded random starts (drawn on the CPU, so every device sees the same windows)."""
    starts = torch.randint(0, ids.numel() - seqlen, (batch,), generator=generator)
    offsets = starts.to(ids.device).reshape(-1, 1) + torch.arange(seqlen, device=ids.device)
    return ids[offsets]


@dataclass(frozen=True)
class LMRecipe:
    """Optimisation recipe: AdamW, linear warmup over 10% then cosine decay, grad-norm clip 1."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    lsq_lr: float | None = None  # None: optim.DEFAULT_LSQ_LR_RATIO x lr
    seed: int = 0
    clip: float = 1.0
    cuda_graph: bool = False  # capture each step after 3 eager ones (``lowbit.train.graphs``); CUDA only


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token loss of a causal LM on a batch of windows (its own labels)."""
    return model(batch, labels=batch).loss


def train_lm(model, train_ids: torch.Tensor, seqlen: int, recipe: LMRecipe, desc: str = "train",
             progress: bool = True) -> list[dict]:
    """Train in place; returns one record per step (loss, lr, seconds since start). Non-finite loss refuses."""
    from tqdm import tqdm

    from lowbit.train.graphs import GraphedTrainStep, GraphStepConfig, make_capturable
    from lowbit.train.optim import param_groups, warmup_schedule

    if recipe.cuda_graph and train_ids.device.type != "cuda":
        raise LowbitError("CUDA-graph steps need the model and data on a CUDA device; use --device cuda")
    model.train()
    opt = torch.optim.AdamW(param_groups(model, recipe.lr, recipe.lsq_lr))
    if recipe.cuda_graph:
        make_capturable(opt, train_ids.device)
    sched = warmup_schedule(opt, recipe.steps)
    step_fn = GraphedTrainStep(model, opt, lm_loss, GraphStepConfig(clip_norm=recipe.clip, autocast_dtype=None,
                                                                    enabled=recipe.cuda_graph, check_finite=True))
    gen = torch.Generator().manual_seed(recipe.seed)
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        batch = random_windows(train_ids, recipe.batch_size, seqlen, gen)
        value = float(step_fn(batch))  # a non-finite loss raised inside (check_finite)
        sched.step()
        history.append({"step": step + 1, "loss": value, "lr": float(sched.get_last_lr()[0]),
                        "time_s": round(time.perf_counter() - start, 3)})
        bar.set_postfix(loss=f"{value:.3f}")
    return history


@torch.no_grad()
def eval_lm_all(model, eval_ids: torch.Tensor, seqlen: int, batch_size: int) -> tuple[float, int]:
    """Mean next-byte loss over every non-overlapping held-out window (remainder dropped), and the window count."""
    model.eval()
    n = eval_ids.numel() // seqlen
    if n == 0:
        raise LowbitError(f"held-out text has {eval_ids.numel()} bytes, fewer than one window of {seqlen}")
    windows = eval_ids[: n * seqlen].reshape(n, seqlen)
    total = 0.0
    for start in range(0, n, batch_size):
        b = windows[start : start + batch_size]
        total += float(model(b, labels=b).loss) * b.shape[0]  # equal-length windows: the mean of means is exact
    return total / n, n


@torch.no_grad()
def eval_lm(model, eval_ids: torch.Tensor, seqlen: int, batch_size: int, batches: int, seed: int) -> float:
    """Mean next-byte loss over ``batches`` batches of seeded random held-out windows."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [float(model(b, labels=b).loss) for b in
              (random_windows(eval_ids, batch_size, seqlen, gen) for _ in range(batches))]
    return sum(losses) / len(losses)
