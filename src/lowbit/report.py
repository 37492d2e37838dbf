"""Results as rows: evaluate a model, print a side-by-side table, write JSON (one object per number)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from lowbit.eval import EvalOptions, evaluate


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: str | None) -> str:
    if device and device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores)"


def eval_and_record(loaded, tasks: list[str], options: EvalOptions, label: str, config) -> list[dict]:
    """Evaluate ``loaded`` on ``tasks``; one row per metric, labelled ``label`` (a table column)."""
    results = evaluate(loaded.model, loaded.tokenizer, tasks, options)
    base = {
        "name": label,
        "model": loaded.source,
        "method": config.method if config else "none",
        "config": {"wbits": config.wbits, "abits": config.abits, "group_size": config.group_size,
                   **({"rotate": config.rotate} if config.rotate else {})} if config else None,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device": _device_name(options.device),
        "command": " ".join(shlex.quote(a) for a in ["lowbit", *sys.argv[1:]]),
        "commit": _commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "limit": options.limit,
    }
    return [
        {**base, "task": r.task, "metric": metric, "value": value, "details": r.details}
        for r in results for metric, value in r.metrics.items() if not metric.endswith("_stderr")
    ]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3e}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print a task × column table (markdown, so it pastes into BENCHMARKS.md)."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    value = {(r["task"], r["metric"], r["name"]): r["value"] for r in rows}
    print("| task | metric | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for task, metric in keys:
        cells = " | ".join(_fmt(value.get((task, metric, c))) for c in columns)
        print(f"| {task} | {metric} | {cells} |")


def print_markdown(header: list[str], lines: list[str]) -> None:
    """Print pre-formatted ``| a | b |`` rows under a markdown header (benchmark scripts' summary tables)."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join(lines))


def write_json(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
