"""Grad-input and grad-weight of ``Y = (sx qx)(sw qw)^T`` with low-bit operands, unbiased.

Target: the straight-through gradients ``dX^ = G W^`` and ``dW^ = G^T X^`` of the quantized forward (``X^``,
``W^`` the dequantized Hadamard-domain operands, ``G = dL/dY``). Per-row/column scales that lie along a
product's reduction dimension are folded into ``G`` before it is quantized (``G diag(sw)`` for grad-input,
``diag(sx) G`` for grad-weight), so every product below is integer x integer with scales only on its outputs.

INT4 (``int4_grad_input`` / ``int4_grad_weight``): ``G`` is bit-split into the 2N x C INT4 matrix ``[hi; lo]``
(row weights ``14/s``, ``1/s``); leverage-score sampling keeps rows with water-filled ``p_i`` and reweights
kept rows by ``1/p_i``.

- grad-input: row ``i`` of the product ``[hi; lo] qw`` only feeds token ``i mod N``, so ``1/p_i`` is an output
  scale: one INT4 x INT4 product over the kept rows, scaled, scatter-added. Scores: ``w_i ||row_i||``.
  Unbiased: E over sampling of ``(m_i/p_i) r_i`` is ``r_i``; E over the split's rounding is ``G``.
- grad-weight: the rows are the reduction dimension, so ``1/p_i`` cannot be an output scale. Kept rows with
  ``p_i = 1`` use the forward's own INT4 ``qx`` exactly (two products: hi rows x 14/s, lo rows x 1/s). Rows
  kept with ``p_i < 1`` take ``x~_i = (w_i/p_i) qx_i`` re-quantized to INT4 by stochastic rounding with one
  scale (water-filling bounds ``||x~_i|| <= 1/(c ||row_i||)``, so the range stays tame). Scores:
  ``w_i ||row_i|| ||qx_i||``. Unbiased: the stochastic rounding is unbiased given the sample, the sample is
  unbiased given the split, the split is unbiased for ``G``. The price is extra variance on sampled rows only.
"""

from __future__ import annotations

import torch

from lowbit.train.dispatch import int_matmul
from lowbit.train.sampling import bit_split, sample_rows, stochastic_quantize

SAT_EPS = 1e-6


def split_rows(g: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-split ``g`` (N x C) into the 2N x C INT4 rows and each row's weight (``14/s`` or ``1/s``)."""
    return bit_split(g, generator).stacked()


def int4_grad_input(
    rows: torch.Tensor, weight: torch.Tensor, qw: torch.Tensor, ratio: float,
    generator: torch.Generator | None, bits_w: int,
) -> torch.Tensor:
    """Unbiased ``G qw`` (N x K) from the split rows of ``G`` (already carrying any per-column weight step)."""
    n2 = rows.shape[0]
    n = n2 // 2
    scores = weight * rows.norm(dim=1)
    sample = sample_rows(scores, ratio, generator)
    out = torch.zeros(n, qw.shape[1], device=rows.device)
    if sample.index.numel() == 0:
        return out
    prod = int_matmul(rows[sample.index], qw.T.contiguous(), bits_a=4, bits_b=bits_w)
    coef = (weight[sample.index] * sample.inv_p).to(prod.dtype)
    return out.index_add_(0, sample.index % n, (prod * coef[:, None]).float())


def int4_grad_weight(
    rows: torch.Tensor, weight: torch.Tensor, qx: torch.Tensor, ratio: float,
    generator: torch.Generator | None, bits_x: int,
) -> torch.Tensor:
    """Unbiased ``G^T qx`` (C x K) from the split rows of ``G`` (already carrying any per-token activation step)."""
    n = qx.shape[0]
    token = torch.arange(2 * n, device=rows.device) % n
    scores = weight * rows.norm(dim=1) * qx.norm(dim=1)[token]
    sample = sample_rows(scores, ratio, generator)
    out = torch.zeros(rows.shape[1], qx.shape[1], device=rows.device)
    if sample.index.numel() == 0:
        return out
    idx, p = sample.index, sample.p_kept
    saturated = p >= 1 - SAT_EPS
    for part in (idx[saturated & (idx < n)], idx[saturated & (idx >= n)]):  # exact: hi rows, then lo rows
        if part.numel():
            prod = int_matmul(rows[part].T.contiguous(), qx[token[part]].T.contiguous(), bits_a=4, bits_b=bits_x)
            out += (prod * weight[part[0]]).float()
    sampled = idx[~saturated]
    if sampled.numel():
        x_tilde = qx[token[sampled]] * (weight[sampled] / p[~saturated])[:, None]
        q3 = stochastic_quantize(x_tilde, 4, generator)
        prod = int_matmul(rows[sampled].T.contiguous(), q3.q.T.contiguous(), bits_a=4, bits_b=4)
        out += (prod / q3.scale).float()
    return out


def int8_grads(
    g_in: torch.Tensor, g_w: torch.Tensor | None, qx: torch.Tensor, qw: torch.Tensor,
    generator: torch.Generator | None, bits: int, need_input: bool, need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """INT8 backward: per-tensor stochastic-rounded INT8 ``G`` (unbiased), no sampling. ``g_w=None``: share ``g_in``."""
    gi = gw = None
    q_in = stochastic_quantize(g_in, 8, generator) if need_input or g_w is None else None
    if need_input:
        gi = (int_matmul(q_in.q, qw.T.contiguous(), bits_a=8, bits_b=bits) / q_in.scale).float()
    if need_weight:
        qg = q_in if g_w is None else stochastic_quantize(g_w, 8, generator)
        gw = (int_matmul(qg.q.T.contiguous(), qx.T.contiguous(), bits_a=8, bits_b=bits) / qg.scale).float()
    return gi, gw


def heavy_tailed_problem(seed: int, n: int = 48, c: int = 32, k: int = 64):
    """A seeded ``(grad, qw, qx)`` with rows spanning two decades and 20% zero input rows: where leverage-score
    sampling matters. The numerics tests and ``benchmarks/train_numerics.py`` measure on it."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, c, generator=g) * torch.logspace(-2, 0, n).reshape(-1, 1)
    qw = torch.randint(-8, 8, (c, k), generator=g).float()
    qx = torch.randint(-8, 8, (n, k), generator=g).float() * (torch.rand(n, 1, generator=g) < 0.8)
    return grad, qw, qx
