"""Inference speed of a quantized model against its fp16 twin, measured in one run on the same inputs.

Reported per model: prefill tokens/s, decode tokens/s at each batch size (1 and 16 by default), the bytes its
weights take and, on CUDA, the peak memory of the whole measurement. On a GPU each number is the median of several
timed repeats after warm-up, timed with CUDA events; on a CPU (tests, tiny models) with ``perf_counter``.

Decode at batch 1 is launch-bound in eager PyTorch: a 7B model issues hundreds of small kernels per token. So on
CUDA the decode step of *both* models runs from one captured CUDA graph over a static KV cache (the step feeds
its own greedy token back, so replaying it T times decodes T tokens with no host work). If capture fails for a
model, that model falls back to eager decoding over a dynamic cache and its row says so (``decode_mode``).

The models are converted in place between float and packed linears by ``lowbit.export.inplace`` (which also builds
the random-weight LLaMA-7B-shaped model of ``--random-llama7b``: speed does not depend on weight values).
"""

from __future__ import annotations

import gc
import inspect
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.inplace import pack_quantized, pack_rtn, random_llama, to_float_linears

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class BenchOptions:
    prompt_len: int = 512
    decode_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1, 16)
    warmup: int = 2
    repeats: int = 5
    cuda_graph: bool = True  # CUDA only: decode from a captured graph over a static cache
    compile: bool = False  # CUDA graph decode only: torch.compile the step first (fuses the small ops)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise LowbitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise LowbitError(f"--warmup must be 0 or more, got {self.warmup}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise LowbitError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")


@dataclass
class BenchResult:
    label: str
    weight_bytes: int
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_mode: dict[int, str] = field(default_factory=dict)
    peak_memory_bytes: int | None = None

    def rows(self, baseline: BenchResult | None = None) -> list[dict]:
        """One row per (metric, batch), with the ratio to ``baseline`` where one is given."""
        out = []
        for metric, values in (("prefill_tokens_per_s", self.prefill_tokens_per_s),
                               ("decode_tokens_per_s", self.decode_tokens_per_s)):
            for batch, value in values.items():
                ref = getattr(baseline, metric).get(batch) if baseline else None
                out.append({"model": self.label, "metric": metric, "batch": batch, "value": value,
                            "vs_fp16": value / ref if ref else None,
                            "decode_mode": self.decode_mode.get(batch) if metric.startswith("decode") else None})
        for metric, value in (("weight_bytes", self.weight_bytes), ("peak_memory_bytes", self.peak_memory_bytes)):
            ref = getattr(baseline, metric) if baseline else None
            out.append({"model": self.label, "metric": metric, "batch": None, "value": value,
                        "vs_fp16": value / ref if value is not None and ref else None, "decode_mode": None})
        return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed weights are buffers), shared tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Timer:
    """Wall time of a callable: CUDA events on a GPU (the work itself, not the launch), perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def _median(timer: Timer, fn: Callable[[], object], warmup: int, repeats: int,
            prepare: Callable[[], None] | None = None) -> float:
    """Median time of ``fn`` after ``warmup`` untimed calls; ``prepare`` runs untimed before every call."""
    times = []
    for i in range(warmup + repeats):
        if prepare is not None:
            prepare()
        seconds = timer(fn)
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times)


def _logits_kwargs(model: nn.Module) -> dict:
    """Ask for the last position's logits only, as generation does (the lm_head stays fp16 in both models)."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _cache_position_arg(model: nn.Module) -> bool:
    """Older transformers (< 5) index static caches by an explicit ``cache_position`` argument."""
    return "cache_position" in inspect.signature(model.forward).parameters


