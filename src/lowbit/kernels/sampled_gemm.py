"""Grad-weight of the sampled INT4 backward: the kept rows packed K-major, then one Triton INT8 GEMM over them.

``grad_weight_gemm`` computes, for the kept rows of the bit-split gradient sorted into three groups (saturated hi
rows, saturated lo rows, sampled rows; ``ends`` holds the device-side group ends, so no host sync), the C x K

    out = (hi^T qx[tok]) * w_hi + (lo^T qx[tok]) * w_lo + (smp^T q3) / scale

where ``hi``/``lo``/``smp`` are the groups' rows of ``rows`` (2N x C, int8) and ``tok = index mod N``. The sampled
rows' right operand is ``q3 = clamp(floor(clamp(qx f gain, -7, 7) + u), -7, 7)`` (``u`` the kept row's Philox
uniforms, drawn in the pack kernel: ``lowbit.kernels.philox``; no 2N x K noise tensor).

Why two steps. The reduction runs over rows, the *outer* dimension of the row-major ``rows`` and ``qx``; Hopper's
INT8 ``wgmma`` takes only K-major operands, and a GEMM gathering along K in place ran unpipelined (synchronous
loads, a wait per MMA: ~10x below one GEMM). So ``_pack_kernel`` first writes the kept rows,
transposed, into compact K-major buffers (``C x width`` and ``K x width`` int8; the sampled rows re-quantized once
here, not once per output tile), each group starting at a multiple of the GEMM's ``BK`` and zero-padded to one,
and ``_grad_weight_kernel`` runs a plain pipelined K-major INT8 GEMM whose three loops end at the groups' padded
ends, read from device memory: the work scales with the kept count, and ``width`` (``2N`` plus padding) is fixed
by the shapes alone (CUDA-graph friendly).

Integer products accumulate exactly in int32; the float32 epilogue runs the reference's operations in the
reference's order (``lowbit.train.backward``), with fp contraction off so no multiply-add is fused, and a
correctly rounded division: the result equals the reference bit for bit. ``row_scores`` and ``sample_plan`` build
the sample these GEMMs read (scores, water level, keep draws, group order) in two launches plus a sort and a cumsum.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch

from lowbit.errors import LowbitError

SAT_EPS = 1e-6  # kept rows with p >= 1 - SAT_EPS count as saturated (kept with certainty)
ONE_BYTE = (torch.int8, torch.float8_e4m3fn)  # integer operands the kernels read (float8: the forward's FP8 GEMM's)

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from lowbit.kernels.int_gemm import grouped_tile
    from lowbit.kernels.philox import uniform

    # combine functions rather than tl.sum/max/min/cumsum: see lowbit.kernels.bitsplit
    _SUM, _MAX, _MIN = tl.standard._sum_combine, tl.standard._elementwise_max, tl.standard._elementwise_min
    SAT_LEVEL = tl.constexpr(1 - SAT_EPS)

    @triton.jit
    def _group_bounds(ends_ptr, PAD: tl.constexpr, SAMPLED: tl.constexpr):
        """The groups' ends ``e0 <= e1 <= e2`` in sorted positions, and in the packed buffers their starts ``s1``,
        ``s2`` and end ``s3`` (each group padded to a multiple of ``PAD``; no sampled group unless SAMPLED)."""
        e0 = tl.load(ends_ptr).to(tl.int32)
        e1 = tl.load(ends_ptr + 1).to(tl.int32)
        e2 = e1
        if SAMPLED:
            e2 = tl.load(ends_ptr + 2).to(tl.int32)
        s1 = tl.multiple_of((e0 + PAD - 1) // PAD * PAD, PAD)
        s2 = tl.multiple_of(s1 + (e1 - e0 + PAD - 1) // PAD * PAD, PAD)
        s3 = tl.multiple_of(s2 + (e2 - e1 + PAD - 1) // PAD * PAD, PAD)
        return e0, e1, e2, s1, s2, s3

    @triton.jit
    def _pack_kernel(src_ptr, index_ptr, ends_ptr, f_ptr, gain_ptr, seed_ptr, out_ptr, W, N, stride_s, stride_o,
                     BP: tl.constexpr, BW: tl.constexpr, PAD: tl.constexpr, TOKENS: tl.constexpr,
                     SAMPLED: tl.constexpr, REQUANT: tl.constexpr):
        """``out[w, p] = src[row(p), w]``: buffer column ``p`` holds the kept row of its group's sorted position
        (``row = index[j]``, or token ``index[j] mod N`` if TOKENS), or zeros in a group's padding; a float8 ``src``
        (the forward's operand) is converted here. REQUANT: the sampled group's rows are re-quantized with their
        ``f``, ``gain`` and the uniforms ``uniform(seed, index[j] * W + w)``."""
        e0, e1, e2, s1, s2, s3 = _group_bounds(ends_ptr, PAD, SAMPLED)
        p0 = tl.program_id(0) * BP
        if p0 < s3:  # columns past the last group are never read: no work
            p = p0 + tl.arange(0, BP)
            w = tl.program_id(1) * BW + tl.arange(0, BW)
            g = (p >= s1).to(tl.int32) + (p >= s2).to(tl.int32)
            j = tl.where(g == 0, p, tl.where(g == 1, p - s1 + e0, p - s2 + e1))
            ok = j < tl.where(g == 0, e0, tl.where(g == 1, e1, e2))
            row = tl.load(index_ptr + j, mask=ok, other=0).to(tl.int64)
            srow = row % N if TOKENS else row
            wok = w < W
            v = tl.load(src_ptr + srow[:, None] * stride_s + w[None, :], mask=ok[:, None] & wok[None, :], other=0.0)
            if src_ptr.dtype.element_ty != tl.int8:
                v = v.to(tl.float32).to(tl.int8)
            if REQUANT:
                smp = ok & (g == 2)
                f = tl.load(f_ptr + j, mask=smp, other=0.0)
                u = uniform(tl.load(seed_ptr), row[:, None] * W + w[None, :])
                t = (v.to(tl.float32) * f[:, None]) * tl.load(gain_ptr)
                t = tl.minimum(tl.maximum(t, -7.0), 7.0)
                q = tl.minimum(tl.maximum(tl.floor(t + u), -7.0), 7.0)
                v = tl.where(smp[:, None], q.to(tl.int8), v)
            tl.store(out_ptr + w[None, :].to(tl.int64) * stride_o + p[:, None], v, mask=wok[None, :])

    @triton.jit
    def _span_dot(a_ptr, b_ptr, start, stop, rm, rn, stride_a, stride_b, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
        """int32 ``a[rm, start:stop] @ b[rn, start:stop]^T`` over K-major packed buffers (``stop - start`` a
        multiple of BK, so no mask: the pipeliner streams both tiles with async copies)."""
        ks = tl.arange(0, BK)
        a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_a
        b_cols = b_ptr + rn[None, :].to(tl.int64) * stride_b
        acc = tl.full((BM, BN), 0, tl.int32)
        for k0 in range(start, stop, BK):
            k0 = tl.multiple_of(k0, BK)
            a = tl.load(a_rows + (k0 + ks)[None, :])
            b = tl.load(b_cols + (k0 + ks)[:, None])
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        return acc

    @triton.jit
    def _grad_weight_kernel(a_ptr, b_ptr, ends_ptr, w_ptr, scale_ptr, out_ptr, C, K, stride_a, stride_b, stride_o,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                            SAMPLED: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), C, K, BM, BN, GROUP_M)
        cm = pid_m * BM + tl.arange(0, BM)
        kn = pid_n * BN + tl.arange(0, BN)
        rm, rn = cm % C, kn % K  # rows past the edge re-read valid ones; their results are not stored
        e0, e1, e2, s1, s2, s3 = _group_bounds(ends_ptr, BK, SAMPLED)
        acc = _span_dot(a_ptr, b_ptr, 0, s1, rm, rn, stride_a, stride_b, BM, BN, BK)  # hi rows: weight 14/s
        y = acc.to(tl.float32) * tl.load(w_ptr)
        acc = _span_dot(a_ptr, b_ptr, s1, s2, rm, rn, stride_a, stride_b, BM, BN, BK)  # lo rows: weight 1/s
        y = y + acc.to(tl.float32) * tl.load(w_ptr + 1)
        if SAMPLED:  # rows kept with p < 1, re-quantized with one scale
            acc = _span_dot(a_ptr, b_ptr, s2, s3, rm, rn, stride_a, stride_b, BM, BN, BK)
            y = y + tl.math.div_rn(acc.to(tl.float32), tl.load(scale_ptr))
        mask = (cm[:, None] < C) & (kn[None, :] < K)
        tl.store(out_ptr + cm[:, None].to(tl.int64) * stride_o + kn[None, :], y, mask=mask)

    @triton.jit
    def _transpose_kernel(x_ptr, out_ptr, R, C, stride_x, stride_o, BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (r[:, None] < R) & (c[None, :] < C)
        v = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + c[None, :], mask=mask)
        if x_ptr.dtype.element_ty != tl.int8:  # the forward's float8 operand: converted on the way
            v = v.to(tl.float32).to(tl.int8)
        tl.store(out_ptr + c[None, :].to(tl.int64) * stride_o + r[:, None], v, mask=mask)

    @triton.jit
    def _scores_kernel(sq_ptr, w_ptr, x_ptr, out_ptr, rmax_ptr, N, K, stride_x, BT: tl.constexpr, BK: tl.constexpr,
                       HAS_X: tl.constexpr):
        """Scores of rows ``t`` and ``t + N``: ``max(double(w sqrt(sq) [* ||x_t||]), 0)``; with HAS_X also
        ``max_k |x_tk|`` per token (int8 ``x``: its squared sums are exact integers in float32)."""
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        ok = t < N
        hi = tl.load(w_ptr + t, mask=ok, other=0.0) * tl.sqrt_rn(tl.load(sq_ptr + t, mask=ok, other=0.0))
        lo = tl.load(w_ptr + N + t, mask=ok, other=0.0) * tl.sqrt_rn(tl.load(sq_ptr + N + t, mask=ok, other=0.0))
        if HAS_X:
            ks = tl.arange(0, BK)
            ss = tl.full((BT,), 0.0, tl.float32)
            mx = tl.full((BT,), 0.0, tl.float32)
            for k0 in range(0, K, BK):
                m = ok[:, None] & ((k0 + ks) < K)[None, :]
                v = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_x + (k0 + ks)[None, :], mask=m, other=0.0)
                v = v.to(tl.float32)
                ss += tl.reduce(v * v, 1, _SUM)
                mx = tl.maximum(mx, tl.reduce(tl.abs(v), 1, _MAX))
            norm = tl.sqrt_rn(ss)
            hi, lo = hi * norm, lo * norm
            tl.store(rmax_ptr + t, mx, mask=ok)
        tl.store(out_ptr + t, tl.maximum(hi.to(tl.float64), 0.0), mask=ok)
        tl.store(out_ptr + N + t, tl.maximum(lo.to(tl.float64), 0.0), mask=ok)

    @triton.jit
    def _keep(s_ptr, u_ptr, i, ok, c, all_in, N, SAMPLE: tl.constexpr, GROUPED: tl.constexpr):
        """Row ``i``'s keep probability (float32), and its group: 0 saturated hi / 1 saturated lo / 2 sampled (0 for
        every kept row unless GROUPED), 3 not kept."""
        s = tl.load(s_ptr + i, mask=ok, other=0.0)
        if SAMPLE:
            p = tl.where(all_in, tl.where(s > 0, 1.0, 0.0).to(tl.float64), tl.minimum(c * s, 1.0)).to(tl.float32)
            keep = ok & (tl.load(u_ptr + i, mask=ok, other=1.0) < p)
        else:
            p = tl.where(s > 0, 1.0, 0.0).to(tl.float32)
            keep = ok & (p > 0)
        g = tl.full(i.shape, 0, tl.int32)
        if GROUPED:
            g = tl.where(p >= tl.full((), SAT_LEVEL, tl.float32), (i >= N).to(tl.int32), 2)
        return p, tl.where(keep, g, 3)

    @triton.jit
    def _rank(g, grp, base):
        """Positions of the rows of group ``grp`` in this chunk: after ``base``, in row order; and their count."""
        m = (g == grp).to(tl.int32)
        return base + tl.associative_scan(m, 0, _SUM) - m, tl.reduce(m, 0, _SUM)

    @triton.jit
    def _plan_kernel(s_ptr, asc_ptr, csum_ptr, u_ptr, w_ptr, rmax_ptr, index_ptr, val_ptr, ends_ptr, rq_ptr, R, N,
                     target_bits, BLOCK: tl.constexpr, SAMPLE: tl.constexpr, GROUPED: tl.constexpr):
        """One program: water-filled probabilities, Bernoulli keep, and the rows ordered by group (see
        ``sample_plan``). Pass 1 finds the water level, pass 2 counts the groups, pass 3 writes the order."""
        offs = tl.arange(0, BLOCK)
        c = tl.full((), 0.0, tl.float64)
        all_in = c > 0
        if SAMPLE:
            target = target_bits.to(tl.float64, bitcast=True)
            tiny = tl.full((), 2.2250738585072014e-308, tl.float64)
            slack = tl.full((), 1.000000000001, tl.float64)
            n_pos = tl.full((), 0, tl.int32)
            first = n_pos + R
            for j0 in range(0, R, BLOCK):  # ascending position j is descending position k = R - 1 - j
                j = j0 + offs
                ok = j < R
                sv = tl.load(asc_ptr + j, mask=ok, other=0.0).to(tl.float64)  # float32 scores: exact
                k = R - 1 - j
                ck = (target - k.to(tl.float64)) / tl.maximum(tl.load(csum_ptr + j, mask=ok, other=0.0), tiny)
                pos = ok & (sv > 0)  # k < n_pos: the scores are >= 0 and sorted
                valid = pos & (ck > 0) & (ck * sv <= slack)
                n_pos += tl.reduce(pos.to(tl.int32), 0, _SUM)
                first = tl.minimum(first, tl.reduce(tl.where(valid, k, R), 0, _MIN))
            first = tl.where(first < R, first, tl.maximum(n_pos - 1, 0))
            tail = tl.load(csum_ptr + (R - 1 - first))
            c = (target - first.to(tl.float64)) / tl.maximum(tail, tiny)  # f64: div.rn
            all_in = n_pos.to(tl.float64) <= target
        n0 = tl.full((), 0, tl.int32)
        n1 = tl.full((), 0, tl.int32)
        n2 = tl.full((), 0, tl.int32)
        for i0 in range(0, R, BLOCK):
            i = i0 + offs
            p, g = _keep(s_ptr, u_ptr, i, i < R, c, all_in, N, SAMPLE, GROUPED)
            n0 += tl.reduce((g == 0).to(tl.int32), 0, _SUM)
            n1 += tl.reduce((g == 1).to(tl.int32), 0, _SUM)
            n2 += tl.reduce((g == 2).to(tl.int32), 0, _SUM)
        b0, b1, b2, b3 = n0 * 0, n0, n0 + n1, n0 + n1 + n2
        amax = tl.full((), 0.0, tl.float32)
        for i0 in range(0, R, BLOCK):
            i = i0 + offs
            ok = i < R
            p, g = _keep(s_ptr, u_ptr, i, ok, c, all_in, N, SAMPLE, GROUPED)
            r0, m0 = _rank(g, 0, b0)
            r1, m1 = _rank(g, 1, b1)
            r2, m2 = _rank(g, 2, b2)
            r3, m3 = _rank(g, 3, b3)
            b0, b1, b2, b3 = b0 + m0, b1 + m1, b2 + m2, b3 + m3
            dst = tl.where(g == 0, r0, tl.where(g == 1, r1, tl.where(g == 2, r2, r3)))
            w = tl.load(w_ptr + i, mask=ok, other=0.0)
            if GROUPED:  # the sampled rows' x~ factor w / p, and max |qx f| over them
                val = tl.where(g == 2, tl.math.div_rn(w, p), 0.0)
                if SAMPLE:
                    rmax = tl.load(rmax_ptr + i % N, mask=ok, other=0.0)
                    amax = tl.maximum(amax, tl.reduce(val * rmax, 0, _MAX))
            else:  # grad-input's epilogue row scale w / p
                val = tl.where(g < 3, w * tl.math.div_rn(tl.full(p.shape, 1.0, tl.float32), p), 0.0)
            tl.store(index_ptr + dst, i.to(tl.int64), mask=ok)
            tl.store(val_ptr + dst, val, mask=ok)
        tl.store(ends_ptr, n0.to(tl.int64))
        tl.store(ends_ptr + 1, (n0 + n1).to(tl.int64))
        tl.store(ends_ptr + 2, (n0 + n1 + n2).to(tl.int64))
        if GROUPED:  # requantize_scale(amax), then the hi and lo row weights
            tiny = tl.full((), 1.1754943508222875e-38, tl.float32)  # torch's 7.0 / t is 7.0 * reciprocal(t):
            raw = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.maximum(amax, tiny)) * 7.0  # the same here
            finite = raw <= 3.4028234663852886e38  # not inf (raw >= 0)
            scale = tl.where((amax > 0) & finite, raw, 1.0)
            tl.store(rq_ptr, scale)
            tl.store(rq_ptr + 1, tl.where(finite, scale, 0.0))
            tl.store(rq_ptr + 2, tl.load(w_ptr))
            tl.store(rq_ptr + 3, tl.load(w_ptr + R - 1))


def transpose_int8(x: torch.Tensor) -> torch.Tensor:
    """``x.T.contiguous()`` as int8 for a row-major int8 or float8 (integer-valued) matrix in one tiled pass:
    grad-input's K-major weight operand.
    (PyTorch's strided byte copy took 0.12 ms for 4096 x 4096 on an H100, a quarter of the GEMM it feeds; this
    moves the same 32 MB at memory speed.)"""
    if triton is None or x.dim() != 2 or x.dtype not in ONE_BYTE or x.stride(1) != 1:
        return x.T.contiguous().to(torch.int8)
    r, c = x.shape
    out = torch.empty(c, r, device=x.device, dtype=torch.int8)
    if x.numel():
        gpu = x.is_cuda
        bs = 64 if gpu else 32
        _transpose_kernel[(triton.cdiv(r, bs), triton.cdiv(c, bs))](x, out, r, c, x.stride(0), out.stride(0), BR=bs,
                                                                     BC=bs, num_warps=4 if gpu else 1)
    return out


def packed_width(kept: int, pad: int) -> int:
    """Columns of the packed buffers for up to ``kept`` sorted positions in three groups, each padded to ``pad``
    (a bound fixed by the shapes, never by the sample)."""
    return (-(-kept // pad) + 2) * pad


class SamplePlan(NamedTuple):
    """A leverage-score row sample, ordered for the backward's GEMMs (no host sync: every size is the shapes').

    ``index`` (R,) int64: every row once; groups in order 0 saturated hi rows (``p >= 1 - SAT_EPS``, row < N),
    1 saturated lo rows, 2 sampled rows (``p < 1 - SAT_EPS``), 3 rows not kept, each group in row order (not
    grouped: 0 all kept rows, 3 the rest). ``val`` (R,) float32 per position: grouped, the sampled rows' factor
    ``f = w / p`` (else 0); not grouped, the kept rows' scale ``w * (1 / p)`` (else 0). ``ends`` (3,) int64: the
    ends of groups 0, 1, 2 (the kept count is ``ends[2]``). ``rq`` (4,) float32, grouped only: the sampled rows'
    re-quantization ``scale`` and ``gain`` (``requantize_scale`` of ``max |qx_tok| f``), and ``w[0]``, ``w[-1]``."""

    index: torch.Tensor
    val: torch.Tensor
    ends: torch.Tensor
    rq: torch.Tensor | None = None


def row_scores(sq_norms: torch.Tensor, weight: torch.Tensor, qx: torch.Tensor | None = None):
    """Leverage scores ``max(double(w ||row|| [* ||qx_tok||]), 0)`` of the 2N split rows (float64), and with
    ``qx`` (N x K int8, grad-weight) each token's ``max |qx|`` (float32); one pass. Reference:
    ``lowbit.train.backward.row_scores_reference``."""
    r = sq_norms.shape[0]
    n = r // 2
    out = torch.empty(r, device=sq_norms.device, dtype=torch.float64)
    rmax = None if qx is None else torch.empty(n, device=sq_norms.device, dtype=torch.float32)
    if n:
        gpu = sq_norms.is_cuda
        bt, bk = (16, 128) if gpu else (16, 32)  # H100: 167 registers, no spill (32 x 256 spills)
        x = qx if qx is None or qx.stride(1) == 1 else qx.contiguous()
        _scores_kernel[(triton.cdiv(n, bt),)](sq_norms, weight, sq_norms if x is None else x, out,
                                              out if rmax is None else rmax, n, 0 if x is None else x.shape[1],
                                              0 if x is None else x.stride(0), BT=bt, BK=bk, HAS_X=x is not None,
                                              num_warps=4 if gpu else 1)
    return out, rmax


def sample_plan(scores: torch.Tensor, weight: torch.Tensor, u: torch.Tensor | None, rowmax: torch.Tensor | None,
                ratio: float, grouped: bool) -> SamplePlan:
    """Water-filled keep probabilities (``lowbit.train.sampling.waterfill``, target ``ratio * R``), the
    Bernoulli keep ``u < p`` (``u`` the caller's uniforms; ``ratio >= 1``: every nonzero row, ``u`` unused) and
    the ``SamplePlan`` ordering, in one single-program kernel after a sort and a cumsum of the scores (float64).
    ``rowmax`` (N,): each token's ``max |qx|`` (grouped with sampling only). Reference:
    ``lowbit.train.sampling.sample_plan_reference``."""
    r = scores.shape[0]
    dev = scores.device
    index = torch.empty(r, device=dev, dtype=torch.int64)
    val = torch.empty(r, device=dev, dtype=torch.float32)
    ends = torch.empty(3, device=dev, dtype=torch.int64)
    rq = torch.empty(4, device=dev, dtype=torch.float32) if grouped else None
    if r == 0:
        return SamplePlan(index, val, ends.zero_(), None if rq is None else rq.zero_())
    sample = ratio < 1
    asc = csum = scores
    if sample:  # the float64 scores hold float32 values: a 32-bit key sort (half the radix passes) is exact
        asc = torch.sort(scores.float()).values
        csum = torch.cumsum(asc, 0, dtype=torch.float64)  # = waterfill's flipped cumsum of its descending sort
    bits = struct.unpack("<q", struct.pack("<d", float(ratio) * r))[0]  # the float64 target, bit-exact
    gpu = scores.is_cuda
    _plan_kernel[(1,)](scores, asc, csum, u if sample else scores, weight,
                       rowmax if rowmax is not None and sample else scores, index, val, ends,
                       rq if rq is not None else val, r, r // 2, bits, BLOCK=2048 if gpu else 64, SAMPLE=sample,
                       GROUPED=grouped, num_warps=8 if gpu else 1,
                       **({"enable_fp_fusion": False} if gpu else {}))
    return SamplePlan(index, val, ends, rq)


def _configs(gpu: bool) -> dict:
    """Tile sizes: H100 INT8 GEMM tiles (128 x 128 x 128, 8 warps, 4 stages: 0.36 ms for 8192 kept rows; 256 x 128
    or 4 warps spill with the sampled group), small ones under the CPU interpreter."""
    if gpu:
        return dict(bm=128, bn=128, bk=128, bp=128, bw=64, gemm=dict(num_warps=8, num_stages=4),
                    pack=dict(num_warps=4))
    return dict(bm=32, bn=32, bk=32, bp=32, bw=32, gemm=dict(num_warps=1), pack=dict(num_warps=1))


def grad_weight_gemm(rows: torch.Tensor, qx: torch.Tensor, index: torch.Tensor, ends: torch.Tensor,
                     w: torch.Tensor, f: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, seed: torch.Tensor | None = None) -> torch.Tensor:
    """C x K float32 grad-weight from ``rows`` (2N x C int8), ``qx`` (N x K int8) and the sorted kept ``index``.

    ``qx`` may be the forward's float8 operand (converted while packed). ``ends``: the three group ends (device
    int tensor); ``w``: the hi and lo row weights (2 elements); ``f`` (per sorted position), ``gain``, ``scale``
    and ``seed`` (one int64: row ``r``'s uniforms are ``philox.uniform(seed, r * K + k)``) describe the sampled
    group's re-quantization; ``seed=None`` means no sampled group (sampling off)."""
    if triton is None:
        raise LowbitError("grad_weight_gemm needs triton")
    if rows.dtype != torch.int8 or qx.dtype not in ONE_BYTE or rows.shape[0] != 2 * qx.shape[0]:
        raise LowbitError(f"grad_weight_gemm needs int8 rows (2N x C) and qx (N x K), got {rows.dtype} "
                          f"{tuple(rows.shape)} and {qx.dtype} {tuple(qx.shape)}")
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    qx = qx if qx.stride(1) == 1 else qx.contiguous()
    n, k = qx.shape
    c = rows.shape[1]
    out = torch.empty(c, k, device=rows.device, dtype=torch.float32)
    if c == 0 or k == 0:
        return out
    if index.numel() == 0:  # nothing kept (compact sample): the reference's sum of no products
        return out.zero_()
    sampled = seed is not None
    cfg = _configs(rows.is_cuda)
    width = packed_width(index.shape[0], cfg["bk"])
    w = w.float().contiguous()
    dummy = w
    packed = []
    for src, cols, tokens in ((rows, c, False), (qx, k, True)):
        buf = torch.empty(cols, width, device=rows.device, dtype=torch.int8)
        requant = sampled and tokens
        _pack_kernel[(triton.cdiv(width, cfg["bp"]), triton.cdiv(cols, cfg["bw"]))](
            src, index, ends, f if requant else dummy, gain if requant else dummy, seed if requant else ends, buf,
            cols, n, src.stride(0), buf.stride(0), BP=cfg["bp"], BW=cfg["bw"],
            PAD=cfg["bk"], TOKENS=tokens, SAMPLED=sampled, REQUANT=requant,
            **cfg["pack"], **({"enable_fp_fusion": False} if rows.is_cuda else {}))
        packed.append(buf)
    bm, bn = cfg["bm"], cfg["bn"]
    _grad_weight_kernel[(triton.cdiv(c, bm) * triton.cdiv(k, bn),)](
        packed[0], packed[1], ends, w, scale if sampled else dummy, out, c, k, width, width, out.stride(0),
        BM=bm, BN=bn, BK=cfg["bk"], GROUP_M=8, SAMPLED=sampled,
        **cfg["gemm"], **({"enable_fp_fusion": False} if rows.is_cuda else {}))
    return out
