"""The one entry point for integer matmuls in training: ``int_matmul(a, b) = a @ b.T`` on integer operands.

Every forward, grad-input and grad-weight product of a converted layer goes through here, so the operands
it receives are exactly what a low-bit kernel would get. Today only the exact reference exists: integers held
in float32 (exact while every partial sum stays below 2^24) or, when the bound could be exceeded, float64
(exact below 2^53). GPU kernels (INT4/INT8 tensor-core GEMMs) plug in at ``_kernel_for``; they must match
``int_matmul_reference`` bit for bit, which is what their tests will check.
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
    """Where accelerated kernels will be chosen (by device, bits, shape). None: use the reference."""
    return None


def int_matmul(
    a: torch.Tensor, b: torch.Tensor, *, bits_a: int = 4, bits_b: int = 4, check: bool = True
) -> torch.Tensor:
    """``a @ b.T`` for integer operands of ``bits_a`` / ``bits_b`` signed bits (values held in any dtype).

    ``check`` verifies that both operands really are integers in range (cheap next to the product), so a
    caller cannot silently feed unquantized values to what will be an integer kernel.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise LowbitError(f"int_matmul needs (M x R) and (N x R) operands, got {tuple(a.shape)} and {tuple(b.shape)}")
    if check:
        _check_operand(a, bits_a, "a")
        _check_operand(b, bits_b, "b")
    kernel = _kernel_for(a, bits_a, bits_b)
    if kernel is not None:
        return kernel(a, b, bits_a, bits_b)
    return int_matmul_reference(a, b, bits_a, bits_b)