class GraphDecoder:
    """Greedy decode steps over a static KV cache, captured once in a CUDA graph and replayed per token.

    The graph reads the token buffer, runs the model with a 4-D additive mask built from a device-side position,
    writes the argmax back into the token buffer and advances the position, so replays need no host work.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, decode_tokens: int, capture: bool = True,
                 compile: bool = False, compile_backend: str = "inductor") -> None:
        from transformers import StaticCache

        from lowbit.export.compiled import prepare_for_compile

        batch, plen = prompt.shape
        self.model, self.plen, self.prompt = model, plen, prompt
        length = plen + decode_tokens + 1
        dtype = next(model.parameters()).dtype
        self.cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length,
                                 device=prompt.device, dtype=dtype)
        self.explicit_positions = _cache_position_arg(model)
        self.slots = torch.arange(length, device=prompt.device)
        self.neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=prompt.device)
        self.zero = torch.zeros((), dtype=dtype, device=prompt.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=prompt.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=prompt.device)
        self.graph = None
        self.prefill()  # eager; it also initialises the cache's tensors before any tracing
        self.run_step = self.step
        if compile:  # one graph for the whole step: packed matmuls are one opaque op (lowbit.export.compiled)
            prepare_for_compile(model, dtype)
            self.run_step = torch.compile(self.step, backend=compile_backend, dynamic=False, fullgraph=True)
        if capture:  # without it (CPU tests) ``decode`` runs the same step eagerly
            self._capture()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (compilation, allocator, Triton autotuning, cuBLAS)
                self.run_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run_step()
        torch.cuda.synchronize()
        self.rewind()

    def _mask(self, upto: torch.Tensor) -> torch.Tensor:
        visible = self.slots <= upto
        return torch.where(visible, self.zero, self.neg).view(1, 1, 1, -1).expand(self.token.shape[0], 1, 1, -1)

    def prefill(self) -> None:
        """Fill the cache with the prompt (eager) and reset the position to just after it."""
        self.cache.reset()
        batch, plen = self.prompt.shape
        positions = torch.arange(plen, device=self.prompt.device)
        mask = torch.where(self.slots[None, :] <= positions[:, None], self.zero, self.neg)
        kwargs = {"cache_position": positions} if self.explicit_positions else {}
        out = self.model(**_logits_kwargs(self.model), input_ids=self.prompt, attention_mask=mask.expand(batch, 1, plen, -1),
                         position_ids=positions.expand(batch, plen), past_key_values=self.cache, use_cache=True,
                         **kwargs)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.first_token = self.token.clone()
        self.pos.fill_(plen)

    def step(self) -> None:
        kwargs = {"cache_position": self.pos} if self.explicit_positions else {}
        out = self.model(input_ids=self.token, attention_mask=self._mask(self.pos),
                         position_ids=self.pos.view(1, 1).expand(self.token.shape[0], 1),
                         past_key_values=self.cache, use_cache=True, **kwargs)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def rewind(self) -> None:
        """Back to just after the prompt, without recomputing it (the cache past it is simply overwritten)."""
        self.pos.fill_(self.plen)
        self.token.copy_(self.first_token)
        for layer in getattr(self.cache, "layers", []):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(self.plen)

    def decode(self, tokens: int) -> None:
        for _ in range(tokens):
            self.graph.replay() if self.graph is not None else self.run_step()


class EagerDecoder:
    """Greedy decode steps over HF's dynamic cache, one Python-level forward per token (the fallback)."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor) -> None:
        self.model, self.prompt = model, prompt
        self.kwargs = _logits_kwargs(model)
        self.cache = self.token = None

    def prefill(self) -> None:
        out = self.model(input_ids=self.prompt, use_cache=True, **self.kwargs)
        self.cache, self.token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(self, tokens: int) -> None:
        for _ in range(tokens):
            out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True, **self.kwargs)
            self.cache, self.token = out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def bench_model(model: nn.Module, options: BenchOptions, label: str) -> BenchResult:
    """Measure ``model`` (already on its device, in eval mode) as ``options`` says."""
    device = next(model.parameters()).device
    timer = Timer(device)
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = BenchResult(label, model_bytes(model))
    logits = _logits_kwargs(model)
    for batch in options.batch_sizes:
        prompt = torch.randint(vocab, (batch, options.prompt_len), generator=generator).to(device)
        seconds = _median(timer, lambda: model(input_ids=prompt, use_cache=True, **logits), options.warmup,
                          options.repeats)
        result.prefill_tokens_per_s[batch] = batch * options.prompt_len / seconds
        seconds, mode = _decode_seconds(model, prompt, options, timer)
        result.decode_tokens_per_s[batch] = batch * options.decode_tokens / seconds
        result.decode_mode[batch] = mode
        log.info("%s batch %d: prefill %.0f tok/s, decode %.1f tok/s (%s)", label, batch,
                 result.prefill_tokens_per_s[batch], result.decode_tokens_per_s[batch], mode)
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _decode_seconds(model: nn.Module, prompt: torch.Tensor, options: BenchOptions, timer: Timer) -> tuple[float, str]:
    """Decode time and how it ran: the first of compiled graph (if asked), graph, eager that works on this model."""
    tokens = options.decode_tokens
    failed = []
    if prompt.device.type == "cuda" and options.cuda_graph:
        for compile in (True, False) if options.compile else (False,):
            mode = "compiled + cuda-graph, static cache" if compile else "cuda-graph, static cache"
            try:
                graph = GraphDecoder(model, prompt, tokens, compile=compile)
            except Exception as err:  # noqa: BLE001 - any failure falls back, and the row says why
                log.warning("%s failed (%s: %s); trying the next mode", mode, type(err).__name__, err)
                failed.append(f"{mode} failed: {type(err).__name__}")
                torch.cuda.synchronize()
                continue
            seconds = _median(timer, lambda: graph.decode(tokens), options.warmup, options.repeats, graph.rewind)
            del graph
            return seconds, "; ".join([mode, *failed])
    eager = EagerDecoder(model, prompt)
    seconds = _median(timer, lambda: eager.decode(tokens), options.warmup, options.repeats, eager.prefill)
    return seconds, "; ".join(["eager, dynamic cache", *failed])


