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
from lowbit.train.sampling import SPLIT_BASE, bit_split, sample_rows, stochastic_quantize

SAT_EPS = 1e-6


def split_rows(g: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-split ``g`` (N x C) into the 2N x C INT4 rows and each row's weight (``14/s`` or ``1/s``)."""
    return bit_split(g, generator).stacked()


def split_rows_with_norms(g: torch.Tensor, generator: torch.Generator | None):
    """``split_rows`` plus the rows' squared norms: on the Triton backend one fused pass writing int8 rows (the
    GEMM operand) and the norms; otherwise the reference split (norms None: computed where needed)."""
    from lowbit.kernels.dispatch import backend_for

    if g.dim() == 2 and backend_for(g) == "triton":
        from lowbit.kernels.bitsplit import split_rows as fused_split

        noise = torch.rand(g.shape, generator=generator, device=g.device, dtype=torch.float32)
        fused = fused_split(g, noise, torch.int8)
        n = g.shape[0]
        weight = torch.cat([torch.full((n,), float(SPLIT_BASE), device=g.device),
                            torch.ones(n, device=g.device)]) / fused.scale
        return fused.rows, weight, fused.sq_norms
    rows, weight = split_rows(g, generator)
    return rows, weight, None


def _gathered_rows_matmul(rows, b, index, count, row_scale):
    """``row_scale * (rows[index] @ b.T)`` over the first ``count`` entries of ``index`` (zero rows past it).

    The Triton INT8 GEMM reads the kept rows in place and skips tiles past the device-side count (no host sync);
    the reference backend runs its exact reference."""
    from lowbit.kernels.dispatch import backend_for
    from lowbit.kernels.int_gemm import int8_matmul, int8_matmul_reference

    fn = int8_matmul if backend_for(rows) == "triton" else int8_matmul_reference
    return fn(_int8(rows), _int8(b), index=index, count=count, row_scale=row_scale)


def _int8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int8 else x.to(torch.int8)


def int4_grad_input(
    rows: torch.Tensor, weight: torch.Tensor, qw: torch.Tensor, ratio: float,
    generator: torch.Generator | None, bits_w: int, sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased ``G qw`` (N x K) from the split rows of ``G`` (already carrying any per-column weight step).

    ``sq_norms``: the rows' squared norms if the fused split computed them (else computed here)."""
    n2 = rows.shape[0]
    n = n2 // 2
    norms = sq_norms.sqrt() if sq_norms is not None else rows.float().norm(dim=1)
    scores = weight * norms
    sample = sample_rows(scores, ratio, generator)
    out = torch.zeros(n, qw.shape[1], device=rows.device)
    if sample.count is not None:  # padded sample (CUDA): one gathered GEMM, 1/p in its epilogue, no host sync
        coef = weight[sample.index] * sample.inv_p
        prod = _gathered_rows_matmul(rows, qw.T.contiguous(), sample.index, sample.count, coef)
        return out.index_add_(0, sample.index % n, prod)
    if sample.index.numel() == 0:
        return out
    prod = int_matmul(rows[sample.index], qw.T.contiguous(), bits_a=4, bits_b=bits_w)
    coef = (weight[sample.index] * sample.inv_p).to(prod.dtype)
    return out.index_add_(0, sample.index % n, (prod * coef[:, None]).float())


def int4_grad_weight(
    rows: torch.Tensor, weight: torch.Tensor, qx: torch.Tensor, ratio: float,
    generator: torch.Generator | None, bits_x: int, sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased ``G^T qx`` (C x K) from the split rows of ``G`` (already carrying any per-token activation step)."""
    n = qx.shape[0]
    token = torch.arange(2 * n, device=rows.device) % n
    norms = sq_norms.sqrt() if sq_norms is not None else rows.float().norm(dim=1)
    scores = weight * norms * qx.float().norm(dim=1)[token]
    sample = sample_rows(scores, ratio, generator)
    out = torch.zeros(rows.shape[1], qx.shape[1], device=rows.device)
    idx, p = sample.index, sample.p_kept
    if sample.count is not None:
        # padded sample: sort the kept rows into (saturated hi, saturated lo, sampled) and read the three group
        # sizes with one small host copy; every gather below is then a plain slice
        live = torch.arange(idx.shape[0], device=idx.device) < sample.count
        group = torch.where(p >= 1 - SAT_EPS, (idx >= n).long(), 2)
        group = torch.where(live, group, 3)
        order = torch.argsort(group, stable=True)
        idx, p = idx[order], p[order]
        sizes = torch.stack([(group == i).sum() for i in range(3)]).tolist()  # the backward's one host sync
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        parts = [idx[bounds[0]:bounds[1]], idx[bounds[1]:bounds[2]]]
        sampled, p_sampled = idx[bounds[2]:bounds[3]], p[bounds[2]:bounds[3]]
    else:
        if idx.numel() == 0:
            return out
        saturated = p >= 1 - SAT_EPS
        parts = [idx[saturated & (idx < n)], idx[saturated & (idx >= n)]]
        sampled, p_sampled = idx[~saturated], p[~saturated]
    for part, w in zip(parts, (weight[0], weight[-1])):  # exact: hi rows (14/s), then lo rows (1/s)
        if part.numel():
            prod = int_matmul(rows[part].T.contiguous(), qx[token[part]].T.contiguous(), bits_a=4, bits_b=bits_x)
            out += (prod * w).float()
    if sampled.numel():
        x_tilde = qx[token[sampled]].float() * (weight[sampled] / p_sampled)[:, None]
        q3 = stochastic_quantize(x_tilde, 4, generator)
        prod = int_matmul(rows[sampled].T.contiguous(), _like(q3.q, rows).T.contiguous(), bits_a=4, bits_b=4)
        out += (prod / q3.scale).float()
    return out


def _like(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Integer values in the GEMM operand dtype the other operand uses (one byte on the kernel paths)."""
    return q if rows.dtype == torch.float32 else q.to(rows.dtype)


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
