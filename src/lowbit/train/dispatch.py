"""The one entry point for integer matmuls in training: ``int_matmul(a, b) = a @ b.T`` on integer operands.

Every forward, grad-input and grad-weight product of a converted layer goes through here, so the operands
it receives are exactly what a low-bit kernel would get. Today only the exact reference exists: integers held
in float32 (exact while every partial sum stays below 2^24) or, when the bound could be exceeded, float64
(exact below 2^53). Kernels (``lowbit.kernels.int_gemm``: FP8/INT8 tensor-core GEMMs on CUDA, the Triton INT8
GEMM under ``TRITON_INTERPRET=1``) plug in at ``_kernel_for`` when ``lowbit.kernels.dispatch.backend_for`` picks
Triton; they match ``int_matmul_reference`` bit for bit (tests/kernels/test_int_gemm.py).

The operand check (integers, in range) reads values back to the host, so it runs by default only on CPU
tensors; on CUDA it is opt-in (``check=True``) for debugging, and a training step makes no host sync here.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.errors import LowbitError

FP32_EXACT = 2**24

KernelFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _check_operand(x: torch.Tensor, bits: int, name: str) -> None:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if x.dim() != 2:
        raise LowbitError(f"int_matmul operand {name} must be 2-D, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise LowbitError(f"int_matmul operand {name} holds non-integer values; quantize it first")
    if int(x.min()) < lo or int(x.max()) > hi:
        raise LowbitError(f"int_matmul operand {name} leaves the {bits}-bit range [{lo}, {hi}]")


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor, bits_a: int = 4, bits_b: int = 4) -> torch.Tensor:
    """Exact ``a @ b.T`` for integer-valued ``a`` (M x R) and ``b`` (N x R); float32 result holding integers.

    float32 is exact when ``R * max|a| * max|b| < 2^24`` (R up to 262144 for INT4 x INT4); beyond that the
    product runs in float64 and the result is returned as float64 so no integer is rounded.
    """
    bound = a.shape[1] * (2 ** (bits_a - 1)) * (2 ** (bits_b - 1))
    if bound < FP32_EXACT:
        return a.float() @ b.float().T
    return a.double() @ b.double().T


def _kernel_for(a: torch.Tensor, bits_a: int, bits_b: int) -> KernelFn | None:
    """The exact kernel for this product (by backend, bits and K), or None: use the reference."""
    from lowbit.kernels.dispatch import backend_for

    if backend_for(a) != "triton":
        return None
    from lowbit.kernels.int_gemm import has_exact_kernel, int_matmul_kernel

    return int_matmul_kernel if has_exact_kernel(a.shape[1], bits_a, bits_b) else None


def _checked(a: torch.Tensor, b: torch.Tensor, bits_a: int, bits_b: int, check: bool | None) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise LowbitError(f"int_matmul needs (M x R) and (N x R) operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if check or (check is None and a.device.type == "cpu"):
        _check_operand(a, bits_a, "a")
        _check_operand(b, bits_b, "b")


def int_matmul(
    a: torch.Tensor, b: torch.Tensor, *, bits_a: int = 4, bits_b: int = 4, check: bool | None = None
) -> torch.Tensor:
    """``a @ b.T`` for integer operands of ``bits_a`` / ``bits_b`` signed bits (values held in any dtype).

    ``check`` verifies that both operands really are integers in range, so a caller cannot silently feed
    unquantized values to an integer kernel. None (default): on CPU tensors only (no host sync on CUDA);
    True: always (debugging, costs host syncs on CUDA); False: never.
    """
    _checked(a, b, bits_a, bits_b, check)
    kernel = _kernel_for(a, bits_a, bits_b)
    if kernel is not None:
        return kernel(a, b, bits_a, bits_b)
    return int_matmul_reference(a, b, bits_a, bits_b)


def int_matmul_scaled(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, bits_a: int = 4, bits_b: int = 4,
    check: bool | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a @ b.T) * scale`` (``scale`` one element): the dequantizing scale in the GEMM's epilogue, the float32
    result rounded once to ``out_dtype``.

    Reference: ``(int_matmul_reference(a, b).float() * scale).to(out_dtype)``; the INT8 kernel equals it bit for
    bit, cuBLAS's FP8 epilogue (``alpha = scale``) to within one float32 rounding.
    """
    _checked(a, b, bits_a, bits_b, check)
    if _kernel_for(a, bits_a, bits_b) is not None:
        from lowbit.kernels.int_gemm import product_bound, scaled_int_matmul

        if product_bound(a.shape[1], bits_a, bits_b) < FP32_EXACT:
            return scaled_int_matmul(a, b, scale, bits_a, bits_b, out_dtype)
    return (int_matmul_reference(a, b, bits_a, bits_b).float() * scale.float().reshape(())).to(out_dtype)
