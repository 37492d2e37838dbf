"""Counter-based uniforms drawn inside the kernels, with a PyTorch reference that draws the very same numbers.

Why: the backward's stochastic rounding used to draw its noise with ``torch.rand`` into N x C (bit split) and
2N x K (grad-weight's re-quantization) float32 buffers, which the kernels then read back: on an H100 at 8192 x
4096 that is ~0.4 GB of traffic and a third of the backward's non-GEMM time. A counter-based generator needs no
buffer: element ``i`` of a draw gets ``uniform(seed, i)``, computed where it is used.

``uniform(seed, offset)`` = the top 24 bits of Triton's ``tl.randint(seed, offset)`` (Philox 4x32, 10 rounds, the
int64 offset split into the low and high counter words) times ``2^-24``: a float32 on the grid ``k / 2^24`` in
``[0, 1)``, exactly as ``torch.rand`` spaces its float32 draws. ``uniform_reference`` runs the same Philox rounds
on int64 tensors (32-bit words, products split in 16-bit halves so nothing overflows): equal bit for bit, which the
tests check on the interpreter and the GPU. The seed is one int64 drawn on the device from the layer's generator
(``draw_seed``): deterministic per seed, and no host sync.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ROUNDS = 10
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
SEED_HIGH = 2**62  # seeds are drawn from [0, 2^62): both key words vary


def draw_seed(generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """One int64 seed (shape (1,)) on ``device`` from ``generator``: a device-side draw, no host sync."""
    return torch.randint(0, SEED_HIGH, (1,), generator=generator, device=device, dtype=torch.int64)


def _mul_parts(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for 32-bit ``a`` (int64 tensor) and constant ``b``, without
    overflowing int64: ``b`` is split in 16-bit halves."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2^48
    mid = a * b_hi  # < 2^48
    hi = (mid + (lo_part >> 16)) >> 16
    lo = (((mid & 0xFFFF) << 16) + lo_part) & _MASK
    return hi, lo


def uniform_reference(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 ``uniform(seed, offsets)`` (see module doc) with PyTorch integer ops; ``offsets`` int64 >= 0."""
    s = int(seed.reshape(-1)[0]) if seed.numel() else 0
    k0 = torch.full_like(offsets, s & _MASK, dtype=torch.int64)
    k1 = torch.full_like(k0, (s >> 32) & _MASK)
    c0 = offsets.to(torch.int64) & _MASK
    c1 = (offsets.to(torch.int64) >> 32) & _MASK
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_parts(c2, _ROUND_B)
        hi_a, lo_a = _mul_parts(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK
        k1 = (k1 + _KEY_B) & _MASK
    return (c0 >> 8).to(torch.float32) * (1.0 / 16777216.0)


def uniform_like_reference(seed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A row-major ``shape`` of uniforms, element ``(r, c)`` at offset ``r * shape[1] + c`` (the kernels' indexing)."""
    offsets = torch.arange(shape[0] * shape[1], dtype=torch.int64, device=seed.device).reshape(shape)
    return uniform_reference(seed, offsets)


if triton is not None:

    @triton.jit
    def uniform(seed, offset):
        """float32 uniforms on ``k / 2^24`` for int64 ``offset`` (a block) and an int64 ``seed`` (a scalar)."""
        x = tl.randint(seed, offset.to(tl.int64))
        return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _draw_kernel(seed_ptr, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        off = tl.load(off_ptr + i, mask=i < n, other=0)
        tl.store(out_ptr + i, uniform(tl.load(seed_ptr), off), mask=i < n)


def uniform_triton(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``uniform(seed, offsets)`` through a kernel (what the tests compare ``uniform_reference`` against)."""
    offsets = offsets.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(offsets.shape, device=offsets.device, dtype=torch.float32)
    if offsets.numel():
        _draw_kernel[(triton.cdiv(offsets.numel(), 256),)](seed, offsets, out, offsets.numel(), BLOCK=256)
    return out
