"""Output-gradient quantizers and leverage-score sampling (LSS): the random parts of the 4-bit backward.

Every function takes an explicit ``torch.Generator`` and is unbiased where stated, so the layer's gradient
estimates are unbiased for the straight-through gradient of the quantized forward:

- ``stochastic_round(x)``: ``floor(x + U[0,1))``, ``E = x`` exactly, error < 1.
- ``bit_split(g)``: ``g ~ (14 hi + lo) / s`` with ``s = 98 / max|g|``, ``hi = round(g s / 14)``, ``lo`` the
  stochastically rounded remainder. ``g s`` lies in ``[-98, 98]`` so ``hi`` and ``lo`` lie in ``[-7, 7]``: no
  clamp is ever active, hence ``E[(14 hi + lo)/s] = g`` and ``|error| < 1/s = max|g|/98`` elementwise.
  (The reference's ``clamp(.., -6, 6)`` on ``hi`` would bias the largest entries; with ``[-7, 7]`` both
  halves still fit signed INT4.)
- ``waterfill(scores, m)``: the ``p_i = min(1, c s_i)`` with ``sum p = m`` that minimises the variance
  ``sum s_i^2 / p_i`` of a 1/p-reweighted Bernoulli row sample; ``sample_rows`` draws it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowbit.kernels.dispatch import backend_for

SPLIT_BASE = 14  # weight of the high part
SPLIT_RANGE = 98  # = 14 * 7: g * s spans [-98, 98]


def uniform_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The reference paths' rounding noise: ``torch.rand`` (fast on the CPU). The kernel paths draw the same
    distribution (float32 on the ``k / 2^24`` grid) in-kernel from a seed instead (``lowbit.kernels.philox``);
    tests make both paths draw identically by swapping this for ``philox_noise``."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def philox_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """What the kernels draw for a row-major ``shape``: one seed from ``generator``, then Philox uniforms
    (``philox.uniform_like_reference``; slow on the CPU: exactness tests only)."""
    from lowbit.kernels.philox import draw_seed, uniform_like_reference

    return uniform_like_reference(draw_seed(generator, device), tuple(shape))


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Unbiased rounding: ``floor(x + u)``, ``u ~ U[0, 1)``; ``E[result] = x``."""
    return torch.floor(x + uniform_noise(x.shape, generator, x.device).to(x.dtype))


class BitSplit(NamedTuple):
    """``g ~ (SPLIT_BASE * hi + lo) / scale``: two INT4 matrices (float32 holding integers) and one scale.

    ``rows``: the fused kernel's ``[hi; lo]`` (``hi``/``lo`` are views of it), which ``stacked`` reuses."""

    hi: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor  # 0-dim float32
    rows: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return (SPLIT_BASE * self.hi + self.lo) / self.scale

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2N x C INT4 matrix ``[hi; lo]`` and each row's dequantization weight (14/s or 1/s)."""
        from lowbit.kernels.bitsplit import split_weights

        rows = self.rows if self.rows is not None else torch.cat([self.hi, self.lo], 0)
        return rows, split_weights(self.scale, self.hi.shape[0])


def bit_split(g: torch.Tensor, generator: torch.Generator | None) -> BitSplit:
    """Split a 2-D gradient into high and low INT4 parts (float32 in, exact integers out); see module doc.

    On the Triton backend one fused kernel does it (``lowbit.kernels.bitsplit``), drawing its uniforms in-kernel
    from one seed taken from ``generator`` (``philox_noise`` draws the same ones with PyTorch ops)."""
    if g.dim() == 2 and backend_for(g) == "triton":
        from lowbit.kernels.bitsplit import split_rows
        from lowbit.kernels.philox import draw_seed

        fused = split_rows(g, draw_seed(generator, g.device))
        n = g.shape[0]
        return BitSplit(fused.rows[:n], fused.rows[n:], fused.scale, fused.rows)
    from lowbit.kernels.bitsplit import split_math

    # on the device, no host sync: a gradient so tiny that 98/max|g| overflows is treated as zero (gain 0)
    rows, scale = split_math(g, uniform_noise(g.shape, generator, g.device))
    n = g.shape[0]
    return BitSplit(rows[:n], rows[n:], scale, rows)


class QuantGrad(NamedTuple):
    """A per-tensor symmetric integer gradient ``g ~ q / scale`` (the INT8 backward)."""

    q: torch.Tensor
    scale: torch.Tensor


