"""One calibration optimisation step, eager or replayed from a CUDA graph.

A decoder block of a small model is a few hundred tiny kernels per step: on a GPU the step is bound by Python and
kernel launches, not by arithmetic (the eager step of SmolLM2-135M takes ~30 ms on an H100 for ~1 ms of maths).
Capturing forward, backward and the AdamW update in one CUDA graph removes both. The graph reads its inputs from
static buffers, so a step is: copy the batch in, replay. Parameters and optimiser state are updated in place, so
rolling a block back (``load_state_dict``) or repairing a matrix between steps is seen by the next replay.
The warm-up steps the capture needs are undone (parameters restored, optimiser state zeroed), so a graphed run
follows the same trajectory as an eager one.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)
WARMUP_STEPS = 2


class GraphPool:
    """One CUDA-graph memory pool for all of a run's successive graphs (one per block).

    A fresh pool per graph is cached by the allocator after its graph dies: three SmolLM2 runs in threads held
    79 GiB of such pools by block 25 while their live tensors took 4.4 GiB. A pool only lives while a graph uses
    it (re-using the handle of a dead one trips an allocator assert), so the last graph is kept until the next
    capture has joined its pool."""

    def __init__(self) -> None:
        self._last: torch.cuda.CUDAGraph | None = None

    def handle(self):
        return None if self._last is None else self._last.pool()

    def keep(self, graph: torch.cuda.CUDAGraph) -> None:
        self._last = graph

    def forget(self) -> None:
        """After a failed capture: the allocator may still route that pool to the dead capture (torch <= 2.13 ends
        the stream capture before the pool's allocation), so the next graph starts a fresh pool."""
        self._last = None


class CalibStep:
    """``step(x, target, aug)`` runs forward, loss, backward and one AdamW update; losses accumulate in ``total``."""

    def __init__(self, params: dict[str, list[torch.nn.Parameter]], lrs: dict[str, float],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
                 weight_decay: float, device: torch.device, graph: bool,
                 capture_stream: torch.cuda.Stream | None = None, graph_pool: GraphPool | None = None) -> None:
        self.params = [p for ps in params.values() for p in ps]
        self.graph_wanted = graph and device.type == "cuda"
        self.optimiser = torch.optim.AdamW([{"params": p, "lr": lrs[k]} for k, p in params.items() if p],
                                           weight_decay=weight_decay, capturable=self.graph_wanted)
        self.loss_fn = loss_fn
        self.total = torch.zeros((), device=device)
        self.steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, ...] | None = None
        self._failed = False
        self._stream = capture_stream  # warm-up and capture run here; the engine reuses one per run
        self._pool = graph_pool  # the run's one memory pool (see GraphPool); None: a pool of this graph's own

    @property
    def graphed(self) -> bool:
        """Whether steps replay a captured graph (False before the first step and after a failed capture)."""
        return self._graph is not None

    def reset_total(self) -> None:
        self.total.zero_()
        self.steps = 0

    def _eager(self, x, target, aug) -> None:
        self.optimiser.zero_grad(set_to_none=False)
        loss = self.loss_fn(x, target, aug)
        loss.backward()
        self.optimiser.step()
        self.total += loss.detach()

    def __call__(self, x: torch.Tensor, target: torch.Tensor, aug: torch.Tensor | None) -> None:
        self.steps += 1
        if self.graph_wanted and not self._failed:
            if self._graph is None:
                self._capture(x, target, aug)
            if self._graph is not None and x.shape == self._static[0].shape:
                for buf, value in zip(self._static, (x, target, aug)):
                    if value is not None:
                        buf.copy_(value)
                self._graph.replay()
                return
        self._eager(x, target, aug)

    def _capture(self, x, target, aug) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), undo the warm-up, capture one step."""
        snapshot = [p.detach().clone() for p in self.params]
        self._static = tuple(v.clone() if v is not None else None for v in (x, target, aug))
        sx, st, sa = self._static
        try:
            side = self._side_stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.optimiser.zero_grad(set_to_none=True)
                    self.loss_fn(sx, st, sa).backward()
                    self.optimiser.step()
            torch.cuda.current_stream().wait_stream(side)
            self._undo_warmup(snapshot)
            graph = torch.cuda.CUDAGraph()
            self.optimiser.zero_grad(set_to_none=True)
            self._record(graph, sx, st, sa)
            self._graph = graph
            if self._pool is not None:
                self._pool.keep(graph)
        except RuntimeError as err:  # an op that cannot be captured: run eagerly, slower but the same maths
            log.warning("CUDA graph capture failed (%s); calibrating eagerly", str(err).splitlines()[0])
            torch.cuda.current_stream().synchronize()
            self._failed, self._graph = True, None
            if self._pool is not None:
                self._pool.forget()
            self._undo_warmup(snapshot)
            self.optimiser.zero_grad(set_to_none=True)

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _record(self, graph: torch.cuda.CUDAGraph, sx, st, sa) -> None:
        """Capture one step on a stream of our own, without the device-wide synchronisation ``torch.cuda.graph``
        does: other threads may be calibrating other configs meanwhile, and a device sync (or a shared capture
        stream) would collide with their captures. ``thread_local`` lets those threads allocate meanwhile."""
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=None if self._pool is None else self._pool.handle(),
                                capture_error_mode="thread_local")
            try:
                loss = self.loss_fn(sx, st, sa)
                loss.backward()
                self.optimiser.step()
                self.total += loss.detach()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    @torch.no_grad()
    def _undo_warmup(self, snapshot: list[torch.Tensor]) -> None:
        for p, saved in zip(self.params, snapshot):
            p.copy_(saved)
        for state in self.optimiser.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
        self.total.zero_()
