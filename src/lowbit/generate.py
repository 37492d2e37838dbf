"""Text generation with a KV cache, streamed as it is produced: greedy by default, or temperature / top-p sampling.

The loop is ours rather than ``model.generate`` so that every random draw comes from one seeded
``torch.Generator`` (no global RNG), and so it runs unchanged on a float model, a fake-quant model and a packed
model whose linears hold real integers. The prompt is checked against the model's context before any token is
produced: a prompt that does not fit is refused with one line and nothing is printed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOptions:
    """``temperature=0`` is greedy decoding; ``top_p`` < 1 samples from the smallest set holding that mass."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise LowbitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise LowbitError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LowbitError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    token_ids: tuple[int, ...]
    text: str
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def context_length(model: torch.nn.Module) -> int | None:
    """Longest sequence the model was built for (``max_position_embeddings``), or None if it does not say."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple)) else {int(ids)}


def encode_prompt(model: torch.nn.Module, tokenizer, prompt: str, options: GenerateOptions) -> tuple[torch.Tensor, int]:
    """Token ids of ``prompt`` (1, T) and how many new tokens fit; refuses a prompt that leaves no room."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise LowbitError("the prompt is empty (it has no tokens); pass some text with --prompt")
    limit = context_length(model)
    if limit is None:
        return ids, options.max_new_tokens
    if ids.shape[1] >= limit:
        raise LowbitError(
            f"the prompt is {ids.shape[1]} tokens but the model's context is {limit} tokens; shorten the prompt"
        )
    room = limit - ids.shape[1]
    if options.max_new_tokens > room:
        log.warning("only %d new tokens fit in the %d-token context; generating %d", room, limit, room)
    return ids, min(options.max_new_tokens, room)


def next_token(logits: torch.Tensor, options: GenerateOptions, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token per row of ``logits`` (B, V): argmax, or a seeded draw after temperature and top-p."""
    logits = logits.float()
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= options.top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.emitted = 0

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for its end
            return
        self._emit(text)

    def close(self) -> str:
        text = self._text()
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if self.on_text is not None and len(text) > self.emitted:
            self.on_text(text[self.emitted:])
        self.emitted = max(self.emitted, len(text))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    options: GenerateOptions = GenerateOptions(),
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate up to ``options.max_new_tokens`` after ``prompt``; ``on_text`` receives each new piece of text."""
    ids, budget = encode_prompt(model, tokenizer, prompt, options)
    device = next(model.parameters()).device
    ids = ids.to(device)
    generator = None
    if options.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(options.seed)
    stop = _eos_ids(model, tokenizer) if options.stop_at_eos else set()
    stream = TextStream(tokenizer, on_text)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = next_token(out.logits[:, -1], options, generator)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(budget):
        value = int(token)
        if value in stop:
            break
        stream.push(value)
        if step == budget - 1:
            break
        out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        token = next_token(out.logits[:, -1], options, generator)
    _sync(device)
    text = stream.close()
    return Generation(ids.shape[1], tuple(stream.ids), text, prefill, time.perf_counter() - start)
