"""CUDA-graph calibration steps follow the eager trajectory (GPU only; skipped without CUDA)."""

import pytest
import torch
from conftest import make_tiny_model

from lowbit import QuantConfig
from lowbit.data.texts import calibration_windows
from lowbit.models.loading import LoadedModel
from lowbit.models.registry import adapter_for
from lowbit.ptq.engine import CalibOptions, calibrate
from lowbit.ptq.recipes import plan_for
from lowbit.ptq.step import CalibStep

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Adam amplifies TF32 noise in near-zero gradients, so a TF32 switch left on by an earlier test (training
    benchmarks turn it on) would make eager and graph differ by more than rounding: pin full float32 here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def test_graphed_step_equals_eager_step():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64, device="cuda")
    data = [(torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")) for _ in range(5)]
    results = []
    for graph in (False, True):
        weight = torch.nn.Parameter(layer.weight.detach().clone())
        loss_fn = lambda x, t, aug: torch.nn.functional.mse_loss(torch.nn.functional.linear(x, weight), t)
        step = CalibStep({"let": [weight]}, {"let": 1e-2}, loss_fn, 0.0, torch.device("cuda"), graph=graph)
        for x, t in data:
            step(x, t, None)
        assert (step._graph is not None) == graph
        results.append((weight.detach().clone(), float(step.total)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


@pytest.mark.parametrize("method", ["omniquant", "affinequant"])
def test_graphed_calibration_matches_eager(method, tiny_tokenizer):
    """Whole calibrations agree within the noise of rounding: the graph and eager runs pick different matmul
    kernels, and an activation that lands on the other side of a rounding boundary changes the trajectory a
    little (8 bits keep that small; the single-linear test above checks the mechanism exactly)."""
    config = QuantConfig(method=method, wbits=8, abits=8, nsamples=4, seqlen=32, epochs=3, seed=1)
    outs = []
    for graph in (False, True):
        model = make_tiny_model("llama")
        loaded = LoadedModel(model, tiny_tokenizer, adapter_for("llama"), "llama")
        windows = calibration_windows(tiny_tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
        opts = CalibOptions(epochs=3, device="cuda", cuda_graph=graph, progress=False)
        logs = calibrate(loaded, config, plan_for(config), opts, windows)
        with torch.no_grad():
            outs.append((model(windows[:1]).logits, [e.loss_after for e in logs]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=2e-2)


def test_graph_memory_does_not_grow_block_after_block(tiny_tokenizer, caplog):
    """Every block's graph allocates from the run's one pool: with a fresh pool per block the allocator kept each
    dead graph's memory, and three SmolLM2 runs in threads ran out of an H100's 79 GiB by block 25. Every block
    must still be graphed: a first attempt re-used a dead pool's handle, failed capture and went eager (slow)."""
    import logging

    caplog.set_level(logging.WARNING, logger="lowbit.ptq.step")
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    loaded = LoadedModel(model, tiny_tokenizer, adapter_for("llama"), "llama")
    config = QuantConfig(method="affinequant", wbits=4, abits=4, nsamples=4, seqlen=64, epochs=2, seed=1)
    windows = calibration_windows(tiny_tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
    logs = calibrate(loaded, config, plan_for(config), CalibOptions(epochs=2, device="cuda", progress=False), windows)
    assert "calibrating eagerly" not in caplog.text
    assert [e.cuda_graph for e in logs] == [True] * len(logs)
    reserved = [e.gpu_reserved_gib for e in logs]
    assert all(r is not None for r in reserved)
    assert reserved[-1] - reserved[1] < 4 / 1024, reserved  # less than one 2 MiB segment per block after the first


def test_a_failed_capture_leaves_later_blocks_graphed(tiny_tokenizer, monkeypatch, caplog):
    """A capture broken by a host sync (block 0) falls back to eager for that block only: the shared pool is dropped,
    so the next block's capture does not trip over the dead one's pool."""
    import logging

    import lowbit.ptq.engine as engine

    caplog.set_level(logging.WARNING, logger="lowbit.ptq.step")
    original, broken = engine.block_loss, []

    def syncing_loss(out, target):
        loss = original(out, target)
        if not broken and torch.cuda.is_current_stream_capturing():
            broken.append(True)
            loss.item()  # a host sync inside a capture invalidates it, as an uncapturable op would
        return loss

    monkeypatch.setattr(engine, "block_loss", syncing_loss)
    config = QuantConfig(method="omniquant", wbits=4, abits=4, nsamples=4, seqlen=32, epochs=2, seed=1)
    loaded = LoadedModel(make_tiny_model("llama"), tiny_tokenizer, adapter_for("llama"), "llama")
    windows = calibration_windows(tiny_tokenizer, config.calib_data, config.nsamples, config.seqlen, config.seed)
    logs = calibrate(loaded, config, plan_for(config), CalibOptions(epochs=2, device="cuda", progress=False), windows)
    assert broken and "calibrating eagerly" in caplog.text
    assert [e.cuda_graph for e in logs] == [False, True]
    assert all(e.loss_after == e.loss_after for e in logs)
