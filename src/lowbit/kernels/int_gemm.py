"""Exact low-bit GEMMs ``a @ b.T`` for training on the H100's FP8 and INT8 tensor cores.

The H100 has no INT4 tensor cores, but INT4 values (and 5-bit ones) are exact in float8 e4m3 and in int8:

- ``fp8_matmul``: ``torch._scaled_mm`` (cuBLAS, ~1.8x bf16) with fp32 accumulation (``use_fast_accum=False``:
  cuBLAS promotes the tensor cores' partial sums to fp32 registers every few k-steps). Every product of two
  4-bit integers is an integer of magnitude <= 64, so every partial sum is an integer below ``K * 64``; while that
  stays below 2^24 (K < 262144) float32 holds it exactly and the result equals the integer product. A per-tensor
  dequantizing scale is applied in cuBLAS's epilogue (``alpha = scale``).
- ``int8_matmul``: a Triton INT8 GEMM (int32 accumulation, exact while ``K * 2^(ba-1) * 2^(bb-1) < 2^31``) with
  an optional row gather (leverage-score sampling's kept rows, read in place, with a device-side row count so no
  host sync is needed and tiles past the count do no work) and row/column dequantizing scales in its epilogue;
  it can add its rows straight into ``out[index % P]`` (grad-input's tokens) instead of writing them.
  It runs on the CPU under ``TRITON_INTERPRET=1``, which is how the CPU tests check it.

``int_matmul_kernel`` is what ``lowbit.train.dispatch`` plugs in: it returns what ``int_matmul_reference``
returns, bit for bit (float32, or float64 when the reference would need it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FP32_EXACT = 2**24
INT32_LIMIT = 2**31
FP8 = torch.float8_e4m3fn
FP8_EXACT_BITS = 5  # integers in [-16, 15] are exact in e4m3
FP8_ALIGN = 16  # _scaled_mm wants K and N (and, on some versions, M) multiples of 16


def product_bound(k: int, bits_a: int, bits_b: int) -> int:
    """The largest magnitude a partial sum of ``K`` products of signed ``bits_a`` x ``bits_b`` integers can take."""
    return k * 2 ** (bits_a - 1) * 2 ** (bits_b - 1)


def reference_dtype(k: int, bits_a: int, bits_b: int) -> torch.dtype:
    """The dtype ``int_matmul_reference`` returns: float32 while exact, else float64."""
    return torch.float32 if product_bound(k, bits_a, bits_b) < FP32_EXACT else torch.float64


def fp8_eligible(a: torch.Tensor, bits_a: int, bits_b: int) -> bool:
    """FP8 with fp32 accumulation is exact for this product (CUDA only: the CPU has no FP8 GEMM)."""
    small = max(bits_a, bits_b) <= FP8_EXACT_BITS
    return a.is_cuda and small and product_bound(a.shape[1], bits_a, bits_b) < FP32_EXACT


def operand_dtype(device: torch.device, bits: int) -> torch.dtype:
    """The dtype a quantizer should write for this device's GEMM: float8 e4m3 on CUDA for <= 5 bits, else int8."""
    return FP8 if torch.device(device).type == "cuda" and bits <= FP8_EXACT_BITS else torch.int8