def stochastic_quantize(g: torch.Tensor, bits: int, generator: torch.Generator | None) -> QuantGrad:
    """Per-tensor symmetric ``bits``-bit quantization with stochastic rounding: unbiased, range ``[-qmax, qmax]``."""
    qmax = 2 ** (bits - 1) - 1
    g = g.float()
    amax = g.abs().amax() if g.numel() else torch.zeros((), device=g.device)
    raw = qmax / amax.clamp_min(torch.finfo(torch.float32).tiny)
    finite = torch.isfinite(raw)  # max|g| so tiny that qmax/max overflows: a zero gradient (no host sync)
    scale = torch.where((amax > 0) & finite, raw, torch.ones_like(amax))
    g = torch.where(finite, g, torch.zeros_like(g))
    q = stochastic_round((g * scale).clamp(-qmax, qmax), generator).clamp(-qmax, qmax)
    return QuantGrad(q, scale)


def waterfill(scores: torch.Tensor, target: float) -> torch.Tensor:
    """Keep probabilities ``p_i = min(1, c s_i)`` with ``sum p = min(target, #nonzero)``; zero scores get 0.

    Sorted descending, the first ``k`` rows saturate at 1 and ``c = (target - k) / sum_{j>=k} s_j``; ``k`` is the
    smallest count for which the next row no longer saturates. All on the device (sort, cumsum, argmax): no
    host sync, so a CUDA training step never waits here.
    """
    s = scores.double().clamp_min(0)
    positive = s > 0
    n_pos = positive.sum()
    s_sorted, _ = torch.sort(s, descending=True)  # zeros last
    tail = torch.flip(torch.cumsum(torch.flip(s_sorted, [0]), 0), [0])  # tail[k] = sum_{j >= k} s_j
    k = torch.arange(s.shape[0], device=s.device, dtype=torch.float64)
    c = (target - k) / tail.clamp_min(torch.finfo(torch.float64).tiny)
    valid = (k < n_pos) & (c > 0) & (c * s_sorted <= 1 + 1e-12)
    first = torch.where(valid.any(), torch.argmax(valid.to(torch.uint8)), (n_pos - 1).clamp_min(0))
    p = (c.gather(0, first.reshape(1)) * s).clamp(max=1.0)
    return torch.where(n_pos <= target, positive.double(), p).float()


class RowSample(NamedTuple):
    """Kept row indices and the unbiasing factor ``1/p`` of each kept row.

    Compact (``count`` None): ``index`` holds exactly the kept rows. Padded (CUDA, no host sync): ``index`` is a
    permutation of all rows with the kept ones first, ``count`` a device scalar saying how many are kept, and
    ``inv_p`` / ``p_kept`` are 0 / 1 past it; consumers read only the first ``count`` entries."""

    index: torch.Tensor
    inv_p: torch.Tensor
    p_kept: torch.Tensor
    count: torch.Tensor | None = None


def keep_rows(scores: torch.Tensor, ratio: float, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep probabilities ``p`` (float32; water-filled to ``ratio * len(scores)``, or ``scores > 0`` when
    ``ratio >= 1``) and the Bernoulli keep ``u < p`` for the given uniforms ``u`` (unused when ``ratio >= 1``)."""
    if ratio >= 1.0:
        p = (scores > 0).float()
        return p, p > 0
    p = waterfill(scores, ratio * scores.shape[0])
    return p, u < p


def sample_rows(scores: torch.Tensor, ratio: float, generator: torch.Generator | None,
                padded: bool | None = None) -> RowSample:
    """Bernoulli-keep rows with water-filled probabilities, expected count ``ratio * len(scores)``.

    ``ratio >= 1`` keeps every nonzero row with ``p = 1`` (sampling off; no random draw is made).
    ``padded`` (default: on CUDA) returns the padded form (see ``RowSample``), which needs no host sync.
    """
    n = scores.shape[0]
    u = torch.rand(n, generator=generator, device=scores.device) if ratio < 1.0 else None
    p, keep = keep_rows(scores, ratio, u)
    if padded if padded is not None else scores.is_cuda:
        index = torch.argsort((~keep).to(torch.uint8), stable=True)  # kept rows first, in row order
        kept = keep[index]
        p_kept = torch.where(kept, p[index], torch.ones_like(p))
        return RowSample(index, torch.where(kept, 1.0 / p_kept, torch.zeros_like(p)), p_kept, keep.sum())
    index = torch.nonzero(keep).reshape(-1)
    p_kept = p[index]
    return RowSample(index, 1.0 / p_kept, p_kept)
