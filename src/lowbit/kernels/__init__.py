"""Low-bit kernels (Triton) with their pure-PyTorch references, chosen per call by ``dispatch.backend_for``."""

from lowbit.kernels.w4a4 import wxax_linear, wxax_linear_reference
from lowbit.kernels.w4a16 import w4a16_linear, w4a16_linear_reference
from lowbit.kernels.weights import PackedWeight
from lowbit.kernels.bitsplit import SplitRows, split_rows, split_rows_reference
from lowbit.kernels.int_gemm import fp8_matmul, int8_matmul, int8_matmul_reference, int_matmul_kernel
from lowbit.kernels.quantize import hadamard_rotate, hadamard_rotate_reference, rotate_quantize, rotate_quantize_reference
