"""Numerics of the 4-bit training backward on a heavy-tailed gradient (CPU, seeded): bit-split error, and the
relative variance of the sampled INT4 grad-input / grad-weight for leverage-score vs uniform row sampling.

    python benchmarks/train_numerics.py   → benchmarks/results/train_numerics.json
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

import lowbit.train.backward as bwd
from lowbit.report import print_markdown, write_json
from lowbit.train.sampling import bit_split

DRAWS = 300


def relative_variance(estimator, grad, operand, exact, ratio, seed=4) -> float:
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(DRAWS):
        rows, weight = bwd.split_rows(grad, gen)
        draws.append(estimator(rows, weight, operand, ratio, gen, 4))
    d = torch.stack(draws)
    return float(((d - exact) ** 2).sum(dim=(1, 2)).mean() / (exact**2).sum())


def main() -> None:
    grad, qw, qx = bwd.heavy_tailed_problem(3)
    split_err = float((bit_split(grad, torch.Generator().manual_seed(1)).dequantize() - grad).abs().max() / grad.abs().max())
    rows, table = [{"name": "bit_split_max_error_over_max_abs", "value": split_err, "bound": 1 / 98}], []
    table.append(f"| bit split: max error / max abs(g) | {split_err:.5f} (bound {1 / 98:.5f}) | |")
    cases = [("off (ratio 1)", 1.0, False), ("leverage, ratio 0.5", 0.5, False), ("leverage, ratio 0.25", 0.25, False),
             ("uniform, ratio 0.5", 0.5, True)]
    for label, ratio, uniform in cases:
        # uniform: every row kept with the same probability, at the same expected budget
        patch = mock.patch("lowbit.train.sampling.waterfill", lambda s, m: torch.full_like(s, m / s.numel())) if uniform else nullcontext()
        with patch:
            vi = relative_variance(bwd.int4_grad_input, grad, qw, grad @ qw, ratio)
            vw = relative_variance(bwd.int4_grad_weight, grad, qx, grad.T @ qx, ratio)
        rows.append({"name": f"relative_variance {label}", "grad_input": vi, "grad_weight": vw, "draws": DRAWS})
        table.append(f"| relative variance, {label} | {vi:.4f} | {vw:.4f} |")
    print_markdown(["quantity", "grad-input", "grad-weight"], table)
    write_json(rows, Path(__file__).parent / "results" / "train_numerics.json")


if __name__ == "__main__":
    sys.exit(main())
