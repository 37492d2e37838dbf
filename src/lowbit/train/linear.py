"""``QuantTrainLinear``: an ``nn.Linear`` whose forward, grad-input and grad-weight matmuls take integer operands.

Forward (HQ): rotate input and weight along the reduction dimension with the block Hadamard, quantize both to
INT-b with LSQ steps, one integer product, scale (``hq.py``). Backward: the output gradient quantized
(bit-split INT4 + leverage-score sampling, or INT8, or exact float for ablations; ``backward.py``), two
integer products with the forward's own integer operands, then LSQ's straight-through rule and the inverse
rotation. All three products go through ``dispatch.int_matmul``.

The master weight stays in its dtype (fp32 normally); the bias is added and its gradient summed in float.
Under autocast the layer computes in float32 internally (integers are exact there) and returns the autocast
dtype, like ``F.linear`` would. First-batch statistics (LSQ step init, the auto block) are averaged over a
``torch.distributed`` group when one is up, so DDP ranks stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.hadamard import random_signs
from lowbit.train import backward as bwd
from lowbit.train.config import TrainQuantConfig
from lowbit.kernels.int_gemm import operand_dtype
from lowbit.train.dispatch import int_matmul, int_matmul_scaled
from lowbit.train.hq import Quantized, Rotation, forward_error, initial_step, lsq_backward, rotate_quantize


def layer_seed(seed: int, index: int) -> int:
    """A distinct, reproducible 63-bit seed per (config seed, layer index)."""
    return (int(seed) * 1_000_003 + int(index) * 7919 + 12345) % (2**63 - 1)


def _sync_mean(t: torch.Tensor, enabled: bool) -> torch.Tensor:
    import torch.distributed as dist

    if enabled and dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


@dataclass
class _LayerState:
    """What the autograd Function needs besides tensors (passed by reference; not a graph input)."""

    config: TrainQuantConfig
    rotation: Rotation
    generators: dict = field(default_factory=dict)
    seed: int = 0
    act_numel: float | None = None  # element count fixing the activation step's LSQ gradient scale

    def generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must be one generator
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[key]


def _one_byte(q: torch.Tensor) -> torch.Tensor:
    """Integer operands are kept in one byte: int8, or the float8 the fused quantizer wrote for the GEMM."""
    return q if q.element_size() == 1 else q.to(torch.int8)


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act_step, weight_step, state: _LayerState):
        cfg, rot = state.config, state.rotation
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type=device_type, enabled=False):
            operand = operand_dtype(x.device, cfg.bits)  # what the GEMM reads; fused kernels write it directly
            qx = rotate_quantize(x, rot, act_step, cfg.bits, operand)
            qw = rotate_quantize(weight, rot, weight_step, cfg.bits, operand)
            if qx.step.dim() == 0 and qw.step.dim() == 0:  # one scale: applied in the GEMM's epilogue, which also
                # rounds to the output dtype when no bias follows (no float32 copy written and converted after)
                fused = bias is None and out_dtype in (torch.bfloat16, torch.float16)
                y = int_matmul_scaled(qx.q, qw.q, qx.step * qw.step, bits_a=cfg.bits, bits_b=cfg.bits,
                                      out_dtype=out_dtype if fused else torch.float32)
            else:
                acc = int_matmul(qx.q, qw.q, bits_a=cfg.bits, bits_b=cfg.bits).float()
                y = acc * qx.step * qw.step.reshape(1, -1) if qw.step.dim() else acc * (qx.step * qw.step)
            if bias is not None:
                y = y + bias.float()
        ctx.state = state
        ctx.step_shapes = (None if act_step is None else act_step.shape, weight_step.shape)
        ctx.meta = (x.dtype, weight.dtype, bias is not None, act_step is not None)
        # Integer operands kept as int8 (what a kernel would keep); v = x/step only where an LSQ step is learned.
        ctx.save_for_backward(_one_byte(qx.q), qx.step, qx.v if qx.v is not None else torch.empty(0),
                              _one_byte(qw.q), qw.step, qw.v)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        state: _LayerState = ctx.state
        cfg, rot = state.config, state.rotation
        x_dtype, w_dtype, has_bias, has_act_step = ctx.meta
        qx_q, qx_step, qx_v, qw_q, qw_step, qw_v = ctx.saved_tensors
        qx = Quantized(qx_q, qx_step, qx_v if has_act_step else None)
        qw = Quantized(qw_q, qw_step, qw_v)
        need_sx = ctx.needs_input_grad[3]
        need_x = ctx.needs_input_grad[0] or need_sx  # the step's gradient needs the input-side estimate
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[4]
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            # grad_y as it comes (bf16 under autocast): the fused bit split reads it without a float32 copy
            gxh, gwh = _grads_hadamard_domain(grad_y, qx, qw, cfg, state.generator(grad_y.device), need_x, need_w)
            grad_x = grad_sx = grad_w = grad_sw = None
            if gxh is not None:
                grad_x, grad_sx = _lsq_inverse(gxh, qx, rot, cfg, state.act_numel, x_dtype)
                grad_x = grad_x.to(x_dtype)
            if gwh is not None:
                grad_w, grad_sw = _lsq_inverse(gwh, qw, rot, cfg, out_dtype=w_dtype)
                grad_w = grad_w.to(w_dtype)
                grad_sw = grad_sw.reshape(ctx.step_shapes[1])
            grad_b = grad_y.float().sum(0) if has_bias and ctx.needs_input_grad[2] else None
        grad_sx = grad_sx.reshape(ctx.step_shapes[0]) if grad_sx is not None and need_sx else None
        return grad_x, grad_w, grad_b, grad_sx, grad_sw, None


def _lsq_inverse(grad: torch.Tensor, op: Quantized, rot: Rotation, cfg: TrainQuantConfig, numel: float | None = None,
                 out_dtype: torch.dtype = torch.float32):
    """``lsq_backward`` then ``rot.inverse`` on the input gradient: one fused pass on the Triton backend writing
    ``out_dtype`` (``lowbit.kernels.lsq_inverse``), else the two reference steps (float32)."""
    if op.v is not None and rot.fused(grad) and op.v.dtype == torch.float32 and op.v.shape == grad.shape:
        from lowbit.kernels.lsq_inverse import OUT_DTYPES, lsq_backward_inverse

        return lsq_backward_inverse(grad, op.v, op.step, rot.block, rot.signs, rot.pad, cfg.qmin, cfg.qmax, numel,
                                    out_dtype if out_dtype in OUT_DTYPES else torch.float32)
    g, grad_step = lsq_backward(grad, op, cfg.qmin, cfg.qmax, numel)
    return rot.inverse(g), grad_step


def _int_operand(q: torch.Tensor) -> torch.Tensor:
    """The saved forward operand for the backward's GEMMs: float32 on the reference path, int8 or the forward's
    float8 on kernel paths (the backward's kernels read float8 and convert in registers)."""
    return q if q.dtype in (torch.float32, torch.int8, torch.float8_e4m3fn) else q.to(torch.int8)


def _grads_hadamard_domain(g, qx: Quantized, qw: Quantized, cfg: TrainQuantConfig, gen, need_x: bool, need_w: bool):
    """Estimates of ``G (sw qw)`` and ``G^T (sx qx)`` (Hadamard domain) with the configured backward."""
    sx, sw = qx.step, qw.step  # sx: 0-dim or (N, 1); sw: 0-dim or (C, 1)
    shared = sx.dim() == 0 and sw.dim() == 0
    if not (shared and cfg.backward == "int4"):  # only the int4 backward's shared split reads g in its own dtype
        g = g.float()
    if cfg.backward == "float":
        gx = g @ (qw.q.float() * sw) if need_x else None
        gw = g.T @ (qx.q.float() * sx) if need_w else None
        return gx, gw
    # Per-column weight steps lie along grad-input's reduction, per-token steps along grad-weight's: fold them in.
    g_in = g if shared else g * sw.reshape(1, -1)
    g_w = None if shared else g * sx
    epi_in, epi_w = (sw, sx) if shared else (1.0, 1.0)
    if cfg.backward == "int8":
        gx, gw = bwd.int8_grads(g_in, g_w, qx.q.float(), qw.q.float(), gen, cfg.bits, need_x, need_w)
        return (gx * epi_in if gx is not None else None), (gw * epi_w if gw is not None else None)
    if cfg.bits > 4:
        raise LowbitError(f"the int4 backward needs 4-bit forward operands, got bits={cfg.bits}; use backward='int8'")
    xq, wq = _int_operand(qx.q), _int_operand(qw.q)
    rows_in, weight_in, sq_in = bwd.split_rows_with_norms(g_in, gen)
    rows_w, weight_w, sq_w = (rows_in, weight_in, sq_in) if shared else bwd.split_rows_with_norms(g_w, gen)
    ratio = cfg.sampling_ratio
    # a shared step multiplies the results, not the rows' weights: LSQ steps may turn negative, and the sampling
    # scores (weights times norms) are clipped at zero
    gx = bwd.int4_grad_input(rows_in, weight_in, wq, ratio, gen, cfg.bits, sq_in) * epi_in if need_x else None
    gw = bwd.int4_grad_weight(rows_w, weight_w, xq, ratio, gen, cfg.bits, sq_w) * epi_w if need_w else None
    return gx, gw


class QuantTrainLinear(nn.Module):
    """Drop-in for ``nn.Linear`` in training: shares the wrapped layer's weight and bias Parameters.

    Learnable LSQ steps ``act_step`` (per tensor, absent for per-token activations) and ``weight_step`` (per
    tensor or per output channel) are initialised on the first batch, as is the block size when ``"auto"``;
    the first batch's element count also fixes the activation step's LSQ gradient scale (``hq.lsq_backward``).
    """

    def __init__(self, linear: nn.Linear, config: TrainQuantConfig, index: int = 0, name: str = "linear") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.config, self.name, self.index = config, name, index
        self._candidates, self._pad = _block_plan(config, self.in_features, name)
        width = self.in_features + self._pad
        block = self._candidates[0] if len(self._candidates) == 1 else 0
        self._block = block  # python mirror of the ``block`` buffer (no device sync per forward)
        self.register_buffer("block", torch.tensor(block, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("act_numel", torch.tensor(0.0, dtype=torch.float64))  # first batch's element count
        self._initialized = False  # python mirrors: no device sync, no torch.compile graph break per forward
        if config.hadamard and config.random_signs:
            self.register_buffer("signs", random_signs(width, layer_seed(config.seed, index) + 1, linear.weight.device))
        else:
            self.signs = None
        dev = linear.weight.device
        # one-element, not 0-dim: FSDP2 (fully_shard) refuses scalar parameters
        self.act_step = nn.Parameter(torch.ones(1, device=dev)) if config.act_granularity == "tensor" else None
        w_shape = (self.out_features,) if config.weight_granularity == "channel" else (1,)
        self.weight_step = nn.Parameter(torch.ones(w_shape, device=dev))
        self._state = _LayerState(config, self._rotation(), seed=layer_seed(config.seed, index))

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The layer's own generator on ``device`` (the backward's sampling and rounding draw from it); a CUDA graph
        that captures the layer registers it (``lowbit.train.graphs``)."""
        return self._state.generator(torch.device(device))

    def _rotation(self) -> Rotation:
        block = self._block if self.config.hadamard else 0
        return Rotation(block, self._pad, self.signs)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """First-batch statistics: the auto block (least forward error) and the LSQ steps (``config.step_init``)."""
        cfg = self.config
        x = x.detach().reshape(-1, self.in_features).float()
        sample = x[:: max(1, x.shape[0] // 512)]
        if cfg.hadamard and len(self._candidates) > 1:
            errs = torch.stack([
                forward_error(sample, self.weight, Rotation(b, self._pad, self.signs), cfg.bits, cfg.act_granularity == "token")
                for b in self._candidates
            ])
            errs = _sync_mean(errs, cfg.sync_init)
            self.block.fill_(self._candidates[int(torch.argmin(errs))])
            self._block = int(self.block)
        rot = self._rotation()
        wh = rot.apply(self.weight.float())
        dim = -1 if cfg.weight_granularity == "channel" else None
        self.weight_step.copy_(initial_step(wh, cfg.qmin, cfg.qmax, cfg.step_init, dim))
        if self.act_step is not None:
            self.act_step.copy_(_sync_mean(initial_step(rot.apply(x), cfg.qmin, cfg.qmax, cfg.step_init), cfg.sync_init))
        self.act_numel.fill_(float(x.numel()))
        self._state.act_numel = float(x.numel())
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._block = int(self.block)
        self._initialized = bool(self.initialized)
        self._state.act_numel = float(self.act_numel) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise LowbitError(f"{self.name} expects inputs of width {self.in_features}, got {x.shape[-1]}")
        if not self._initialized:
            self.initialize(x)
        lead = x.shape[:-1]
        self._state.rotation = self._rotation()  # rebuilt each call: follows .to(device) of the signs buffer
        y = _QuantLinearFn.apply(x.reshape(-1, self.in_features), self.weight, self.bias,
                                 self.act_step, self.weight_step, self._state)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        block = self._block if c.hadamard else 0
        rot = f"hadamard block={block or 'auto'}" + (f" pad={self._pad}" if self._pad else "") if c.hadamard else "no hadamard"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={c.bits}, {rot}, "
                f"backward={c.backward}, sampling_ratio={c.sampling_ratio}")


def _block_plan(config: TrainQuantConfig, width: int, name: str) -> tuple[tuple[int, ...], int]:
    """Candidate blocks for a layer and the zero padding its width needs; refuses untileable widths unless pad."""
    if not config.hadamard:
        return (0,), 0
    wanted = config.auto_blocks if config.block_size == "auto" else (config.block_size,)
    fits = tuple(b for b in wanted if b <= width and width % b == 0)
    if fits:
        return fits, 0
    if not config.pad:
        tiles = [b for b in (8, 16, 32, 64, 128, 256) if b <= width and width % b == 0]
        hint = f"block_size in ({', '.join(map(str, tiles))})" if tiles else "another block_size"
        raise LowbitError(
            f"Hadamard block {config.block_size} cannot tile the input width {width} of {name}; "
            f"use {hint}, pad=True (zero-pads the reduction dimension, exact) or keep the layer in high precision"
        )
    block = min(wanted)
    return (block,), (-width) % block
