"""One decoder block under calibration: its linears fake-quantized, its pairs transformed, merged at the end.

During calibration the block runs through ``torch.func.functional_call`` with transformed weights computed from
the frozen originals and the learnable transforms, so gradients reach the transforms and the clipping factors
while the stored weights stay untouched. Norm pairs are applied as a hook on the norm's output (exact for any
``T``); at merge time a diagonal ``T`` is folded into the norm, and a full matrix stays as an explicit online
op (``OnlineTransform``) that is saved and reloaded with the model; after a rotation of the inputs
(``lowbit.transforms.rotation``) every norm-side ``T`` composes into that rotation's online op.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call

from lowbit.errors import LowbitError
from lowbit.models.base import Adapter, HeadLayout, LinearPair
from lowbit.quant.clipping import LearnableClipping
from lowbit.quant.fake_quant import QuantLinear
from lowbit.quant.quantizer import QuantSpec
from lowbit.transforms.online import OnlineTransform, attach_online, carry_online, online_op
from lowbit.transforms.pair import PairTransform


@dataclass(frozen=True)
class TransformPlan:
    """Which transforms a method uses; see ``lowbit.ptq.recipes``."""

    scales: bool = False  # diagonal scales (SmoothQuant init, learnt by LET)
    shifts: bool = False  # channel shifts where biases can absorb them (OPT)
    matrices: bool = False  # AffineQuant per-head matrices (v→o)
    norm_matrices: bool = False  # AffineQuant full matrices at norm pairs (kept online: a norm cannot absorb them)
    lwc: bool = False  # learnable weight clipping
    alpha: float = 0.5  # SmoothQuant migration strength for the initial scales
    sf: float = 1e-2  # AffineQuant stability factor (off-diagonal weight in the gradual mask)
    scale_init: str = "smoothquant"  # or "identity": every transform starts at T = I (shifts keep their init)
    mlp_scales: bool = False  # diagonal scales on the MLP's inner pair (up→down, fc1→fc2), which the papers lack
    weights: bool = False  # the linears' weights learn too, through the rounding (EfficientQAT's Block-AP)

    def to_dict(self) -> dict:
        """The plan as checkpoint manifests record it; fields added later only when they differ from their
        default, so the checkpoints of runs from before they existed still resume."""
        data = asdict(self)
        for name, default in (("scale_init", "smoothquant"), ("mlp_scales", False), ("weights", False)):
            if data[name] == default:
                del data[name]
        return data


def _key(linear_name: str) -> str:
    """A linear's name as a parameter key (``self_attn.q_proj`` -> ``self_attn-q_proj``: dots are not allowed)."""
    return linear_name.replace(".", "-")


def _channel_stats(block: nn.Module, names: list[str], inputs: torch.Tensor, kwargs: dict, batch: int) -> dict:
    """Per-channel max and min of the inputs of the named linears, over every calibration token."""
    stats: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().flatten(0, -2).float()
            mx, mn = x.amax(0), x.amin(0)
            if name in stats:
                stats[name] = [torch.maximum(stats[name][0], mx), torch.minimum(stats[name][1], mn)]
            else:
                stats[name] = [mx, mn]
        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            block(inputs[start : start + batch], **kwargs)
    for h in handles:
        h.remove()
    return stats