# ----------------------------------------------------------------------------------------------- FP8 (cuBLAS)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pr, pc = (-x.shape[0]) % rows, (-x.shape[1]) % cols
    if not (pr or pc):
        return x
    return F.pad(x.to(torch.float16), (0, pc, 0, pr)).to(x.dtype)  # F.pad has no float8 kernel


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None,
               fast_accum: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * (a @ b.T)`` for integer-valued ``a`` (M x K) and ``b`` (N x K) exact in e4m3 (CUDA).

    ``scale``: a one-element float32 tensor applied in the epilogue (None: 1). Exact integers when
    ``scale`` is None and ``K * max|a| * max|b| < 2^24`` with ``fast_accum=False`` (see the module doc).
    ``out_dtype`` (float32, bfloat16 or float16): cuBLAS rounds the float32 epilogue once to it, so a 16-bit
    result needs no float32 copy written and converted after.
    """
    m, n = a.shape[0], b.shape[0]
    a8 = _pad_to(a if a.dtype == FP8 else a.to(FP8), FP8_ALIGN, FP8_ALIGN)
    b8 = _pad_to(b if b.dtype == FP8 else b.to(FP8), FP8_ALIGN, FP8_ALIGN)
    one = torch.ones((), device=a.device, dtype=torch.float32)
    scale_a = one if scale is None else scale.float().reshape(())
    out = torch._scaled_mm(a8.contiguous(), b8.contiguous().t(), scale_a=scale_a, scale_b=one,
                           out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out[:m, :n] if out.shape != (m, n) else out


# ----------------------------------------------------------------------------------------------- INT8 (Triton)

if triton is not None:

    @triton.jit
    def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program ``pid`` in grouped order: neighbouring programs share A tiles in L2."""
        grid_m, grid_n = (M + BM - 1) // BM, (N + BN - 1) // BN
        first_m = pid // (GROUP_M * grid_n) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        return first_m + (pid % (GROUP_M * grid_n)) % size_m, (pid % (GROUP_M * grid_n)) // size_m

    @triton.jit
    def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, index_ptr, count_ptr, rs_ptr, cs_ptr, M, N, K, scatter_mod,
                          stride_am, stride_bn, stride_cm, stride_rs, stride_cs,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                          GATHER: tl.constexpr, HAS_COUNT: tl.constexpr, ROW_SCALE: tl.constexpr,
                          COL_SCALE: tl.constexpr, SCALE_FIRST: tl.constexpr, OUT_INT: tl.constexpr,
                          SCATTER: tl.constexpr):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        live = M
        if HAS_COUNT:
            live = tl.minimum(tl.load(count_ptr).to(tl.int32), M)
        row_ok = rows < live
        src = rows
        if GATHER:
            src = tl.load(index_ptr + rows, mask=row_ok, other=0)
        k_end = tl.where(pid_m * BM < live, K, 0)  # tiles past the kept-row count skip the reduction
        ks = tl.arange(0, BK)
        acc = tl.full((BM, BN), 0, tl.int32)
        for k0 in range(0, k_end, BK):
            k_ok = (k0 + ks) < K
            a = tl.load(a_ptr + src[:, None].to(tl.int64) * stride_am + (k0 + ks)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_bn + (k0 + ks)[:, None],
                        mask=(cols[None, :] < N) & k_ok[:, None], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        out_mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
        if OUT_INT:
            tl.store(c_ptr + offs, acc, mask=out_mask)
        else:
            y = acc.to(tl.float32)
            if ROW_SCALE and COL_SCALE and SCALE_FIRST:
                rs = tl.load(rs_ptr + rows * stride_rs, mask=rows < M, other=0.0)
                cs = tl.load(cs_ptr + cols * stride_cs, mask=cols < N, other=0.0)
                y = y * (rs[:, None] * cs[None, :])
            else:
                if ROW_SCALE:
                    y = y * tl.load(rs_ptr + rows * stride_rs, mask=rows < M, other=0.0)[:, None]
                if COL_SCALE:
                    y = y * tl.load(cs_ptr + cols * stride_cs, mask=cols < N, other=0.0)[None, :]
            if SCATTER:  # add row i into output row index[i] mod scatter_mod (live rows only)
                dst = (src % scatter_mod).to(tl.int64)
                tl.atomic_add(c_ptr + dst[:, None] * stride_cm + cols[None, :], y,
                              mask=out_mask & row_ok[:, None], sem="relaxed")
            else:
                tl.store(c_ptr + offs, y, mask=out_mask)


def _vector(scale: torch.Tensor | None, length: int, what: str) -> tuple[torch.Tensor | None, int]:
    """A scale as (tensor, stride): one element broadcasts with stride 0, ``length`` elements stride 1."""
    if scale is None:
        return None, 0
    flat = scale.float().reshape(-1)
    if flat.numel() == 1:
        return flat, 0
    if flat.numel() != length:
        raise LowbitError(f"{what} must have 1 or {length} elements, got {flat.numel()}")
    return flat.contiguous(), 1


def int8_matmul(a: torch.Tensor, b: torch.Tensor, *, index: torch.Tensor | None = None,
                count: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                col_scale: torch.Tensor | None = None, scale_first: bool = False,
                scatter_into: torch.Tensor | None = None) -> torch.Tensor:
    """``(a[index] @ b.T)`` with int32 accumulation; int32 result, or float32 ``acc * row_scale * col_scale``.

    ``a`` (R x K) and ``b`` (N x K) hold integers in int8 range (any dtype; cast to int8). ``index`` gathers the
    rows of ``a`` (M of them; default all R); ``count`` (a device tensor) says how many of them are live: rows
    at or past it come out zero and their tiles do no work. Scales have 1 or M (rows) / N (columns) elements;
    ``scale_first`` multiplies ``acc * (row_scale * col_scale)`` instead of ``(acc * row_scale) * col_scale``.
    ``scatter_into`` (float32, P x N, with ``index``): instead of returning the M x N rows, add each live row ``i``
    into ``scatter_into[index[i] % P]`` (atomically; exact where each output row gets at most two rows, as
    float addition of two terms onto zero is order-free) and return ``scatter_into``.
    """
    if triton is None:
        raise LowbitError("int8_matmul needs triton; install it or use lowbit.train.dispatch.int_matmul_reference")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise LowbitError(f"int8_matmul needs (R x K) and (N x K) operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    a8 = a if a.dtype == torch.int8 else a.to(torch.int8)
    b8 = b if b.dtype == torch.int8 else b.to(torch.int8)
    a8 = a8 if a8.stride(1) == 1 else a8.contiguous()
    b8 = b8 if b8.stride(1) == 1 else b8.contiguous()
    m = a8.shape[0] if index is None else index.shape[0]
    n, k = b8.shape[0], a8.shape[1]
    rs, rs_stride = _vector(row_scale, m, "row_scale")
    cs, cs_stride = _vector(col_scale, n, "col_scale")
    out_int = rs is None and cs is None
    scatter = scatter_into is not None
    if scatter and (index is None or out_int or scatter_into.dtype != torch.float32
                    or scatter_into.shape[1] != n or scatter_into.stride(1) != 1):
        raise LowbitError("scatter_into needs index, a scale, and a float32 (P x N) row-major output")
    out = scatter_into if scatter else torch.empty(m, n, device=a.device,
                                                      dtype=torch.int32 if out_int else torch.float32)
    if m == 0 or n == 0:
        return out
    gpu = a.is_cuda
    bm, bn, bk = (128, 128, 128) if gpu else (32, 32, 32)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    dummy = out
    _int8_gemm_kernel[grid](
        a8, b8, out, index if index is not None else dummy, count if count is not None else dummy,
        rs if rs is not None else dummy, cs if cs is not None else dummy, m, n, k,
        out.shape[0] if scatter else 1,
        a8.stride(0), b8.stride(0), out.stride(0), rs_stride, cs_stride,
        BM=bm, BN=bn, BK=bk, GROUP_M=8, GATHER=index is not None, HAS_COUNT=count is not None,
        ROW_SCALE=rs is not None, COL_SCALE=cs is not None, SCALE_FIRST=scale_first, OUT_INT=out_int,
        SCATTER=scatter,
        **({"num_warps": 8, "num_stages": 3} if gpu else {"num_warps": 1}))
    return out


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor, *, index: torch.Tensor | None = None,
                          count: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                          col_scale: torch.Tensor | None = None, scale_first: bool = False,
                          scatter_into: torch.Tensor | None = None) -> torch.Tensor:
    """What ``int8_matmul`` computes, in int64 then the same float32 epilogue (and ``index_add_`` to scatter)."""
    if scatter_into is not None:
        y = int8_matmul_reference(a, b, index=index, count=count, row_scale=row_scale, col_scale=col_scale,
                                  scale_first=scale_first)
        live = index.shape[0] if count is None else int(count)
        return scatter_into.index_add_(0, index[:live] % scatter_into.shape[0], y[:live])
    rows = a if index is None else a[index.long()]
    if rows.is_cuda:  # CUDA has no int64 matmul; float64 is exact below 2^53, far above any int8 x int8 sum here
        acc = (rows.double() @ b.double().T).long()
    else:
        acc = rows.long() @ b.long().T
    if count is not None:
        acc[int(count):] = 0
    m, n = acc.shape
    rs, _ = _vector(row_scale, m, "row_scale")
    cs, _ = _vector(col_scale, n, "col_scale")
    if rs is None and cs is None:
        return acc.to(torch.int32)
    y = acc.float()
    rs_col = None if rs is None else rs.expand(m).reshape(-1, 1)
    cs_row = None if cs is None else cs.expand(n).reshape(1, -1)
    if rs_col is not None and cs_row is not None and scale_first:
        return y * (rs_col * cs_row)
    y = y * rs_col if rs_col is not None else y
    return y * cs_row if cs_row is not None else y


# ----------------------------------------------------------------------------------------------- dispatch hooks


def has_exact_kernel(k: int, bits_a: int, bits_b: int) -> bool:
    """An exact kernel exists: FP8 (<= 5 bits, float32 bound) or INT8 with int32 accumulation."""
    return max(bits_a, bits_b) <= 8 and product_bound(k, bits_a, bits_b) < INT32_LIMIT


def int_matmul_kernel(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int) -> torch.Tensor:
    """Exact ``a @ b.T`` as ``int_matmul_reference`` returns it: FP8 where exact on CUDA, else the INT8 kernel."""
    k = a.shape[1]
    if fp8_eligible(a, bits_a, bits_b):
        return fp8_matmul(a, b)
    if not has_exact_kernel(k, bits_a, bits_b):
        raise LowbitError(f"no exact integer kernel for {bits_a}x{bits_b}-bit operands with K={k}; use the reference")
    return int8_matmul(a, b).to(reference_dtype(k, bits_a, bits_b))


def scaled_int_matmul(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bits_a: int, bits_b: int,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(a @ b.T) * scale`` with the one-element dequantizing ``scale`` applied in the GEMM's epilogue, float32
    rounded once to ``out_dtype``."""
    if fp8_eligible(a, bits_a, bits_b):
        return fp8_matmul(a, b, scale, out_dtype=out_dtype)
    if product_bound(a.shape[1], bits_a, bits_b) >= FP32_EXACT:
        raise LowbitError(f"{bits_a}x{bits_b}-bit product with K={a.shape[1]} is not exact in float32; use int_matmul")
    return int8_matmul(a, b, col_scale=scale).to(out_dtype)
