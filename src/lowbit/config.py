"""Typed configuration for quantization, validated once when it is built.

``wbits``/``abits`` of 16 mean "leave in floating point". ``group_size=None`` means per output channel.
The same names are used by the CLI flags (``--wbits --abits --group-size --nsamples --seqlen --seed``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lowbit.errors import LowbitError
from lowbit.quant.quantizer import MAX_BITS, MIN_BITS, QuantSpec

FLOAT_BITS = 16
METHODS = ("rtn", "smoothquant", "omniquant", "affinequant")


def _check_bits(name: str, value: Any) -> None:
    if not isinstance(value, int) or not (MIN_BITS <= value <= MAX_BITS or value == FLOAT_BITS):
        raise LowbitError(
            f"--{name} must be an integer from {MIN_BITS} to {MAX_BITS}, or {FLOAT_BITS} to keep floating point; "
            f"got {value!r}"
        )


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; the calibration fields are used by methods that calibrate."""

    method: str = "rtn"
    wbits: int = 4
    abits: int = FLOAT_BITS
    group_size: int | None = None
    weight_symmetric: bool = False
    act_symmetric: bool = False
    nsamples: int = 128
    seqlen: int = 2048
    calib_data: str = "wikitext2"
    seed: int = 0
    # calibration recipe (methods that learn); None picks the method's default
    epochs: int | None = None
    batch_size: int = 1
    let_lr: float = 5e-3
    lwc_lr: float = 1e-2
    alpha: float = 0.5
    sf: float | None = None
    aug_loss: bool = False
    norm_matrices: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        _check_bits("wbits", self.wbits)
        _check_bits("abits", self.abits)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise LowbitError(f"--group-size must be a positive integer (or omitted for per-channel), got {self.group_size!r}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 0:
            raise LowbitError(f"--epochs must be 0 or more, got {self.epochs}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LowbitError(f"--alpha must be in [0, 1], got {self.alpha}")

    @property
    def weight_spec(self) -> QuantSpec | None:
        if self.wbits == FLOAT_BITS:
            return None
        granularity = "channel" if self.group_size is None else "group"
        return QuantSpec(self.wbits, self.weight_symmetric, granularity, self.group_size)

    @property
    def act_spec(self) -> QuantSpec | None:
        if self.abits == FLOAT_BITS:
            return None
        return QuantSpec(self.abits, self.act_symmetric, "token")

    @property
    def name(self) -> str:
        """Short label such as ``W4A16g64``, as the papers write configurations."""
        group = f"g{self.group_size}" if self.group_size else ""
        return f"W{self.wbits}A{self.abits}{group}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LowbitError(f"unknown quantization config keys {unknown}; was it written by a newer lowbit?")
        return cls(**data)
