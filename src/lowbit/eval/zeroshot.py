"""Zero-shot accuracy by log-likelihood of choices, with the lm-evaluation-harness protocol.

Papers on low-bit LLMs report PIQA, ARC-Easy, ARC-Challenge and LAMBADA as scored by lm-evaluation-harness
("lm-eval"), so every detail that can move a score follows it: the prompt templates of its ``piqa``,
``arc_easy``, ``arc_challenge`` and ``lambada_openai`` tasks, its ``_encode_pair`` tokenization, left truncation
that keeps the continuation, ``acc_norm`` by character length, and its standard errors. The data ships with the
package (see ``lowbit/data/files/SOURCES.md``), so no hub access is needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.resources import files

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError

ZEROSHOT_TASKS = ("piqa", "arc_easy", "arc_challenge", "lambada")

# lm-eval joins context and choice with this delimiter; its acc_norm divides by the length of the choice
# *without* it (``doc_to_choice`` strings), so we strip it again when normalizing.
TARGET_DELIMITER = " "

_FILES = files("lowbit.data") / "files"


@dataclass(frozen=True)
class Item:
    """One question: the prompt, the continuations to score (delimiter included) and the gold index.

    LAMBADA is an item with a single "choice", the target word, and gold 0.
    """

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class ZeroShotResult:
    task: str
    metrics: dict[str, float]
    n: int


# ---------------------------------------------------------------------------------------------------- data


def _lines(relative: str) -> list[str]:
    with (_FILES / relative).open("r", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _piqa() -> list[Item]:
    docs = [json.loads(line) for line in _lines("piqa/valid.jsonl")]
    labels = [int(line) for line in _lines("piqa/valid-labels.lst")]
    assert len(docs) == len(labels), "piqa questions and labels differ in number"
    return [
        Item(f"Question: {d['goal']}\nAnswer:", (" " + d["sol1"], " " + d["sol2"]), label)
        for d, label in zip(docs, labels)
    ]


def _arc(split: str) -> list[Item]:
    items = []
    for line in _lines(f"arc/ARC-{split}-Test.jsonl"):
        d = json.loads(line)
        choices = d["question"]["choices"]
        labels = [c["label"] for c in choices]  # "A".."E" or "1".."5"; lm-eval takes the key's index
        items.append(
            Item(
                f"Question: {d['question']['stem']}\nAnswer:",
                tuple(" " + c["text"] for c in choices),
                labels.index(d["answerKey"]),
            )
        )
    return items


def _lambada() -> list[Item]:
    items = []
    for line in _lines("lambada/lambada_test.jsonl"):
        context, word = json.loads(line)["text"].rsplit(" ", 1)
        items.append(Item(context, (" " + word,), 0))
    return items


_LOADERS = {
    "piqa": _piqa,
    "arc_easy": lambda: _arc("Easy"),
    "arc_challenge": lambda: _arc("Challenge"),
    "lambada": _lambada,
}


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The items of a shipped zero-shot task in lm-eval's format; ``limit`` keeps only the first ones."""
    if name not in _LOADERS:
        raise LowbitError(f"unknown zero-shot task {name!r}; choose one of: {', '.join(ZEROSHOT_TASKS)}")
    if limit is not None and limit < 1:
        raise LowbitError(f"limit must be at least 1 (got {limit}); leave it unset to evaluate every item")
    items = _LOADERS[name]()
    return items if limit is None else items[:limit]


# ---------------------------------------------------------------------------------------------------- tokens


def _encode(tokenizer, text: str, add_special_tokens: bool | None) -> list[int]:
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return list(tokenizer(text, **kwargs)["input_ids"])


def _prefix_token_id(tokenizer) -> int:
    """The token an empty context becomes (lm-eval: BOS if the tokenizer has one, else EOS)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise LowbitError("the tokenizer has neither a BOS nor an EOS token, so an empty context cannot be scored")


def encode_pair(
    tokenizer, context: str, continuation: str, add_special_tokens: bool | None = None
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval's ``_encode_pair`` makes them.

    Trailing spaces of the context move to the continuation (BPE tokenizers glue a space to the word after it),
    and the continuation is the tail of the *jointly* tokenized text, so tokens that merge across the boundary
    are counted the same way for every choice. ``add_special_tokens=None`` keeps the tokenizer's default.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation, add_special_tokens)
    ctx = _encode(tokenizer, context, add_special_tokens)
    cont = whole[len(ctx) :]
    if not ctx:
        ctx = [_prefix_token_id(tokenizer)]
    return ctx, cont


# ---------------------------------------------------------------------------------------------------- scoring


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _position_limit(model, max_length: int) -> int:
    """``max_length``, but never beyond the positions the model was built for (learned embeddings would fail)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return min(max_length, value)
    return max_length