def bench_pair(model: nn.Module, options: BenchOptions, convert: Callable[[nn.Module], object],
               labels: tuple[str, str]) -> tuple[BenchResult, BenchResult]:
    """Measure ``model``, convert it in place with ``convert`` (pack it, or unpack it), measure again.

    Converting in place keeps one copy of the weights in memory at a time, which a 7B model on one GPU needs.
    """
    first = bench_model(model, options, labels[0])
    convert(model)
    second = bench_model(model, options, labels[1])
    return first, second


def compare_with_fp16(model: str | None, options: BenchOptions, device: str, dtype: str | torch.dtype = "auto",
                      random_layers: int | None = None, wbits: int = 4,
                      group_size: int | None = 128) -> tuple[BenchResult, BenchResult]:
    """(float baseline, quantized) results for one source, measured in one run:

    - ``random_layers`` set: a random LLaMA-7B-shaped model with that many blocks, packed to W``wbits``A16 by RTN;
    - a packed checkpoint: measured as loaded, then unpacked to float for the baseline;
    - a ``lowbit quantize`` output: its float twin first, then packed as it was calibrated;
    - any other model: as loaded, then packed to W``wbits``A16 by RTN.
    """
    from lowbit.export.linear import PackedLinear
    from lowbit.models.loading import load_model, resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    float_label = f"float ({str(torch_dtype).removeprefix('torch.')})"
    rtn_label = f"W{wbits}A16{f'g{group_size}' if group_size else ''} packed (RTN)"
    if random_layers is not None:
        net = random_llama(device, torch_dtype, options.seed, num_hidden_layers=random_layers)
        return bench_pair(net, options, lambda m: pack_rtn(m, wbits, group_size), (float_label, rtn_label))
    loaded = load_model(model, dtype=torch_dtype, device=device)
    config = loaded.quant_config
    if any(isinstance(m, PackedLinear) for m in loaded.model.modules()):  # a packed checkpoint
        label = f"{config.name} packed ({config.method})"
        quantized, baseline = bench_pair(loaded.model, options, lambda m: to_float_linears(m, torch_dtype),
                                         (label, float_label))
        return baseline, quantized
    if config is not None and config.weight_spec is not None:
        to_float_linears(loaded.model, torch_dtype)  # weights stay on the grid; activations no longer quantized
        return bench_pair(loaded.model, options, lambda m: pack_quantized(m, config),
                          (float_label, f"{config.name} packed ({config.method})"))
    return bench_pair(loaded.model, options, lambda m: pack_rtn(m, wbits, group_size), (float_label, rtn_label))


def _fmt(value, metric: str) -> str:
    if value is None:
        return "-"
    if metric.endswith("bytes"):
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.2f} MiB"
    return f"{value:.1f}"


def print_results(results: tuple[BenchResult, BenchResult]) -> None:
    """A markdown table: one row per metric and batch, the quantized model's ratio to the float one."""
    baseline, quantized = results
    print(f"| metric | batch | {baseline.label} | {quantized.label} | ratio | decode mode |\n|---|---|---|---|---|---|")
    for base, quant in zip(baseline.rows(), quantized.rows(baseline)):
        ratio = "-" if quant["vs_fp16"] is None else f"{quant['vs_fp16']:.2f}x"
        modes = {m for m in (base["decode_mode"], quant["decode_mode"]) if m}
        print(f"| {base['metric']} | {base['batch'] or '-'} | {_fmt(base['value'], base['metric'])} | "
              f"{_fmt(quant['value'], quant['metric'])} | {ratio} | {' / '.join(sorted(modes)) or '-'} |")


def write_results(results: tuple[BenchResult, BenchResult], options: BenchOptions, path, extra: dict | None = None):
    """JSON with the options, the device and every row (atomic write)."""
    from dataclasses import asdict
    from datetime import datetime, timezone

    from lowbit.report import _commit, write_json

    baseline, quantized = results
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    payload = {"device": device, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "commit": _commit(), "options": asdict(options), **(extra or {}),
        "rows": baseline.rows() + quantized.rows(baseline)}
    return write_json(payload, path)
