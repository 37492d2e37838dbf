"""``TrainQuantConfig``: what a converted linear layer does in its three matmuls, validated once.

Defaults are the paper's HQ+LSS recipe (Xi et al., NeurIPS'23): Hadamard block 32, per-tensor LSQ steps,
INT4 forward, bit-split INT4 output gradient with leverage-score sampling keeping half of the 2N rows. One
departure: the LSQ steps start at the least-rounding-error point of the first batch, not at LSQ's rule
(``step_init``; the ``hq-lss4-lsqinit`` preset keeps the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from lowbit.errors import LowbitError
from lowbit.quant.hadamard import is_power_of_two

Backward = Literal["int4", "int8", "float"]
BACKWARDS = ("int4", "int8", "float")
ActGranularity = Literal["tensor", "token"]
WeightGranularity = Literal["tensor", "channel"]
StepInit = Literal["mse", "lsq"]
AUTO_BLOCKS = (8, 16, 32, 64, 128, 256)
DEFAULT_KEEP = ("lm_head", "classifier", "score", "pooler", "qa_outputs")


@dataclass(frozen=True)
class TrainQuantConfig:
    """How ``convert`` quantizes training.

    - ``bits``: forward operand bits (4 as the paper; 8 gives the INT8 baseline). Symmetric grid
      ``[-2^(b-1), 2^(b-1)-1]``.
    - ``hadamard``: rotate both forward operands with the block Hadamard (HQ); off gives plain LSQ.
    - ``block_size``: a power of two, or ``"auto"``: chosen per layer on the first batch among
      ``auto_blocks`` that tile the width, minimising the forward matmul's reconstruction error.
    - ``pad``: when the block does not tile a layer's width, zero-pad the reduction dimension (exact: the
      padded columns of activation and weight are zero, so the product is unchanged). Off: refuse the layer.
    - ``act_granularity``: ``tensor`` (one learnable LSQ step, the paper) or ``token`` (dynamic absmax per
      token, nothing learned). ``weight_granularity``: ``tensor`` or ``channel`` (learnable LSQ step per row).
    - ``backward``: ``int4`` (bit-split INT4 output gradient + leverage-score sampling), ``int8`` (per-tensor
      INT8 with stochastic rounding, no sampling), ``float`` (exact straight-through gradient of the quantized
      forward, for ablations and deterministic tests).
    - ``sampling_ratio``: expected fraction of the 2N bit-split rows kept by LSS (0.5 as the paper); 1 switches
      sampling off (every nonzero row kept, as the released kernels do).
    - ``keep``: module names kept in high precision; an entry matches a module's last name component or, if it
      contains a dot, its full name.
    - ``random_signs``: multiply by a seeded random +-1 diagonal before the Hadamard (a randomised rotation).
    - ``step_init``: how the LSQ steps start on the first batch: ``mse`` (least rounding error, searched; the
      default) or ``lsq`` (``2 mean|v| / sqrt(qmax)`` up to 4 bits, absmax above, as the papers).
    - ``seed``: every random choice of a layer (signs, rounding, sampling) derives from it and the layer's index.
    - ``sync_init``: average the first-batch statistics (activation step init, auto block errors) over a
      ``torch.distributed`` group when one is initialised, so DDP ranks start from identical parameters.
    """

    bits: int = 4
    hadamard: bool = True
    block_size: int | Literal["auto"] = 32
    auto_blocks: tuple[int, ...] = AUTO_BLOCKS
    pad: bool = False
    act_granularity: ActGranularity = "tensor"
    weight_granularity: WeightGranularity = "tensor"
    backward: Backward = "int4"
    sampling_ratio: float = 0.5
    keep: tuple[str, ...] = field(default=DEFAULT_KEEP)
    random_signs: bool = False
    step_init: StepInit = "mse"
    seed: int = 0
    sync_init: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.block_size != "auto" and not (isinstance(self.block_size, int) and is_power_of_two(self.block_size)):
            raise LowbitError(f"block_size must be a power of two or 'auto', got {self.block_size!r}")
        if not self.auto_blocks or not all(isinstance(b, int) and is_power_of_two(b) for b in self.auto_blocks):
            raise LowbitError(f"auto_blocks must be powers of two, got {self.auto_blocks!r}")
        if self.act_granularity not in ("tensor", "token"):
            raise LowbitError(f"act_granularity must be 'tensor' or 'token', got {self.act_granularity!r}")
        if self.weight_granularity not in ("tensor", "channel"):
            raise LowbitError(f"weight_granularity must be 'tensor' or 'channel', got {self.weight_granularity!r}")
        if self.step_init not in ("mse", "lsq"):
            raise LowbitError(f"step_init must be 'mse' or 'lsq', got {self.step_init!r}")
        if self.backward not in BACKWARDS:
            raise LowbitError(f"backward must be one of {', '.join(BACKWARDS)}, got {self.backward!r}")
        ratio = self.sampling_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise LowbitError(f"sampling_ratio must be in (0, 1], got {ratio!r}")
        if isinstance(self.keep, str) or not all(isinstance(k, str) for k in self.keep):
            raise LowbitError(f"keep must be a tuple of module names, got {self.keep!r}")
        if not isinstance(self.seed, int):
            raise LowbitError(f"seed must be an integer, got {self.seed!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def with_(self, **changes) -> TrainQuantConfig:
        return replace(self, **changes)


def preset(name: str, seed: int = 0) -> TrainQuantConfig | None:
    """The CLI's ``--quant`` presets; ``none`` is no conversion (returns None)."""
    if name == "none":
        return None
    if name == "int8":  # INT8 forward (plain LSQ) and INT8 stochastically rounded output gradient
        return TrainQuantConfig(bits=8, hadamard=False, backward="int8", seed=seed)
    if name == "lsq4":  # INT4 LSQ forward without Hadamard, exact straight-through backward: isolates HQ
        return TrainQuantConfig(bits=4, hadamard=False, backward="float", seed=seed)
    if name == "hq-lss4":
        return TrainQuantConfig(seed=seed)
    if name == "hq-lss4-lsqinit":  # HQ+LSS with the LSQ paper's step initialisation (the earlier default)
        return TrainQuantConfig(step_init="lsq", seed=seed)
    if name == "hq-lss4-token":  # HQ+LSS with finer scales: dynamic per-token activations, LSQ step per weight row
        return TrainQuantConfig(act_granularity="token", weight_granularity="channel", seed=seed)
    raise LowbitError(f"unknown quantized-training preset {name!r}; use {', '.join(PRESETS)}")


PRESETS = ("none", "int8", "lsq4", "hq-lss4", "hq-lss4-lsqinit", "hq-lss4-token")