class BlockCalibration(nn.Module):
    """The learnable parameters of one block (transforms and clippings) and the way to merge them."""

    def __init__(self, block: nn.Module, adapter: Adapter, heads: HeadLayout, plan: TransformPlan,
                 weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> None:
        super().__init__()
        self.block, self.adapter, self.heads, self.plan = block, adapter, heads, plan
        self.pairs: list[LinearPair] = [p for p in adapter.pairs if p.kind != "qk"]  # indices name the transforms
        self.transforms = nn.ModuleDict()
        self._hooks: list = []
        self.linears = self._wrap(weight_spec, act_spec)
        # Block-AP: a learnt offset per weight, added before the transforms (so merging bakes it in like them);
        # an offset rather than the weight itself keeps the stored originals frozen, as the module docstring says
        self.weight_offsets = nn.ParameterDict({
            _key(name): nn.Parameter(torch.zeros_like(q.weight)) for name, q in self.linears.items()} if plan.weights else {})

    def _wrap(self, weight_spec, act_spec) -> dict[str, QuantLinear]:
        out = {}
        for name, lin in self.adapter.block_linears(self.block).items():
            if isinstance(lin, QuantLinear):
                q = lin
            else:
                q = QuantLinear(lin, weight_spec, act_spec, name=name)
                carry_online(lin, q)
            parent, _, attr = name.rpartition(".")
            setattr(self.block.get_submodule(parent) if parent else self.block, attr, q)
            if self.plan.lwc and weight_spec is not None:
                rows = LearnableClipping.rows_for(q.out_features, q.in_features, weight_spec.group_size)
                q.weight_clip = LearnableClipping(rows, device=q.weight.device)
            out[name] = q
        return out

    # ------------------------------------------------------------------------------------------- building

    def init_transforms(self, inputs: torch.Tensor, kwargs: dict, batch: int) -> None:
        """SmoothQuant-initialised transforms for every pair, from activation statistics on ``inputs``."""
        if not self.plan.scales:
            return
        active = {i: p for i, p in enumerate(self.pairs) if self.plan.mlp_scales or not p.elementwise}
        for pair in active.values():  # a consumer transform assumes nothing runs between producer and weight
            if any(online_op(self.linears[t]) is not None for t in pair.targets):
                raise LowbitError(f"{', '.join(pair.targets)} run(s) an online transform on their input, so "
                                  f"{pair.source}'s scales cannot pass to their weights; leave out --mlp-scales")
        stats = _channel_stats(self.block, [p.targets[0] for p in active.values()], inputs, kwargs, batch)
        h = self.heads
        for i, pair in active.items():
            xmax, xmin = stats[pair.targets[0]]
            wmax = torch.stack([self.linears[t].weight.detach().abs().amax(0).float() for t in pair.targets]).amax(0)
            amax = torch.maximum(xmax.abs(), xmin.abs())
            per_head = pair.per_head
            if per_head:  # o_proj reads num_heads blocks; the transform lives on the KV heads' blocks
                amax = amax.view(h.num_kv_heads, h.group, h.head_dim).amax(1).flatten()
                wmax = wmax.view(h.num_kv_heads, h.group, h.head_dim).amax(1).flatten()
                xmax = xmax.view(h.num_kv_heads, h.group, h.head_dim).amax(1).flatten()
                xmin = xmin.view(h.num_kv_heads, h.group, h.head_dim).amin(1).flatten()
            scale = (amax.clamp(min=1e-5).pow(self.plan.alpha) / wmax.clamp(min=1e-5).pow(1 - self.plan.alpha)).clamp(min=1e-5)
            shift = (xmax + xmin) / 2 if self.plan.shifts and not pair.elementwise and self._can_shift(pair) else None
            if shift is not None:
                scale = ((xmax - xmin) / 2).clamp(min=1e-5).pow(self.plan.alpha) / wmax.clamp(min=1e-5).pow(1 - self.plan.alpha)
            if self.plan.scale_init == "identity":
                scale = torch.ones_like(scale)
            use_matrix = (self.plan.matrices if per_head else self.plan.norm_matrices) and not pair.elementwise
            self.transforms[str(i)] = PairTransform(
                scale.clamp(min=1e-5), block=h.head_dim if per_head else None, use_matrix=use_matrix, shift=shift, sf=self.plan.sf
            )
        self._install_norm_hooks()

    def _can_shift(self, pair: LinearPair) -> bool:
        source = self.block.get_submodule(pair.source)
        return getattr(source, "bias", None) is not None and all(self.linears[t].bias is not None for t in pair.targets)

    def _install_norm_hooks(self) -> None:
        for i, pair in enumerate(self.pairs):
            if pair.kind == "norm" and str(i) in self.transforms:
                t = self.transforms[str(i)]
                norm = self.block.get_submodule(pair.source)
                self._hooks.append(norm.register_forward_hook(lambda m, a, out, t=t: t.apply_to_input(out)))

    # ------------------------------------------------------------------------------------------- running

    def set_epoch(self, epoch: int, epochs: int) -> None:
        for t in self.transforms.values():
            t.set_epoch(epoch, epochs)

    def transformed_weights(self) -> dict[str, torch.Tensor]:
        """Linear weights and biases with every transform applied (input side, then output side)."""
        offsets = self.weight_offsets
        cur = {n: (q.weight + offsets[_key(n)] if offsets else q.weight, q.bias) for n, q in self.linears.items()}
        for i, pair in enumerate(self.pairs):
            t = self.transforms[str(i)] if str(i) in self.transforms else None
            if t is None:
                continue
            if pair.kind == "linear":
                cur[pair.source] = t.producer_linear(*cur[pair.source])
            group = self.heads.group if pair.per_head else 1
            for target in pair.targets:
                cur[target] = t.consumer(*cur[target], group=group)
        out = {}
        for name, (w, b) in cur.items():
            out[f"{name}.weight"] = w
            if b is not None:
                out[f"{name}.bias"] = b
        return out

    def forward(self, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = functional_call(self.block, self.transformed_weights(), (x,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    def learnable(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser group: ``let`` (transforms), ``lwc`` (clipping), ``weights`` (weight offsets)."""
        clips = [p for q in self.linears.values() if q.weight_clip is not None for p in q.weight_clip.parameters()]
        return {"let": list(self.transforms.parameters()), "lwc": clips, "weights": list(self.weight_offsets.values())}

    def dominance_margin(self) -> float | None:
        margins = [t.dominance_margin() for t in self.transforms.values() if not t.is_diagonal]
        return float(torch.stack(margins).min()) if margins else None

    # ------------------------------------------------------------------------------------------- merging

    @torch.no_grad()
    def merge(self, bake: bool = True) -> list[str]:
        """Write the transforms into the weights, bake the rounded weights; returns the online ops left.
        ``bake=False`` leaves the merged weights in float with their grids (spec and learnt clipping) attached,
        for a rounding stage of its own (GPTQ, ``lowbit.ptq.rounding``)."""
        weights = self.transformed_weights()
        for name, q in self.linears.items():
            q.weight.copy_(weights[f"{name}.weight"])
            if q.bias is not None:
                q.bias.copy_(weights[f"{name}.bias"])
        for h in self._hooks:
            h.remove()
        for i, pair in enumerate(self.pairs):
            t = self.transforms[str(i)] if str(i) in self.transforms else None
            if t is None or pair.kind != "norm":
                continue
            norm = self.block.get_submodule(pair.source)
            existing = online_op(norm)
            if existing is not None:  # a rotation already follows the norm: T composes into that op
                attach_online(norm, existing.followed_by(t.inverse(), t.shift))
            elif t.is_diagonal:
                w, b = t.producer_norm(norm.weight, getattr(norm, "bias", None))
                norm.weight.copy_(w)
                if b is not None:
                    norm.bias.copy_(b)
            else:
                attach_online(norm, OnlineTransform(t.inverse(), t.shift))
        online = [name for name, module in self.block.named_modules() if online_op(module) is not None]
        if bake:
            for q in self.linears.values():
                q.bake_weight()
        return online
