"""What a method needs to know about an architecture, and nothing else.

An ``Adapter`` is the only place that knows Hugging Face module names. For each decoder block it declares which
linears read the same input and what produces that input (``LinearPair``), so transforms such as smoothing scales
or affine matrices can be applied on one side and folded into the other. It also gives the head layout, which
per-head transforms need (grouped-query attention: several query heads share one key/value head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lowbit.errors import LowbitError

PairKind = Literal["norm", "linear", "qk"]


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise LowbitError(f"{self.num_heads} attention heads cannot be grouped over {self.num_kv_heads} KV heads")

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LinearPair:
    """``targets`` all read the output of ``source`` (a norm, or a linear for v→o); for ``qk``, q and k.

    ``per_head`` marks pairs whose transform must be block-diagonal per attention head to stay exact
    (v→o and q↔k). ``commutes`` is False where a transform would not survive an op in between
    (q↔k across RoPE), so methods must skip it. ``elementwise`` marks a producer whose output passes an
    elementwise op before the targets read it (the gated MLP's product, OPT's ReLU): only a positive diagonal
    scale, without shift, survives that, so such a pair takes neither matrices nor shifts.
    """

    kind: PairKind
    source: str
    targets: tuple[str, ...]
    per_head: bool = False
    commutes: bool = True
    elementwise: bool = False
    # (config attribute, values) under which an elementwise pair is exact, e.g. OPT's ReLU; None: always
    requires: tuple[str, tuple[str, ...]] | None = None

    def exact_for(self, config) -> bool:
        """Whether the model's config keeps a transform on this pair exact (``requires``)."""
        return self.requires is None or getattr(config, self.requires[0], None) in self.requires[1]

    def check(self, config) -> None:
        """Refuse a transform on this pair when the model's config breaks what makes it exact."""
        if not self.exact_for(config):
            attr, allowed = self.requires
            value = getattr(config, attr, None)
            raise LowbitError(f"{self.source} -> {', '.join(self.targets)} scales are exact only with {attr} in "
                              f"{allowed}, this model has {value!r}; leave out --mlp-scales")


@dataclass(frozen=True)
class Adapter:
    """Module names and head layout of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    final_norm_path: str
    linears: tuple[str, ...]
    pairs: tuple[LinearPair, ...]
    rope: bool
    # what a rotation of the residual stream (lowbit.transforms.rotation) touches besides the norm pairs: the
    # embedding whose rows are residual vectors, the head reading the final norm, the block linears that add
    # into the residual; it is exact only for norms without mean subtraction or bias (RMSNorm)
    embed_path: str = ""
    lm_head_path: str = "lm_head"
    residual_writers: tuple[str, ...] = ()
    rms_norm: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def norm_pairs(self) -> tuple[LinearPair, ...]:
        return tuple(p for p in self.pairs if p.kind == "norm")

    def heads(self, config) -> HeadLayout:
        num_heads = config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return HeadLayout(num_heads, num_kv, head_dim)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The quantizable linears of one block, by their name inside the block."""
        return {name: block.get_submodule(name) for name in self.linears}

    def validate(self, model: nn.Module) -> None:
        """Check that every declared module exists, so a renamed HF class fails loudly, not silently."""
        try:
            blocks = self.blocks(model)
            self.final_norm(model)
            for name in {*self.linears, *(p.source for p in self.pairs), *(t for p in self.pairs for t in p.targets)}:
                blocks[0].get_submodule(name)
        except AttributeError as err:
            raise LowbitError(
                f"{type(model).__name__} does not have the module layout lowbit expects for {self.name} ({err}); "
                "is the transformers version supported?"
            ) from None
