"""Evaluation texts built exactly as the GPTQ/OmniQuant/AffineQuant papers build them, and calibration windows.

Evaluation uses test splits; calibration only ever uses non-test text (WikiText-2 validation, PTB validation,
LAMBADA development novels) or a file the user gives.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import torch

from lowbit.errors import LowbitError

_FILES = files("lowbit.data") / "files"


def _read(relative: str) -> str:
    # newline="" keeps the bytes as they are: translating "\r\n" or "\n" would change the tokenization.
    with (_FILES / relative).open("r", encoding="utf-8", newline="") as f:
        return f.read()


def _wikitext2_test() -> str:
    return _read("wikitext2/wiki.test.hubjoined.txt")


def _ptb_test() -> str:
    # The papers join the hub's ptb_text_only sentences (each line stripped) with single spaces.
    return " ".join(line.strip() for line in _read("ptb/ptb.test.txt").splitlines())


def _lambada_test() -> str:
    return "\n\n".join(json.loads(line)["text"] for line in _read("lambada/lambada_test.jsonl").splitlines() if line)


EVAL_TEXTS = {"wikitext2": _wikitext2_test, "ptb": _ptb_test, "lambada_text": _lambada_test}
CALIBRATION_TEXTS = {
    "wikitext2": "wikitext2/tokenized.valid.txt",
    "ptb": "ptb/ptb.valid.txt",
    "lambada": "lambada/lambada_development_plain_text.txt",
}


def eval_text(name: str) -> str:
    """The whole test text of a shipped perplexity task."""
    if name not in EVAL_TEXTS:
        raise LowbitError(f"unknown perplexity text {name!r}; choose one of: {', '.join(EVAL_TEXTS)}")
    return EVAL_TEXTS[name]()


def read_text_file(path: str | Path) -> str:
    """A user's UTF-8 text file, refused with one clear line if missing, unreadable or empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LowbitError(f"text file does not exist: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LowbitError(f"text file {path} is not UTF-8 ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise LowbitError(f"text file {path} is empty; give a file with text in it")
    return text


def calibration_text(source: str) -> str:
    """A shipped calibration text by name, or the contents of a file path."""
    if source in CALIBRATION_TEXTS:
        return _read(CALIBRATION_TEXTS[source])
    if source in EVAL_TEXTS:
        raise LowbitError(f"{source!r} is a test split and is never used for calibration; use one of {', '.join(CALIBRATION_TEXTS)}")
    return read_text_file(source)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, with the tokenizer's defaults; returns a 1-D LongTensor."""
    return torch.as_tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long).reshape(-1)


def require_tokens(ids: torch.Tensor, needed: int, what: str, hint: str) -> None:
    if ids.numel() < needed:
        raise LowbitError(f"{what} has {ids.numel()} tokens but at least {needed} are needed; {hint}")


def calibration_windows(
    tokenizer, source: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from a calibration text, reproducible from ``seed``."""
    ids = tokenize_text(tokenizer, calibration_text(source))
    require_tokens(ids, seqlen + 1, f"calibration text {source!r}", "use a longer text or a smaller --seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
