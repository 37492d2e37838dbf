"""Token perplexity with the GPTQ / OmniQuant / AffineQuant protocol.

The whole text is tokenized once; the tokens are cut into non-overlapping windows of ``seqlen`` (the remainder is
dropped); each window is scored on its own, with no context carried over; perplexity is exp of the mean token
negative log-likelihood over all windows. (Each window predicts ``seqlen - 1`` tokens; every window has the
same length, so this equals the papers' exp(mean of per-window mean losses).)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.data.texts import require_tokens


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    windows: int
    windows_total: int
    seqlen: int


def _window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window in ``batch`` (float32, one value per window)."""
    logits = model(batch, use_cache=False).logits
    shift_logits = logits[:, :-1].float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).sum(dim=1)


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 1,
    limit: int | None = None,
    device: str | torch.device | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D tensor of token ids; ``limit`` scores only the first windows."""
    token_ids = token_ids.reshape(-1)
    require_tokens(token_ids, seqlen, "the evaluation text", f"use a longer text or a smaller --seqlen (now {seqlen})")
    total = token_ids.numel() // seqlen
    windows = total if limit is None else max(1, min(limit, total))
    device = device or next(model.parameters()).device
    chunks = token_ids[: windows * seqlen].view(windows, seqlen)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=windows, desc=desc, unit="win", disable=not progress)
    for start in range(0, windows, batch_size):
        batch = chunks[start : start + batch_size].to(device)
        nll_sum += _window_nll(model, batch).double().sum()
        bar.update(batch.shape[0])
    bar.close()
    tokens = windows * (seqlen - 1)
    nll = nll_sum.item()
    return PerplexityResult(math.exp(nll / tokens), nll, tokens, windows, total, seqlen)
