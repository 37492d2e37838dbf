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
  The rounding noise is one 2N x K draw indexed by row (a shape the sample does not decide: no host sync); the
  kernel path draws it in-kernel (Philox, ``lowbit.kernels.philox``), never materialised.

On the Triton backend nothing here waits for the host: grad-input's gathered GEMM scatters its rows into the
output, grad-weight is one GEMM gathering the kept rows along its reduction (``lowbit.kernels.sampled_gemm``).
The sample itself (scores, water-filling, Bernoulli keep, 1/p, ordering into groups) is two Triton kernels plus a
sort and a cumsum per product (``sampled_gemm.row_scores`` / ``sample_plan``; their references are
``row_scores_reference`` / ``sample_plan_reference`` below, equal bit for bit, same uniforms from the generator).
"""

from __future__ import annotations

import os

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.int_gemm import product_bound
from lowbit.kernels.sampled_gemm import SAT_EPS, SamplePlan
from lowbit.train.dispatch import FP32_EXACT, int_matmul
from lowbit.train import sampling
from lowbit.train.sampling import RowSample, bit_split, keep_rows, sample_rows, stochastic_quantize

SAMPLING_ENV = "LOWBIT_SAMPLING"


def split_rows(g: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit-split ``g`` (N x C) into the 2N x C INT4 rows and each row's weight (``14/s`` or ``1/s``)."""
    return bit_split(g, generator).stacked()


def split_rows_with_norms(g: torch.Tensor, generator: torch.Generator | None):
    """``split_rows`` plus the rows' squared norms: on the Triton backend one fused pass over ``g`` in its own
    dtype (bf16 under autocast: no float32 copy), drawing its noise in-kernel from one seed, writing int8 rows (the
    GEMM operand), the norms and the weights; otherwise the reference split (norms None: computed where needed)."""
    if g.dim() == 2 and _kernel_backend(g):
        from lowbit.kernels.bitsplit import split_rows as fused_split
        from lowbit.kernels.philox import draw_seed

        fused = fused_split(g, draw_seed(generator, g.device), torch.int8)
        return fused.rows, fused.weight, fused.sq_norms
    rows, weight = split_rows(g.float(), generator)
    return rows, weight, None


def _kernel_backend(x: torch.Tensor) -> bool:
    from lowbit.kernels.dispatch import backend_for

    return backend_for(x) == "triton"


def _int8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int8 else x.to(torch.int8)


def _unfloat8(x: torch.Tensor) -> torch.Tensor:
    """The reference paths take the forward's float8 operand as int8 (few float8 ops exist)."""
    return x.to(torch.int8) if x.dtype == torch.float8_e4m3fn else x


def _one_byte(x: torch.Tensor) -> torch.Tensor:
    """The kernel paths' integer operand: int8, or the forward's float8 as it is (the kernels that read it convert
    it in registers: no N x K conversion pass)."""
    from lowbit.kernels.sampled_gemm import ONE_BYTE

    return x if x.dtype in ONE_BYTE else x.to(torch.int8)


