"""Block-by-block calibration: the one straight path every calibrating method takes.

capture block-0 inputs → for each block: full-precision targets → initialise the method's transforms → optimise
MSE(quantized block, targets) → merge into the weights → round them (to nearest on the learnt grid, or by GPTQ on
the same grid: ``lowbit.ptq.rounding``) → quantized outputs feed the next block → save the block (resume). Blocks
not being calibrated stay on the CPU. One host sync per epoch (the loss check), none per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.config import QuantConfig
from lowbit.models.loading import LoadedModel
from lowbit.ptq.block import BlockCalibration, TransformPlan
from lowbit.ptq.capture import capture_block_inputs
from lowbit.ptq.checkpoint import BlockCheckpoints
from lowbit.ptq.recipes import gptq_options
from lowbit.ptq.rounding import gptq_block
from lowbit.ptq.step import CalibStep, GraphPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibOptions:
    """How to optimise (the method's *what* is its ``TransformPlan``)."""

    epochs: int = 20
    batch_size: int = 1
    let_lr: float = 5e-3
    lwc_lr: float = 1e-2
    weight_lr: float = 0.0  # the weight offsets' (plan.weights); 0 with a plan that trains them is refused
    weight_decay: float = 0.0
    aug_loss: bool = False
    device: str = "cpu"
    amp: bool = False  # bf16 autocast for the block's matmuls on CUDA; off: SmolLM2's 26,000-sized activations
    cuda_graph: bool = True  # replay each step from a CUDA graph on GPUs (see ptq/step.py)
    # float32 matmuls on TF32 tensor cores while calibrating (True) or in full float32 (False), restored afterwards;
    # None leaves the process-wide setting alone (runs in threads: the caller sets it once for all of them)
    tf32: bool | None = True
    max_retries: int = 3
    checkpoint_dir: str | None = None
    progress: bool = True


@dataclass
class BlockLog:
    block: int
    loss_before: float
    loss_after: float
    epoch_losses: list[float] = field(default_factory=list)
    dominance_margin: float | None = None
    retries: int = 0
    repaired_rows: int = 0
    online_ops: list[str] = field(default_factory=list)
    seconds: float = 0.0
    gptq: dict[str, dict[str, float]] = field(default_factory=dict)  # per linear: output error of RTN and GPTQ
    # CUDA memory of the process when the block ends (all runs, if several share it), in live tensors and held by
    # the caching allocator: growth block after block is a leak (per-block CUDA-graph pools once filled an H100)
    gpu_allocated_gib: float | None = None
    gpu_reserved_gib: float | None = None
    cuda_graph: bool | None = None  # steps replayed from a CUDA graph; False: capture failed, eager (several x slower)


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The calibration objective (a module-level function so tests can inject a non-finite loss)."""
    return F.mse_loss(out.float(), target.float())


def _to(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    return obj


@torch.no_grad()
def _run(fn, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    outs = [fn(inputs[i : i + batch]) for i in range(0, inputs.shape[0], batch)]
    return torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])


@torch.no_grad()
def _mse(calib: BlockCalibration, inputs, targets, kwargs, batch) -> float:
    total = torch.zeros((), device=inputs.device)
    for i in range(0, inputs.shape[0], batch):
        total += block_loss(calib(inputs[i : i + batch], kwargs), targets[i : i + batch]) * inputs[i : i + batch].shape[0]
    return float(total) / inputs.shape[0]


def _optimise(calib: BlockCalibration, q_in, targets, aug_targets, kwargs, opts: CalibOptions, seed: int, entry: BlockLog,
              bar, capture_stream: torch.cuda.Stream | None = None, graph_pool: GraphPool | None = None):
    groups = calib.learnable()
    if not any(groups.values()) or opts.epochs == 0:
        return
    lrs = {"let": opts.let_lr, "lwc": opts.lwc_lr, "weights": opts.weight_lr}
    generator = torch.Generator().manual_seed(seed)
    n, batch = q_in.shape[0], opts.batch_size
    amp = opts.amp and q_in.device.type == "cuda"

    def loss_fn(x, target, aug):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = calib(x, kwargs)
        loss = block_loss(out, target)
        return loss if aug is None else loss + block_loss(out, aug)

    def new_step() -> CalibStep:  # one optimiser per block, as the reference; a new one only on a retry
        return CalibStep(groups, lrs, loss_fn, opts.weight_decay, q_in.device, graph=opts.cuda_graph,
                         capture_stream=capture_stream, graph_pool=graph_pool)

    step, epoch, retries = new_step(), 0, 0
    while epoch < opts.epochs:
        calib.set_epoch(epoch, opts.epochs)
        good = {k: v.detach().clone() for k, v in calib.state_dict().items()}
        step.reset_total()
        for idx in torch.randperm(n, generator=generator).split(batch):
            idx = idx.to(q_in.device)
            step(q_in[idx], targets[idx], None if aug_targets is None else aug_targets[idx])
        mean = float(step.total) / step.steps  # the one host sync of the epoch
        if not math.isfinite(mean):
            calib.load_state_dict(good)
            retries += 1
            if retries > opts.max_retries:
                log.warning("block %d: loss still non-finite after %d retries; keeping the last good parameters",
                            entry.block, opts.max_retries)
                break
            lrs = {k: v / 2 for k, v in lrs.items()}
            log.warning("block %d epoch %d: non-finite loss; rolled back and retrying with learning rates %s",
                        entry.block, epoch, lrs)
            step = new_step()
            continue
        repaired = sum(t.restore_dominance() for t in calib.transforms.values())
        if repaired:
            log.warning("block %d epoch %d: %d matrix rows lost diagonal dominance; shrunk their off-diagonals",
                        entry.block, epoch, repaired)
            entry.repaired_rows += repaired
        entry.epoch_losses.append(mean)
        bar.set_postfix(block=entry.block, epoch=epoch, loss=f"{mean:.3g}")
        epoch += 1
    entry.retries = retries
    entry.cuda_graph = step.graphed if step.graph_wanted else None


def calibrate(loaded: LoadedModel, config: QuantConfig, plan: TransformPlan, opts: CalibOptions,
              windows: torch.Tensor) -> list[BlockLog]:
    """Quantize ``loaded.model`` in place, block by block; returns the per-block log."""
    with matmul_precision(opts.tf32):
        return _calibrate(loaded, config, plan, opts, windows)


@contextmanager
def matmul_precision(tf32: bool | None) -> Iterator[None]:
    """TF32 (True) or full float32 (False) matmuls inside, the process-wide setting restored after; None leaves it
    alone (threads calibrating at once set it once for all of them)."""
    if tf32 is None:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _calibrate(loaded: LoadedModel, config: QuantConfig, plan: TransformPlan, opts: CalibOptions,
               windows: torch.Tensor) -> list[BlockLog]:
    model, adapter = loaded.model, loaded.adapter
    if plan.mlp_scales:
        for pair in adapter.pairs:
            if pair.elementwise:
                pair.check(model.config)
    if plan.weights != (opts.weight_lr > 0):
        raise ValueError(f"a plan that trains the weights needs a positive weight_lr and one that does not needs 0; "
                         f"got plan.weights={plan.weights} with weight_lr={opts.weight_lr}")
    device = torch.device(opts.device)
    model_dtype = next(model.parameters()).dtype
    model.to("cpu")
    heads = adapter.heads(model.config)
    blocks = adapter.blocks(model)
    # the config as the recipe resolved it: let_lr's value (a default, None, resolves to what older runs wrote),
    # the scales' start only through the plan, and MLP scales as True when the plan has them (what runs that asked
    # for them wrote), so the options spelled out resume a run that took them by default and the reverse
    # (end-to-end tuning runs after the blocks, so the blocks of a run with and without it are the same)
    resolved = {k: v for k, v in config.to_dict().items() if k not in ("scale_init", "mlp_scales", "e2e_epochs", "e2e_lr")}
    if plan.mlp_scales:  # as runs that asked for them before they were a default wrote it
        resolved["mlp_scales"] = True
    if config.norm_matrices is None:  # likewise: runs from before its default wrote the bool
        resolved["norm_matrices"] = plan.norm_matrices
    resolved.pop("weight_lr", None)  # likewise: runs that asked for the rate wrote it, runs without it wrote nothing
    if opts.weight_lr:
        resolved["weight_lr"] = opts.weight_lr
    manifest = {"config": {**resolved, "let_lr": opts.let_lr}, "plan": plan.to_dict(), "options": {
        k: v for k, v in asdict(opts).items() if k not in ("checkpoint_dir", "progress", "device", "cuda_graph", "tf32")
        and not (k == "weight_lr" and v == 0)}}  # a later option: the manifests of runs from before it still match
    ckpt = BlockCheckpoints(opts.checkpoint_dir, manifest)
    fp_in, kwargs = capture_block_inputs(model, adapter, windows, device)
    kwargs = _to(kwargs, device, torch.float32)
    q_in = fp_in.clone()
    batch = opts.batch_size
    # One capture stream for the whole run: the caching allocator keeps freed memory per stream, so a new stream
    # per block would strand each block's graph memory (30+ GiB by block 20 with four runs sharing a GPU).
    capture_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    graph_pool = GraphPool() if device.type == "cuda" else None  # likewise one memory pool for all its graphs
    gptq = gptq_options(config)
    logs: list[BlockLog] = []
    bar = tqdm(range(len(blocks)), desc=f"{config.label} {config.name}", unit="block", disable=not opts.progress)
    for b in bar:
        start = time.perf_counter()
        block = blocks[b].to(device, torch.float32)
        fp_out = _run(lambda x: block(x, **kwargs), fp_in, batch)
        calib = BlockCalibration(block, adapter, heads, plan, config.weight_spec, config.act_spec)
        saved = ckpt.load(b)
        if saved is not None:
            entry = ckpt.restore(b, calib, saved)
        else:
            aug = _run(lambda x: block(x, **kwargs), q_in, batch) if opts.aug_loss else None
            calib.init_transforms(fp_in, kwargs, batch)
            entry = BlockLog(b, _mse(calib, q_in, fp_out, kwargs, batch), float("nan"))
            _optimise(calib, q_in, fp_out, aug, kwargs, opts, seed=config.seed * 1000 + b, entry=entry, bar=bar,
                      capture_stream=capture_stream, graph_pool=graph_pool)
            entry.dominance_margin = calib.dominance_margin()
            entry.online_ops = calib.merge(bake=gptq is None)
            if gptq is not None:  # final rounding after the transforms are fixed: no host syncs to worry about
                bar.set_postfix(block=b, stage="gptq")
                entry.gptq = gptq_block(block, calib.linears, adapter, q_in, kwargs, batch, gptq)
        q_out = _run(lambda x: block(x, **kwargs), q_in, batch)
        entry.loss_after = float(block_loss(q_out, fp_out))
        if saved is None:  # a restored block keeps the time it took when it was calibrated
            entry.seconds = time.perf_counter() - start
            if device.type == "cuda":
                entry.gpu_allocated_gib = round(torch.cuda.memory_allocated(device) / 2**30, 4)
                entry.gpu_reserved_gib = round(torch.cuda.memory_reserved(device) / 2**30, 4)
            ckpt.save(b, block, entry)
        logs.append(entry)
        bar.set_postfix(block=b, before=f"{entry.loss_before:.3g}", after=f"{entry.loss_after:.3g}")
        blocks[b] = block.to("cpu", model_dtype)
        fp_in, q_in = fp_out, q_out
        del calib
    bar.close()
    model.to("cpu")  # everything back in one place; the caller moves it where it evaluates
    return logs


def write_log(logs: list[BlockLog], directory: Path) -> None:
    """``calibration_log.json`` and ``calibration_loss.png`` (loss per block, before and after)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "calibration_log.json").write_text(json.dumps([asdict(entry) for entry in logs], indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = [e.block for e in logs]
    ax.semilogy(xs, [e.loss_before for e in logs], "o-", label="before (initial transforms)")
    ax.semilogy(xs, [e.loss_after for e in logs], "o-", label="after calibration")
    ax.set_xlabel("block")
    ax.set_ylabel("MSE vs full precision")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "calibration_loss.png", dpi=110)
    plt.close(fig)
