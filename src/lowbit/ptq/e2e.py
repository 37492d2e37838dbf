"""End-to-end tuning of the weight scales after block-wise calibration (EfficientQAT's E2E-QP, as a distillation).

Block-wise calibration fits each block to its full-precision output in isolation, so errors that only show through
the blocks that follow stay. This step trains one gain per weight scale (per channel, or per group) of every block
linear against the whole model's output, the full-precision model's next-token distribution (KL divergence), on the
calibration windows. The integer codes and zero points stay fixed: a weight ``(q - z) * s`` becomes
``(q - z) * s * gain``, which is still exactly on a grid (scale ``s * gain``), so saving, packing and export read it
like any other quantized weight. Weight-only: activation quantizers would need their own treatment.

It holds the teacher and the student on the device together and back-propagates through the whole model, so it
needs about three times the model's float32 size plus one window's activations and logits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lowbit.errors import LowbitError
from lowbit.export.codes import extract_codes
from lowbit.quant.quantizer import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EOptions:
    epochs: int = 1
    lr: float = 3e-3  # of the gains, which start at 1: a relative step of the scales
    batch_size: int = 1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class E2ELog:
    epoch_losses: list[float] = field(default_factory=list)  # mean KL per token over each epoch
    loss_before: float = float("nan")  # mean KL per token over the windows before any step
    seconds: float = 0.0
    gains: int = 0  # how many scales learnt

    def to_dict(self) -> dict:
        return {"epoch_losses": self.epoch_losses, "loss_before": self.loss_before, "seconds": self.seconds,
                "gains": self.gains}


class _GridWeight:
    """A baked weight as centred codes ``q - z`` times its scales; ``weight(gain)`` rebuilds it."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, name: str) -> None:
        codes = extract_codes(weight, spec, name=name)
        n, k = codes.codes.shape
        self.shape = (n, k)
        self.centred = (codes.codes.float() - codes.zeros.repeat_interleave(codes.group_size, dim=1)).reshape(
            n, k // codes.group_size, codes.group_size)
        self.scales = codes.scales.float()

    def weight(self, gain: torch.Tensor) -> torch.Tensor:
        return (self.centred * (self.scales * gain).unsqueeze(-1)).reshape(self.shape)

    def to(self, device) -> _GridWeight:
        self.centred, self.scales = self.centred.to(device), self.scales.to(device)
        return self


def _kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def tune_scales(model: nn.Module, teacher: nn.Module, adapter, spec: QuantSpec, windows: torch.Tensor,
                opts: E2EOptions) -> E2ELog:
    """Train the scale gains of ``model``'s block linears (weights already baked onto ``spec``'s grid) so that its
    logits on ``windows`` (nsamples, seqlen) match ``teacher``'s, then write the tuned weights back in place. Both
    models run in float32 on ``opts.device``; the model goes back to its dtype, the teacher to the CPU."""
    if opts.epochs < 1 or not opts.lr > 0:
        raise LowbitError(f"end-to-end tuning needs at least 1 epoch and a positive rate, got {opts.epochs} and {opts.lr}")
    start = time.perf_counter()
    names = {id(p): n for n, p in model.named_parameters()}
    grids: dict[str, tuple[nn.Module, _GridWeight]] = {}
    for b, block in enumerate(adapter.blocks(model)):
        for name, lin in adapter.block_linears(block).items():
            grids[names[id(lin.weight)]] = (lin, _GridWeight(lin.weight.detach(), spec, f"layer {b} {name}"))
    device = torch.device(opts.device)
    dtype = next(model.parameters()).dtype  # float32 inside: a float16 scale cannot take the small relative steps
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in trainable:
            p.requires_grad_(False)
        model.to(device, torch.float32).eval()  # no dropout: compared with a deterministic teacher
        teacher.to(device, torch.float32).eval()
        for _, grid in grids.values():
            grid.to(device)
        gains = {n: torch.ones_like(g.scales, requires_grad=True) for n, (_, g) in grids.items()}
        out = E2ELog(gains=sum(g.numel() for g in gains.values()))
        _train(model, teacher, {n: g for n, (_, g) in grids.items()}, gains, windows, opts, out)
        with torch.no_grad():
            for n, gain in gains.items():
                lin, grid = grids[n]
                lin.weight.copy_(grid.weight(gain))
    finally:
        for p, was in trainable:
            p.requires_grad_(was)
        teacher.to("cpu")
        model.to(dtype)
    out.seconds = time.perf_counter() - start
    log.info("end-to-end scales: KL %.5f -> %s in %.1f s", out.loss_before, out.epoch_losses, out.seconds)
    return out


def _train(model: nn.Module, teacher: nn.Module, grids: dict[str, _GridWeight], gains: dict[str, torch.Tensor],
           windows: torch.Tensor, opts: E2EOptions, out: E2ELog) -> None:
    """AdamW on the gains over ``opts.epochs`` seeded passes of ``windows``; fills ``out``'s losses."""
    from tqdm.auto import tqdm

    device = torch.device(opts.device)
    optim = torch.optim.AdamW(list(gains.values()), lr=opts.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(opts.seed)

    def loss_on(ids: torch.Tensor) -> torch.Tensor:
        weights = {n: grids[n].weight(gain) for n, gain in gains.items()}
        with torch.no_grad():
            target = teacher(ids, use_cache=False).logits
        return _kl_per_token(functional_call(model, weights, (ids,), {"use_cache": False}).logits, target)

    with torch.no_grad():
        out.loss_before = sum(loss_on(w.unsqueeze(0).to(device)).item() for w in windows) / len(windows)
    steps = (len(windows) + opts.batch_size - 1) // opts.batch_size
    bar = tqdm(total=opts.epochs * steps, desc="end-to-end scales", disable=not opts.progress, leave=False)
    for _ in range(opts.epochs):
        order = torch.randperm(len(windows), generator=gen)
        total = torch.zeros((), device=device)
        for i in range(steps):
            loss = loss_on(windows[order[i * opts.batch_size:(i + 1) * opts.batch_size]].to(device))
            if not torch.isfinite(loss):
                raise LowbitError("end-to-end tuning reached a non-finite loss; lower --e2e-lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            with torch.no_grad():
                for gain in gains.values():
                    gain.clamp_(min=1e-2)  # a scale must stay positive: the codes' signs are fixed
            total += loss.detach()
            bar.update(1)
            bar.set_postfix(kl=f"{loss.item():.4f}")
        out.epoch_losses.append(total.item() / steps)
    bar.close()