@torch.no_grad()
def loglikelihoods(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 16,
    max_length: int = 2048,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
    add_special_tokens: bool | None = None,
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), continuation is the greedy argmax)`` for each ``(context, continuation)``.

    As in lm-eval: requests run longest first (padding waste is small and an out-of-memory shows at once), the
    input is left-truncated to ``max_length`` tokens keeping the whole continuation, batches are padded on the
    right (causal attention keeps padding invisible to real tokens), and log-softmax is taken in float32.
    """
    if batch_size < 1:
        raise LowbitError(f"batch size must be at least 1 (got {batch_size})")
    device = torch.device(device) if device is not None else _model_device(model)
    max_length = _position_limit(model, max_length)
    encoded = [encode_pair(tokenizer, ctx, cont, add_special_tokens) for ctx, cont in requests]
    for (ctx, cont), (_, cont_ids) in zip(requests, encoded):
        if not cont_ids:
            raise LowbitError(f"continuation {cont!r} of context {ctx[-40:]!r} has no tokens of its own")
        if len(cont_ids) > max_length:
            raise LowbitError(
                f"a continuation has {len(cont_ids)} tokens, more than max_length={max_length}; raise max_length"
            )
    full = [ctx + cont for ctx, cont in encoded]
    order = sorted(range(len(full)), key=lambda i: (-len(full[i]), tuple(full[i])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="req", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        # The last token is only ever a target, so the input is tokens[:-1], at most max_length long.
        inputs = [full[i][-(max_length + 1) :][:-1] for i in batch]
        width = max(len(x) for x in inputs)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(inputs):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, : len(x)] = 1
        logits = model(input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        lls, greedy = [], []
        for row, (i, x) in enumerate(zip(batch, inputs)):
            cont_ids = torch.tensor(encoded[i][1], dtype=torch.long, device=logits.device)
            # Position p predicts token p + 1, so the continuation is predicted by the last len(cont) inputs.
            logprobs = logits[row, len(x) - len(cont_ids) : len(x)].float().log_softmax(dim=-1)
            greedy.append((logprobs.argmax(dim=-1) == cont_ids).all())
            lls.append(logprobs.gather(1, cont_ids[:, None]).sum())
        # One device-to-host copy per batch rather than two per request.
        for i, ll, is_greedy in zip(batch, torch.stack(lls).tolist(), torch.stack(greedy).tolist()):
            results[i] = (ll, is_greedy)
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- metrics


def _stderr(values: list[float]) -> float:
    """lm-eval's standard error of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1))."""
    n = len(values)
    if n < 2:
        return float("nan")
    p = sum(values) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first maximum on ties, as np.argmax


def multiple_choice_metrics(items: list[Item], logliks: list[list[float]]) -> dict[str, float]:
    """acc (highest summed log-likelihood) and acc_norm (highest log-likelihood per character), with stderrs."""
    acc, acc_norm = [], []
    for item, lls in zip(items, logliks, strict=True):
        lengths = [max(1, len(c.removeprefix(TARGET_DELIMITER))) for c in item.choices]
        acc.append(float(_argmax(lls) == item.gold))
        acc_norm.append(float(_argmax([ll / n for ll, n in zip(lls, lengths)]) == item.gold))
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": _stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": _stderr(acc_norm),
    }


def lambada_metrics(results: list[tuple[float, bool]]) -> dict[str, float]:
    """acc (target word is the greedy continuation) and perplexity exp(-mean log p(target)), as lm-eval."""
    acc = [float(greedy) for _, greedy in results]
    mean_ll = sum(ll for ll, _ in results) / len(results)
    return {"acc": sum(acc) / len(acc), "acc_stderr": _stderr(acc), "perplexity": math.exp(-mean_ll)}


# ---------------------------------------------------------------------------------------------------- entry


def evaluate_zeroshot(
    model,
    tokenizer,
    task: str,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    device: str | torch.device | None = None,
    progress: bool = True,
    add_special_tokens: bool | None = None,
) -> ZeroShotResult:
    """Score ``model`` on one task of ``ZEROSHOT_TASKS``; ``limit`` evaluates only its first items.

    ``add_special_tokens=None`` uses the tokenizer's default (as current lm-eval does); ``False`` reproduces
    older lm-eval releases, which never added a BOS token for causal models.
    """
    items = load_task(task, limit)
    requests = [(item.context, choice) for item in items for choice in item.choices]
    results = loglikelihoods(
        model, tokenizer, requests, batch_size, max_length, device, progress, desc=task,
        add_special_tokens=add_special_tokens,
    )
    if task == "lambada":
        metrics = lambada_metrics(results)
    else:
        logliks, pos = [], 0
        for item in items:
            logliks.append([ll for ll, _ in results[pos : pos + len(item.choices)]])
            pos += len(item.choices)
        metrics = multiple_choice_metrics(items, logliks)
    return ZeroShotResult(task, metrics, len(items))
