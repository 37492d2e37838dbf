"""One training step as one CUDA graph: forward, backward, gradient clipping and the optimizer in a single replay.

Why: a 4-bit layer launches a dozen small kernels forward and twice that backward, each from Python. On a ~350M
LLaMA the host needs longer to launch them than the GPU to run them (``benchmarks/train_kernels.py``: 450 ms per
step against 212 ms of kernels), so the 4-bit step is host-bound. A captured step launches everything at once.

    step = GraphedTrainStep(model, optimizer, lm_loss)   # make_capturable(optimizer) first if it is Adam(W)
    for batch in batches:
        loss = step(batch)        # eager for the first ``warmup_steps`` calls, then captured once and replayed
        scheduler.step()          # fine: make_capturable keeps the learning rates as device tensors

Every call is a real training step: the warm-up calls run eagerly (autotuning, LSQ initialisation and lazy
optimizer state happen there), the capturing call replays the graph it just recorded. What a replay cannot do:
change the input shape (a new shape is refused; build a new step), run Python control flow that depends on the
data, or sync with the host. The kernels of ``lowbit.train`` are sync-free; each ``QuantTrainLinear`` keeps its own
generator, which the graph registers so every replay draws new random numbers. Off CUDA, or with
``enabled=False``, the step runs eagerly every time: the same code runs on the CPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class GraphStepConfig:
    """``warmup_steps`` eager steps before the capture (at least 1: lazy state must exist before it);
    ``clip_norm`` the gradient-norm clip (None: none); ``autocast_dtype`` the autocast dtype (None: no autocast)."""

    warmup_steps: int = 3
    clip_norm: float | None = 1.0
    autocast_dtype: torch.dtype | None = torch.bfloat16
    enabled: bool = True
    # a non-finite loss raises (one host sync per step): an eager step before backward touches the weights, a
    # replayed one after its update (a replay cannot stop midway)
    check_finite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise LowbitError(f"warmup_steps must be an integer >= 1, got {self.warmup_steps!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise LowbitError(f"the gradient clip norm must be positive or None, got {self.clip_norm!r}")


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Let ``optimizer`` run inside a CUDA graph: ``capturable=True`` (its step counters live on the device) and
    each group's learning rate a device tensor, so a scheduler's updates (``fill_``) reach every replay instead of
    the float baked in at capture. Call it before the first step; optimizers without a ``capturable`` option
    (plain SGD has no step counter) are left as they are, and so is every optimizer off CUDA (nothing is captured
    there). A scheduler built before or after this call works either way."""
    if any(optimizer.state.values()):
        raise LowbitError("make_capturable needs a fresh optimizer: call it before the first optimizer.step()")
    if torch.device(device).type != "cuda" or not any("capturable" in group for group in optimizer.param_groups):
        return
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


def layer_generators(model: nn.Module, device: torch.device) -> list[torch.Generator]:
    """The per-layer generators of every ``QuantTrainLinear`` in ``model`` on ``device`` (created if new)."""
    from lowbit.train.linear import QuantTrainLinear

    return [m.generator(device) for m in model.modules() if isinstance(m, QuantTrainLinear)]


