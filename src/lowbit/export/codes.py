"""Recover the integer codes, scales and zero points behind a weight that is already on a quantization grid.

After ``quantize`` (RTN, or a calibrating method's merge and ``bake_weight``) a linear holds ``(q - z)·s``: its
rounded weight, dequantized. Re-quantizing that weight with the same ``QuantSpec`` gives back the same grid
whenever both end codes are used in every group: then the group's min and max are ``-z·s`` and ``(2^b-1-z)·s``, so
min-max gives ``s' = s`` and ``z' = z``. Plain min-max rounding nearly always hits both ends (the extreme
elements map to code 0 and ``2^b-1``), and learnt clipping only pushes more elements onto the ends. The exceptions
are real, though: when ``-min/s`` is exactly halfway between integers, ties round to even and the top code goes
unused (common in weights dequantized from GGUF, whose values sit on power-of-two lattices: 1 to 5 groups per
SmolLM2 layer at W4 g64); a clipped group whose values all share one sign leaves its near-zero end unused; a
clipped symmetric group may use ``-2^(b-1)`` and not ``2^(b-1)-1``; a scale clamped to ``SCALE_MIN`` spans fewer
codes. So every group is checked, and a group that min-max does not explain is fitted again over every shorter
span of codes; the first span that reproduces the group wins (any span that reproduces it is an exact encoding).

The scale is then refitted by least squares on the recovered codes, which removes most of the storage rounding
(fp16 or bf16) from it. Tolerance: every element must come back within ``eps · (|w| + max|w| of its group)``,
``eps`` the storage dtype's machine epsilon: half an ulp for the stored element's own rounding, and at most about
as much again for the scale re-estimated from stored values. Anything further is not on a grid: ``LowbitError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.quantizer import QuantSpec, quantize


@dataclass(frozen=True)
class LinearCodes:
    """One quantized linear's weights in the canonical layout every exporter reads.

    ``codes``: int16 (N, K), unsigned in ``[0, 2^bits)`` (symmetric weights stored as ``q + 2^(bits-1)``);
    ``scales``, ``zeros``: float32 (N, K // group_size), zeros integer-valued in code units (they may lie outside
    ``[0, 2^bits)``: lowbit's quantizer never clamps a zero point); ``group_size == K`` for per-channel.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if k % self.group_size or self.scales.shape != (n, k // self.group_size) or self.zeros.shape != self.scales.shape:
            raise LowbitError(
                f"codes {tuple(self.codes.shape)} with group size {self.group_size} need scales and zeros of shape "
                f"{(n, k // self.group_size)}, got {tuple(self.scales.shape)} and {tuple(self.zeros.shape)}"
            )

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """``(codes - zeros) · scales`` in float32, shape (N, K)."""
        n, k = self.codes.shape
        grouped = self.codes.float().reshape(n, -1, self.group_size)
        return ((grouped - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)).reshape(n, k)


def _group_size(spec: QuantSpec, in_features: int) -> int:
    if spec.granularity == "group":
        return spec.group_size
    if spec.granularity == "channel":
        return in_features
    raise LowbitError(f"weights are quantized per channel or per group; {spec.granularity!r} cannot be exported")


def _refit_scale(codes: torch.Tensor, zeros: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Least-squares scale of each group given its codes; groups with every code at the zero point keep theirs."""
    steps = (codes - zeros).double()  # float64: the sums must not add rounding of their own
    norm = (steps * steps).sum(-1, keepdim=True)
    fitted = (steps * w.double()).sum(-1, keepdim=True) / norm.clamp(min=1)
    return torch.where(norm > 0, fitted, scale.double()).float()


def _fit_span(w: torch.Tensor, span: torch.Tensor, symmetric: bool, bits: int):
    """Codes, scale and zero of groups ``w`` (G, g) assuming their codes cover ``span`` steps."""
    qmax = 2**bits - 1
    if symmetric:
        offset = 2 ** (bits - 1)
        scale = (w.abs().amax(-1, keepdim=True) / span).clamp(min=torch.finfo(torch.float32).tiny)
        zero = torch.full_like(scale, offset)
        codes = ((w / scale).round() + offset).clamp(0, qmax)
    else:
        lo = w.amin(-1, keepdim=True)
        scale = ((w.amax(-1, keepdim=True) - lo) / span).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (-lo / scale).round()
        codes = ((w / scale).round() + zero).clamp(0, qmax)
    scale = _refit_scale(codes, zero, w, scale)
    return codes, scale, zero


def _within(codes, scale, zero, w, eps: float) -> torch.Tensor:
    """Which groups come back within the storage tolerance (see the module docstring); float32 arithmetic, as
    ``LinearCodes.dequantize`` does it."""
    error = ((codes - zero) * scale - w).abs()
    tol = eps * (w.abs() + w.abs().amax(-1, keepdim=True))
    return (error <= tol).all(-1)


def extract_codes(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> LinearCodes:
    """The ``LinearCodes`` of a (N, K) weight already rounded onto ``spec``'s grid; ``name`` labels errors."""
    if weight.dim() != 2:
        raise LowbitError(f"{name}: expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise LowbitError(f"{name}: weight is {weight.dtype}, not floating point; it cannot be on a quantization grid")
    n, k = weight.shape
    group = _group_size(spec, k)
    spec.check_width(k, what=name)
    eps = torch.finfo(weight.dtype).eps
    w = weight.detach().float().reshape(-1, group)
    bits = spec.bits
    # first guess: the quantizer's own min-max grid, re-run on the rounded weight
    qt = quantize(w, QuantSpec(bits, spec.symmetric, "channel"))
    offset = 2 ** (bits - 1)
    zero = torch.full_like(qt.scale, offset) if spec.symmetric else qt.zero
    codes = qt.q + offset if spec.symmetric else qt.q
    scale = _refit_scale(codes, zero, w, qt.scale)
    bad = ~_within(codes, scale, zero, w, eps)
    if bad.any():  # spans other than the full one, shortest first (see the module docstring)
        idx = bad.nonzero().squeeze(-1)
        wb = w[idx]
        unresolved = torch.ones(len(idx), dtype=torch.bool)
        spans = range(1, 2**bits) if not spec.symmetric else range(1, offset + 1)
        for span in spans:
            c, s, z = _fit_span(wb, torch.tensor(float(span)), spec.symmetric, bits)
            take = unresolved & _within(c, s, z, wb, eps)
            if take.any():
                rows = idx[take]
                codes[rows], scale[rows], zero[rows] = c[take], s[take], z[take]
                unresolved &= ~take
            if not unresolved.any():
                break
        if unresolved.any():
            first = int(idx[unresolved][0])
            row = first // (k // group)
            if not torch.isfinite(w[first]).all():
                raise LowbitError(f"{name}: weight row {row} is not finite; it cannot be on a quantization grid")
            error = ((codes[first] - zero[first]) * scale[first] - w[first]).abs().amax()
            raise LowbitError(
                f"{name} is not on a {bits}-bit grid with {spec.granularity} scales (row {row} is off by up to "
                f"{float(error):.3g}, beyond {weight.dtype} rounding): quantize the model before exporting it, with "
                "the same --wbits and --group-size"
            )
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):  # cannot pass the check above; kept cheap
        raise LowbitError(f"{name}: weight is not finite; it cannot be on a quantization grid")
    return LinearCodes(
        codes.reshape(n, k).to(torch.int16),
        scale.reshape(n, k // group).contiguous(),
        zero.reshape(n, k // group).contiguous() + 0.0,  # + 0.0: no negative zeros in files
        bits,
        group,
    )


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear multiplies by: a not-yet-baked fake-quant linear rounds it on the fly."""
    if getattr(module, "weight_spec", None) is not None:
        with torch.no_grad():
            return module.quantized_weight()
    return module.weight


def iter_quantized_linears(model: nn.Module, config) -> Iterator[tuple[str, nn.Module, LinearCodes]]:
    """(full module name, module, codes) of every block linear that ``config`` quantizes, in block order.

    The module is an ``nn.Linear`` or lowbit's fake-quant ``QuantLinear`` (``.weight``, ``.bias``); lm_head and
    embeddings are never quantized. Nothing is yielded when ``config`` keeps weights in floating point.
    """
    from lowbit.models.registry import adapter_for

    spec = config.weight_spec
    if spec is None:
        return
    adapter = adapter_for(model.config.model_type)
    prefix = adapter.blocks_path
    for b, block in enumerate(adapter.blocks(model)):
        for name, module in adapter.block_linears(block).items():
            full = f"{prefix}.{b}.{name}"
            yield full, module, extract_codes(effective_weight(module), spec, name=full)
