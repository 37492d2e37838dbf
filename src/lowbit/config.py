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
METHODS = ("rtn", "smoothquant", "omniquant", "affinequant", "gptq")
ROUNDINGS = ("rtn", "gptq")
GPTQ_GRIDS = ("minmax", "mse")
SCALE_INITS = ("smoothquant", "identity")  # where learnt transforms start (see lowbit.ptq.recipes)
ROTATIONS = ("inputs", "residual")  # lowbit.transforms.rotation
SCALE_LEARNING_METHODS = ("omniquant", "affinequant")  # the methods --scale-init applies to
# Fields added after the first release: written out only when they differ from their defaults, so the checkpoint
# manifests of runs started before them still match (resume) and older readers still load plain configs.
_LATER_FIELDS = ("scale_init", "mlp_scales", "rotate", "weight_lr", "e2e_epochs", "e2e_lr", "rounding", "gptq_grid", "gptq_act_order", "gptq_damp", "gptq_block_size")


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
    let_lr: float | None = None  # None: the recipe's (lowbit.ptq.recipes.default_let_lr)
    lwc_lr: float = 1e-2
    alpha: float = 0.5
    sf: float | None = None
    aug_loss: bool = False
    # AffineQuant's full matrices at the norms, kept as online ops; None: the recipe's (on after --rotate inputs
    # with activation bits, where they compose into the rotation's op for free: lowbit.ptq.recipes)
    norm_matrices: bool | None = None
    # start of the learnt scales: SmoothQuant's amax^alpha / wmax^(1-alpha), or the identity (the weights start
    # as the plain model's, where a LWC-only method starts; shifts keep their own start); None: the recipe's
    scale_init: str | None = None
    # diagonal scales on the MLP's inner pair (up→down, fc1→fc2), which the papers leave without any transform;
    # None: the recipe's (on for AffineQuant with quantized activations, lowbit.ptq.recipes.default_mlp_scales)
    mlp_scales: bool | None = None
    # rotate before quantizing (lowbit.transforms.rotation): "inputs" (each norm's output, online, merged into its
    # readers) or "residual" (QuaRot's offline rotation of the residual stream; RMSNorm models); None: no rotation
    rotate: str | None = None
    # learning rate of the block's weights themselves, trained through the rounding beside the transforms and the
    # clipping (EfficientQAT's Block-AP; lowbit.ptq.block); 0 keeps the weights as loaded, as the papers do; None:
    # the recipe's (3e-5 for AffineQuant weight-only, 0 elsewhere: lowbit.ptq.recipes.default_weight_lr)
    weight_lr: float | None = None
    # after the method: epochs of end-to-end tuning of the weight scales against the full-precision model's logits
    # (lowbit.ptq.e2e; weight-only); 0: none, as the papers
    e2e_epochs: int = 0
    e2e_lr: float = 3e-3  # of the scales' gains (relative units)
    # final rounding of the weights: None is the method's own (GPTQ for ``gptq``, round-to-nearest otherwise);
    # "gptq" after a calibrating method rounds its merged weights by GPTQ on the grid it learnt (weight-only)
    rounding: str | None = None
    gptq_grid: str = "minmax"  # grid where no learnt clipping exists: per-group min-max, or the MSE clip search
    gptq_act_order: bool = True  # columns in decreasing Hessian diagonal (static groups: each keeps its own grid)
    gptq_damp: float = 0.01
    gptq_block_size: int = 128

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
        if self.let_lr is not None and not self.let_lr > 0:
            raise LowbitError(f"--let-lr must be positive, got {self.let_lr}")
        if self.weight_lr is not None and not self.weight_lr >= 0:
            raise LowbitError(f"--weight-lr must be 0 (weights stay as loaded) or positive, got {self.weight_lr}")
        if self.weight_lr and self.method not in SCALE_LEARNING_METHODS:
            raise LowbitError(f"--weight-lr trains the weights beside a learning method (omniquant, affinequant), "
                              f"not {self.method}; drop it")
        if self.e2e_epochs < 0 or not self.e2e_lr > 0:
            raise LowbitError(f"--e2e-epochs must be 0 or more and --e2e-lr positive, got {self.e2e_epochs} and "
                              f"{self.e2e_lr}")
        if self.e2e_epochs and (self.abits != FLOAT_BITS or self.wbits == FLOAT_BITS):
            raise LowbitError(f"end-to-end scale tuning (--e2e-epochs) is weight-only: it needs --abits {FLOAT_BITS} "
                              f"and --wbits below {FLOAT_BITS}, got {self.name}")
        if self.scale_init not in (None, *SCALE_INITS):
            raise LowbitError(f"--scale-init must be one of {', '.join(SCALE_INITS)}, got {self.scale_init!r}")
        for name in ("mlp_scales", "norm_matrices"):
            if getattr(self, name) not in (None, True, False):
                raise LowbitError(f"{name} must be True, False or None (the recipe's), got {getattr(self, name)!r}")
        if self.rotate not in (None, *ROTATIONS):
            raise LowbitError(f"--rotate must be one of {', '.join(ROTATIONS)}, got {self.rotate!r}")
        if self.rotate == "inputs" and self.mlp_scales:
            raise LowbitError("--mlp-scales fold a scale into down_proj's weight, but --rotate inputs runs a rotation "
                              "on its input in between, so the fold would not be exact; drop one of them")
        if self.scale_init is not None and self.method not in SCALE_LEARNING_METHODS:
            raise LowbitError(f"--scale-init applies to the methods that learn scales (omniquant, affinequant), "
                              f"not {self.method}; drop it")
        self._check_rounding()

    def _check_rounding(self) -> None:
        if self.rounding not in (None, *ROUNDINGS):
            raise LowbitError(f"unknown rounding {self.rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
        if self.method == "rtn" and self.rounding == "gptq":
            raise LowbitError("--method rtn rounds to nearest; for GPTQ alone use --method gptq")
        if self.method == "gptq" and self.rounding == "rtn":
            raise LowbitError("--method gptq rounds by GPTQ; --rounding rtn contradicts it")
        if self.gptq_grid not in GPTQ_GRIDS:
            raise LowbitError(f"--gptq-grid must be one of {', '.join(GPTQ_GRIDS)}, got {self.gptq_grid!r}")
        if not 0.0 < self.gptq_damp < 1.0 or self.gptq_block_size < 1:
            raise LowbitError(f"GPTQ needs damping in (0, 1) and a positive block size, got {self.gptq_damp} "
                              f"and {self.gptq_block_size}")
        gptq_defaults = (self.gptq_grid, self.gptq_act_order, self.gptq_damp, self.gptq_block_size) == (
            "minmax", True, 0.01, 128)
        if self.rounding_method != "gptq" and not gptq_defaults:
            raise LowbitError("--gptq-grid / --gptq-act-order and the other GPTQ options apply only with GPTQ "
                              "rounding: add --rounding gptq, or use --method gptq")
        if self.rounding == ("gptq" if self.method == "gptq" else "rtn"):
            object.__setattr__(self, "rounding", None)  # the method's own rounding: same config, same manifest
        if self.rounding_method == "gptq" and (self.abits != FLOAT_BITS or self.wbits == FLOAT_BITS):
            raise LowbitError(
                f"GPTQ rounding is weight-only: it needs --abits {FLOAT_BITS} and --wbits below {FLOAT_BITS}, got "
                f"{self.name} (its Hessian would have to be of fake-quantized activations, which is not implemented)"
            )

    @property
    def rounding_method(self) -> str:
        """How the final weights are rounded: ``gptq`` or ``rtn``."""
        return "gptq" if self.method == "gptq" or self.rounding == "gptq" else "rtn"

    @property
    def label(self) -> str:
        """The method as tables name it: ``affinequant+gptq`` when GPTQ rounds after a calibrating method,
        ``affinequant+weights`` when the weights learn too, ``inputs-rotated rtn`` after a rotation."""
        from lowbit.ptq.recipes import default_weight_lr  # the recipes read this module: import on use

        label = self.method + ("+weights" if default_weight_lr(self) else "")
        label += "+gptq" if self.method != "gptq" and self.rounding_method == "gptq" else ""
        label += "+e2e" if self.e2e_epochs else ""
        return f"{self.rotate}-rotated {label}" if self.rotate else label

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
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in asdict(self).items() if k not in _LATER_FIELDS or v != defaults[k]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LowbitError(f"unknown quantization config keys {unknown}; was it written by a newer lowbit?")
        return cls(**data)
