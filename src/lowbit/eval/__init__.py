"""Evaluation: perplexity tasks and zero-shot tasks behind one ``evaluate`` call.

Task names: ``wikitext2``, ``ptb``, ``lambada_text`` (perplexity, paper protocol), ``piqa``, ``arc_easy``,
``arc_challenge``, ``lambada`` (zero-shot, lm-eval-harness style), or a path to a UTF-8 text file
(perplexity on that file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowbit.data.texts import EVAL_TEXTS, eval_text, read_text_file, require_tokens, tokenize_text
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import PerplexityResult, perplexity
from lowbit.eval.zeroshot import ZEROSHOT_TASKS as ZEROSHOT_TASK_NAMES
from lowbit.eval.zeroshot import evaluate_zeroshot

PERPLEXITY_TASKS = tuple(EVAL_TEXTS)


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: window length, batch sizes, an optional prefix ``limit`` (windows or items), device."""

    seqlen: int = 2048
    batch_size: int = 1  # perplexity windows per forward pass
    zeroshot_batch_size: int = 32  # zero-shot requests per forward pass
    limit: int | None = None
    device: str | None = None
    progress: bool = True


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    details: dict = field(default_factory=dict)


def _is_text_file(task: str) -> bool:
    return task not in PERPLEXITY_TASKS and task not in ZEROSHOT_TASK_NAMES and (
        "/" in task or task.endswith(".txt") or Path(task).exists()
    )


def check_tasks(tasks: list[str]) -> None:
    """Refuse unknown task names before any model work starts; a text file must exist and not be empty."""
    for task in tasks:
        if _is_text_file(task):
            read_text_file(task)
        elif task not in PERPLEXITY_TASKS and task not in ZEROSHOT_TASK_NAMES:
            known = ", ".join(PERPLEXITY_TASKS + ZEROSHOT_TASK_NAMES)
            raise LowbitError(f"unknown task {task!r}; choose from {known}, or give a path to a .txt file")


def _perplexity_task(model, tokenizer, task: str, options: EvalOptions) -> TaskResult:
    text = read_text_file(task) if _is_text_file(task) else eval_text(task)
    ids = tokenize_text(tokenizer, text)
    require_tokens(ids, options.seqlen, f"the text of {task!r}", f"give a longer text or a smaller --seqlen (now {options.seqlen})")
    r: PerplexityResult = perplexity(
        model, ids, options.seqlen, options.batch_size, options.limit, options.device, desc=task, progress=options.progress
    )
    details = {"tokens_in_text": ids.numel(), "windows": r.windows, "windows_total": r.windows_total,
               "seqlen": r.seqlen, "tokens_scored": r.tokens_scored}
    return TaskResult(task, {"perplexity": r.perplexity}, details)


def evaluate(model, tokenizer, tasks: list[str], options: EvalOptions | None = None) -> list[TaskResult]:
    """Run each task on ``model``; returns one ``TaskResult`` per task, in order."""
    options = options or EvalOptions()
    check_tasks(tasks)
    model.eval()
    results = []
    for task in tasks:
        if task in ZEROSHOT_TASK_NAMES:
            r = evaluate_zeroshot(model, tokenizer, task, limit=options.limit, batch_size=options.zeroshot_batch_size,
                                  max_length=options.seqlen, device=options.device, progress=options.progress)
            results.append(TaskResult(task, dict(r.metrics), {"items": r.n}))
        else:
            results.append(_perplexity_task(model, tokenizer, task, options))
    return results


__all__ = ["EvalOptions", "PERPLEXITY_TASKS", "TaskResult", "ZEROSHOT_TASK_NAMES", "check_tasks", "evaluate", "perplexity"]