class GraphedTrainStep:
    """``step(*inputs)`` runs ``loss = loss_fn(model, *inputs)``, backward, clipping and ``optimizer.step()``, and
    returns the loss (a new tensor, detached). See the module docstring for what a captured step may not do."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 config: GraphStepConfig | None = None) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.config = config or GraphStepConfig()
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static_inputs: tuple[torch.Tensor, ...] = ()
        self._static_loss: torch.Tensor | None = None
        self._capture_error: LowbitError | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise LowbitError("GraphedTrainStep takes the step's input tensors, at least one")
        self.calls += 1
        if self.graph is not None:
            return self._replay(inputs)
        if self._capture_error is not None:  # do not record a failing capture again on every call
            raise self._capture_error
        use_graph = self.config.enabled and inputs[0].is_cuda
        if not use_graph or self.calls <= self.config.warmup_steps:
            return self._eager(inputs, side_stream=use_graph)
        return self._capture(inputs)

    # --------------------------------------------------------------------------------------------- the step
    def _step(self, inputs: tuple[torch.Tensor, ...], capturing: bool = False) -> torch.Tensor:
        dtype = self.config.autocast_dtype
        # captured: no autocast weight-cast cache, which would hold tensors from the capture into the replays
        autocast = (contextlib.nullcontext() if dtype is None
                    else torch.autocast(inputs[0].device.type, dtype=dtype, cache_enabled=not capturing))
        with autocast:
            loss = self.loss_fn(self.model, *inputs)
        if self.config.check_finite and not capturing:
            self._refuse_non_finite(loss.detach(), "before the optimizer step")
        loss.backward()
        if self.config.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        self.optimizer.step()
        return loss.detach()

    def _eager(self, inputs: tuple[torch.Tensor, ...], side_stream: bool) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if not side_stream:
            return self._step(inputs)
        # warm-up on a side stream, as CUDA graphs want: lazy allocations land outside the default stream's pool
        stream = torch.cuda.Stream(device=inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(stream):
            loss = self._step(inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
        return loss

    def _check_optimizer(self) -> None:
        """Refuse what a replay would silently get wrong: a capturable optimizer left uncapturable; warn about float
        learning rates, which the graph keeps at their value at capture."""
        groups = self.optimizer.param_groups
        if any(group.get("capturable") is False for group in groups):
            self._capture_error = LowbitError(
                f"{type(self.optimizer).__name__} is not capturable: call make_capturable(optimizer, device) right "
                "after building it, before the first step")
            raise self._capture_error
        if not all(isinstance(group["lr"], torch.Tensor) for group in groups):
            warnings.warn("the optimizer's learning rate is a Python float: the CUDA graph keeps its value at "
                          "capture, so a scheduler no longer changes it (make_capturable turns Adam/AdamW's into "
                          "tensors)", stacklevel=4)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self._check_optimizer()
        device = inputs[0].device
        self._static_inputs = tuple(t.detach().clone() for t in inputs)
        # gradients allocated inside the capture live in the graph's pool; each replay writes them afresh
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        generators = layer_generators(self.model, device)
        if generators and not hasattr(graph, "register_generator_state"):
            self._capture_error = LowbitError(
                f"torch {torch.__version__} cannot register the 4-bit layers' generators with a CUDA graph (a newer "
                "torch can); upgrade torch or run the steps eagerly (GraphStepConfig(enabled=False))")
            raise self._capture_error
        for gen in generators:
            graph.register_generator_state(gen)
        torch.cuda.synchronize(device)
        try:
            with torch.cuda.graph(graph):
                self._static_loss = self._step(self._static_inputs, capturing=True)
        except RuntimeError as err:
            self._capture_error = LowbitError(
                f"the training step could not be captured in a CUDA graph ({str(err).splitlines()[0]}); it must "
                "not sync with the host or branch on data. Run it eagerly (GraphStepConfig(enabled=False))")
            raise self._capture_error from err
        self.graph = graph
        return self._run_graph()  # capturing records the kernels without running them: this call's step runs now

    def _replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(inputs) != len(self._static_inputs):
            raise LowbitError(f"the captured step takes {len(self._static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self._static_inputs, inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise LowbitError(f"the captured step takes inputs of shape {tuple(static.shape)} and "
                                  f"{static.dtype}, got {tuple(new.shape)} and {new.dtype}; build a new "
                                  "GraphedTrainStep for another shape")
            static.copy_(new, non_blocking=True)
        return self._run_graph()

    def _run_graph(self) -> torch.Tensor:
        self.graph.replay()
        if self.config.check_finite:
            self._refuse_non_finite(self._static_loss, "after the replayed update")
        return self._static_loss.clone()

    def _refuse_non_finite(self, loss: torch.Tensor, when: str) -> None:
        if not torch.isfinite(loss).all():
            raise LowbitError(f"the loss became {float(loss)} at step {self.calls}, {when}; lower the learning rate "
                              "(--lr)")
