"""Rotations by a seeded orthogonal ``Q`` (a Hadamard matrix where one exists) that flatten activation outliers.

Two placements, both exact (the model computes the same function before quantization):

- ``inputs``: each norm's output is rotated online, ``x ← x Q``, and the linears reading it take ``W ← W Q``;
  likewise the MLP's inner input (down_proj's, a gated product no weight can absorb anything into) with a
  rotation of its own width, as QuaRot does with an online Hadamard. The residual stream and its writers keep
  their weights. Each online op is a saved ``OnlineTransform`` (dense for now: an extra ``width²`` product per
  norm and ``inner²`` per MLP at inference); calibrated transforms at the norms compose into it. MLP scales
  (``mlp_scales``) would fold into down_proj's weight across the rotation on its input, which is not exact, so
  that pair is left alone.
- ``residual``: QuaRot's offline rotation. Every residual vector becomes ``x Q``: embedding rows, writers
  (``W ← Qᵀ W``, ``b ← Qᵀ b``), and, once each norm's gain is folded into its readers (RMSNorm then passes ``Q``,
  as it keeps norms), readers and head take ``W ← W Q``. Nothing runs online; a tied head is untied.

On SmolLM2 (full WikiText-2 test, H100, BENCHMARKS.md) ``inputs`` wins wherever activations are quantized:
RTN W6A6 27.50 → 22.41 (``residual`` 24.94), W4A4 1651.8 → 73.7 (517.0); AffineQuant at the paper recipe W6A6
22.75 → 22.20 (22.09 with the norm matrices, their default after it), W4A4 56.45 → 35.04. Both cost weight-only
RTN (W4A16 38.94 → 42.09, ``residual`` 70.86): rotations are for quantized activations, hence opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.config import ROTATIONS
from lowbit.errors import LowbitError
from lowbit.models.base import Adapter
from lowbit.quant.orthogonal import random_rotation
from lowbit.transforms.online import OnlineTransform, attach_online, online_op


@dataclass(frozen=True)
class RotationReport:
    """What a rotation did: where, the width, how ``Q`` was built, whether it untied the head."""

    where: str
    width: int
    kind: str
    seed: int
    untied_head: bool = False

    def to_dict(self) -> dict:
        return {"where": self.where, "width": self.width, "kind": self.kind, "seed": self.seed,
                "untied_head": self.untied_head}


def check_rotatable(adapter: Adapter, where: str) -> None:
    """Refuse an unknown placement, and architectures whose norms a rotation would not pass."""
    if where not in ROTATIONS:
        raise LowbitError(f"--rotate must be one of {', '.join(ROTATIONS)}, got {where!r}")
    if where == "residual" and not (adapter.rms_norm and adapter.embed_path and adapter.residual_writers):
        raise LowbitError(f"--rotate residual needs RMSNorm blocks (LLaMA family); {adapter.name} models use "
                          "LayerNorm, which a rotation of the residual stream does not pass; use --rotate inputs")


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.dtype))


def _norms_and_readers(model: nn.Module, adapter: Adapter):
    for block in adapter.blocks(model):
        for pair in adapter.norm_pairs():
            yield block.get_submodule(pair.source), [block.get_submodule(t) for t in pair.targets]


def _refuse_online_ops(model: nn.Module) -> None:
    """Checked before anything changes: a rotation assumes nothing runs between a norm and its readers."""
    if any(online_op(m) is not None for m in model.modules()):
        raise LowbitError("this model already runs transforms online (was it quantized before?); rotate the "
                          "original model")


def inner_linears(adapter: Adapter) -> tuple[str, ...]:
    """The linears whose input is an elementwise product no weight can absorb a rotation into (down_proj, fc2)."""
    return tuple(t for p in adapter.pairs if p.elementwise for t in p.targets)


@torch.no_grad()
def rotate_inputs(model: nn.Module, adapter: Adapter, seed: int = 0) -> RotationReport:
    """Rotate online every norm pair's input and the MLP's inner input, merging ``Q`` into the linears that read
    them, in place. The inner width takes its own rotation (seed + 1)."""
    check_rotatable(adapter, "inputs")
    _refuse_online_ops(model)
    width = model.config.hidden_size
    outer = random_rotation(width, seed)
    inner = {}
    for block in adapter.blocks(model):
        sites = [(block.get_submodule(p.source), [block.get_submodule(t) for t in p.targets], outer)
                 for p in adapter.norm_pairs()]
        for name in inner_linears(adapter):
            linear = block.get_submodule(name)
            if linear.in_features not in inner:
                inner[linear.in_features] = random_rotation(linear.in_features, seed + 1)
            sites.append((linear, [linear], inner[linear.in_features]))
        for module, readers, rotation in sites:
            q = rotation.matrix.to(readers[0].weight.device)
            attach_online(module, OnlineTransform(q.float()[None], None))
            for reader in readers:
                _set(reader, reader.weight.double() @ q)
    kinds = {outer.kind, *(r.kind for r in inner.values())}
    return RotationReport("inputs", width, "hadamard" if kinds == {"hadamard"} else "/".join(sorted(kinds)), seed)


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``W ← W diag(g)`` for every reader of ``norm``, then ``g ← 1``: the norm becomes a pure RMS scaling."""
    if getattr(norm, "bias", None) is not None:
        raise LowbitError(f"{type(norm).__name__} has a bias, which a rotation does not pass; use --rotate inputs")
    gain = norm.weight.detach().double()
    for linear in readers:
        _set(linear, linear.weight.double() * gain)
    norm.weight.fill_(1.0)


def _untie_head(model: nn.Module, head: nn.Linear, embed: nn.Embedding) -> bool:
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False  # what save_pretrained, from_pretrained and tie_weights() follow
    return True


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter: Adapter, seed: int = 0) -> RotationReport:
    """Rotate ``model``'s residual stream in place (float64 arithmetic, weights keep their dtype)."""
    check_rotatable(adapter, "residual")
    _refuse_online_ops(model)
    embed = model.get_submodule(adapter.embed_path)
    head = model.get_submodule(adapter.lm_head_path)
    width = embed.weight.shape[1]
    rotation = random_rotation(width, seed)
    q = rotation.matrix.to(embed.weight.device)
    untied = _untie_head(model, head, embed)
    for norm, readers in _norms_and_readers(model, adapter):
        _fold_norm(norm, readers)
    _fold_norm(adapter.final_norm(model), [head])
    embed.weight.copy_((embed.weight.double() @ q).to(embed.weight.dtype))
    for _, readers in _norms_and_readers(model, adapter):
        for reader in readers:
            _set(reader, reader.weight.double() @ q)
    for block in adapter.blocks(model):
        for name in adapter.residual_writers:
            writer = block.get_submodule(name)
            bias = None if writer.bias is None else q.T @ writer.bias.double()
            _set(writer, q.T @ writer.weight.double(), bias)
    _set(head, head.weight.double() @ q)
    return RotationReport("residual", width, rotation.kind, seed, untied)


def rotate(model: nn.Module, adapter: Adapter, where: str, seed: int = 0) -> RotationReport:
    """``rotate_inputs`` or ``rotate_residual``, by name (each checks the model before changing it)."""
    check_rotatable(adapter, where)  # an unknown name, before dispatching on it
    return (rotate_inputs if where == "inputs" else rotate_residual)(model, adapter, seed)
