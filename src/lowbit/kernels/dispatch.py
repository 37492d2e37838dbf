"""Which implementation runs a low-bit op: the Triton kernel or its pure-PyTorch reference.

Every op in ``lowbit.kernels`` has both, with the same signature and the same result (bit for bit on integer
paths). The choice is made per call from the tensor's device and one environment variable, so nothing global
is mutated and tests can force either side:

- ``LOWBIT_KERNELS=auto`` (default): Triton on CUDA tensors when Triton imports, the reference elsewhere.
- ``LOWBIT_KERNELS=reference``: always the reference (debugging, bisecting a numerical difference).
- ``LOWBIT_KERNELS=triton``: always Triton; on CPU tensors this needs ``TRITON_INTERPRET=1`` (how the CPU
  tests run the kernels), and it fails with a clear error otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from lowbit.errors import LowbitError

Backend = Literal["triton", "reference"]
CHOICES = ("auto", "triton", "reference")
ENV = "LOWBIT_KERNELS"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(tensor: torch.Tensor) -> Backend:
    """The implementation that should run an op whose main operand is ``tensor``."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise LowbitError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "reference":
        return "reference"
    on_cuda = tensor.device.type == "cuda"
    usable = triton_available() and (on_cuda or interpreting())
    if choice == "triton":
        if not usable:
            raise LowbitError(
                f"{ENV}=triton but Triton cannot run on {tensor.device} tensors here: install triton and use a CUDA "
                "device, or set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "reference"