def int4_grad_input(
    rows: torch.Tensor, weight: torch.Tensor, qw: torch.Tensor, ratio: float,
    generator: torch.Generator | None, bits_w: int, sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased ``G qw`` (N x K) from the split rows of ``G`` (already carrying any per-column weight step).

    ``sq_norms``: the rows' squared norms if the fused split computed them (else computed here)."""
    n2 = rows.shape[0]
    n = n2 // 2
    out = torch.zeros(n, qw.shape[1], device=rows.device)
    if _kernel_backend(rows):
        # fused sample (no host sync), then one gathered GEMM over the kept rows with w/p in its epilogue, each row
        # added straight into its token's output row (at most two rows per token: exact)
        from lowbit.kernels.int_gemm import int8_matmul
        from lowbit.kernels.sampled_gemm import transpose_int8

        plan = _plan(rows, weight, sq_norms, None, ratio, generator)
        qw_t = transpose_int8(_one_byte(qw))  # one tiled pass (float8 -> int8 on the way); torch's is slow
        return int8_matmul(_int8(rows), qw_t, index=plan.index, count=plan.ends[2:], row_scale=plan.val,
                           scatter_into=out)
    qw = _unfloat8(qw)
    sample = sample_rows(weight * _row_norms(rows, sq_norms), ratio, generator)
    if sample.count is not None:  # padded sample (CUDA reference backend): the same gathered, scattered product
        from lowbit.kernels.int_gemm import int8_matmul_reference

        return int8_matmul_reference(_int8(rows), _int8(qw.T.contiguous()), index=sample.index, count=sample.count,
                                     row_scale=weight[sample.index] * sample.inv_p, scatter_into=out)
    if sample.index.numel() == 0:
        return out
    prod = int_matmul(rows[sample.index], qw.T.contiguous(), bits_a=4, bits_b=bits_w)
    coef = (weight[sample.index] * sample.inv_p).to(prod.dtype)
    return out.index_add_(0, sample.index % n, (prod * coef[:, None]).float())


def _group_rows(sample: RowSample, n: int):
    """Grad-weight's order of a sample: saturated hi rows, saturated lo rows, sampled rows (padded: then the rest),
    each in row order; returns the sorted ``index``, ``p_kept``, group ids and the three group ends."""
    idx, p = sample.index, sample.p_kept
    group = torch.where(p >= 1 - SAT_EPS, (idx >= n).long(), 2)
    if sample.count is not None:  # padded: entries past the count go last
        group = torch.where(torch.arange(idx.shape[0], device=idx.device) < sample.count, group, 3)
    order = torch.argsort(group, stable=True)  # kept rows keep their row order within each group
    idx, p, group = idx[order], p[order], group[order]
    return idx, p, group, torch.stack([(group == i).sum() for i in range(3)]).cumsum(0)


def fused_sampling() -> bool:
    """``LOWBIT_SAMPLING=fused`` (default): the kernel path samples with two Triton kernels; ``reference``: with
    their pure-PyTorch references (~40 small ops per product, the pre-fusion cost; same results bit for bit)."""
    choice = os.environ.get(SAMPLING_ENV, "fused").strip().lower() or "fused"
    if choice not in ("fused", "reference"):
        raise LowbitError(f"{SAMPLING_ENV} must be fused or reference, got {choice!r}")
    return choice == "fused"


def _plan(rows, weight, sq_norms, qx, ratio, generator) -> SamplePlan:
    """The kernel path's sample: fused scores and ordered sample (``sampled_gemm.row_scores`` / ``sample_plan``),
    drawing the same uniforms from ``generator`` as ``sample_rows``; ``qx`` given: grad-weight's (grouped)."""
    if fused_sampling():
        from lowbit.kernels.sampled_gemm import row_scores, sample_plan
    else:
        row_scores, sample_plan = row_scores_reference, sample_plan_reference
    scores, rowmax = row_scores(_sq_norms(rows, sq_norms), weight, qx)
    u = torch.rand(scores.shape[0], generator=generator, device=rows.device) if ratio < 1 else None
    return sample_plan(scores, weight, u, rowmax, ratio, grouped=qx is not None)


def row_scores_reference(sq_norms: torch.Tensor, weight: torch.Tensor, qx: torch.Tensor | None = None):
    """What ``sampled_gemm.row_scores`` computes, with the reference path's operations."""
    scores = weight * _sqrt_rn(sq_norms)
    if qx is not None:
        n = qx.shape[0]
        scores = scores * _row_norms(qx)[torch.arange(2 * n, device=qx.device) % n]
    rowmax = None if qx is None else qx.float().abs().amax(dim=1)
    return scores.double().clamp_min(0), rowmax


def sample_plan_reference(scores, weight, u, rowmax, ratio: float, grouped: bool) -> SamplePlan:
    """What ``sampled_gemm.sample_plan`` computes: ``keep_rows`` (``waterfill``), the padded ``sample_rows``
    order, grad-weight's ``_group_rows`` and ``requantize_scale`` (see ``SamplePlan``)."""
    r = scores.shape[0]
    p, keep = keep_rows(scores, ratio, u)
    index = torch.argsort((~keep).to(torch.uint8), stable=True)
    kept = keep[index]
    p_kept = torch.where(kept, p[index], torch.ones_like(p))
    inv_p = torch.where(kept, 1.0 / p_kept, torch.zeros_like(p))
    sample = RowSample(index, inv_p, p_kept, keep.sum())
    if not grouped:
        return SamplePlan(index, weight[index] * inv_p, sample.count.reshape(1).repeat(3))
    idx, p, group, ends = _group_rows(sample, r // 2)
    f = torch.where(group == 2, weight[idx] / p, torch.zeros_like(p))
    amax = (f * rowmax[idx % (r // 2)]).amax() if ratio < 1 and r else f.new_zeros(())
    scale, gain = requantize_scale(amax)
    return SamplePlan(idx, f, ends, torch.stack([scale, gain, weight[0], weight[-1]]) if r else f.new_zeros(4))


def _sqrt_rn(sumsq: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square roots of exact integer sums of squares (the kernels' ``sqrt_rn``; torch's
    vectorised float32 CPU sqrt can be one ulp off)."""
    return sumsq.double().sqrt().float()


def _sq_norms(rows: torch.Tensor, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Squared row norms of an integer matrix (exact below 2^24): ``sq_norms`` when the bit split gave them."""
    return sq_norms if sq_norms is not None else rows.float().square().sum(dim=1)


def _row_norms(rows: torch.Tensor, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Row norms of an integer matrix, correctly rounded."""
    return _sqrt_rn(_sq_norms(rows, sq_norms))


def requantize_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``stochastic_quantize``'s 4-bit scale for ``max|x~| = amax``, and the gain ``x~`` is multiplied by (0 where
    the scale overflows: the reference then zeroes ``x~``); on the device."""
    raw = 7.0 / amax.clamp_min(torch.finfo(torch.float32).tiny)
    finite = torch.isfinite(raw)
    scale = torch.where((amax > 0) & finite, raw, torch.ones_like(amax))
    return scale, torch.where(finite, scale, torch.zeros_like(scale))


def requantize_rows(x: torch.Tensor, f: torch.Tensor, gain: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sampled rows' ``x~ = x f`` (f per row) stochastically rounded to INT4 with ``noise`` (float32 integers)."""
    t = ((x.float() * f[:, None]) * gain).clamp(-7, 7)
    return torch.floor(t + noise).clamp(-7, 7)


def int4_grad_weight(
    rows: torch.Tensor, weight: torch.Tensor, qx: torch.Tensor, ratio: float,
    generator: torch.Generator | None, bits_x: int, sq_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unbiased ``G^T qx`` (C x K) from the split rows of ``G`` (already carrying any per-token activation step).

    The kept rows are sorted (on the device) into saturated hi rows, saturated lo rows and sampled rows; the
    sampled rows' re-quantization draws one 2N x K noise tensor (indexed by row, so the order of the kept rows
    does not matter) whenever sampling is on; the kernel path draws it in its pack kernel from one seed instead.
    On the Triton backend one GEMM gathers the kept rows along its reduction (``lowbit.kernels.sampled_gemm``),
    with no host sync; the reference runs three products."""
    n, k = qx.shape
    if _kernel_backend(rows) and product_bound(2 * n, 4, max(bits_x, 4)) < FP32_EXACT:
        from lowbit.kernels.sampled_gemm import grad_weight_gemm

        from lowbit.kernels.philox import draw_seed

        qx = _one_byte(qx)
        plan = _plan(rows, weight, sq_norms, qx, ratio, generator)  # draws u, then the noise's seed below
        extra = (None,) * 4
        if ratio < 1:
            extra = (plan.val, plan.rq[1], plan.rq[0], draw_seed(generator, rows.device))
        return grad_weight_gemm(_int8(rows), qx, plan.index, plan.ends, plan.rq[2:], *extra)
    qx = _unfloat8(qx)
    token = torch.arange(2 * n, device=rows.device) % n
    sample = sample_rows(weight * _row_norms(rows, sq_norms) * _row_norms(qx)[token], ratio, generator)
    idx, p, group, ends = _group_rows(sample, n)
    w = torch.stack([weight[0], weight[-1]])  # hi rows weigh 14/s, lo rows 1/s
    noise = f = gain = scale = None
    if ratio < 1:
        f = torch.where(group == 2, weight[idx] / p, torch.zeros_like(p))
        amax = (f * qx.float().abs().amax(dim=1)[token[idx]]).amax() if idx.numel() else f.new_zeros(())
        scale, gain = requantize_scale(amax)  # max |qx f| over the sampled rows = max_i (max_k |qx_ik|) f_i
        noise = sampling.uniform_noise((2 * n, k), generator, rows.device)
    return _grad_weight_reference(rows, qx, token, idx, ends, w, f, gain, scale, noise, bits_x)


def _grad_weight_reference(rows, qx, token, idx, ends, w, f, gain, scale, noise, bits_x):
    """The three products on gathered copies (reads the group ends on the host: the reference path)."""
    e0, e1, e2 = ends.tolist()
    out = torch.zeros(rows.shape[1], qx.shape[1], device=rows.device)
    for part, wi in ((idx[:e0], w[0]), (idx[e0:e1], w[1])):
        if part.numel():
            prod = int_matmul(rows[part].T.contiguous(), qx[token[part]].T.contiguous(), bits_a=4, bits_b=bits_x)
            out += (prod * wi).float()
    if e2 > e1 and noise is not None:
        sampled = idx[e1:e2]
        q3 = requantize_rows(qx[token[sampled]], f[e1:e2], gain, noise[sampled])
        prod = int_matmul(rows[sampled].T.contiguous(), _like(q3, rows).T.contiguous(), bits_a=4, bits_b=4)
        out += (prod / scale).float()
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
