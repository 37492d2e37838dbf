"""GPTQ rounding: on the grid, equal to RTN under an identity Hessian, better than RTN on correlated inputs, and as
the engine's final rounding stage (alone and after AffineQuant) end to end, with resume and save/reload."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, tiny_loaded

import lowbit.ptq.engine as engine
from lowbit import QuantConfig, load_model, quantize, save_quantized
from lowbit.errors import LowbitError
from lowbit.export.codes import extract_codes
from lowbit.models.registry import adapter_for
from lowbit.ptq.capture import capture_block_inputs
from lowbit.ptq.gptq import GPTQOptions, Grid, gptq_round, mse_clip, output_error
from lowbit.ptq.rounding import collect_hessians, sequential_groups
from lowbit.quant.quantizer import QuantSpec, fake_quantize

SPECS = [QuantSpec(4, False, "channel"), QuantSpec(3, False, "group", 16), QuantSpec(4, True, "group", 16),
         QuantSpec(2, False, "group", 16)]


def correlated(n=1024, width=64, seed=0):
    """Inputs with a low-rank structure plus noise (as layer inputs are): RTN ignores it, GPTQ exploits it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen) @ torch.randn(8, width, generator=gen) + 0.2 * torch.randn(n, width, generator=gen)
    return x, (x.double().T @ x.double()) / n


def weight(out=48, width=64, seed=1):
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_output_lies_on_the_grid(spec, act_order):
    w, (_, h) = weight(), correlated()
    grid = Grid.of(w, spec, mse_clip(w, spec))
    q = gptq_round(w, h, grid, GPTQOptions(act_order=act_order, block_size=16))
    codes = q / grid.scale + (0 if grid.zero is None else grid.zero)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= spec.qmin and codes.round().max() <= spec.qmax
    assert torch.equal(grid.snap(q), q)  # snapping again changes nothing
    extract_codes(q, spec)  # the packers recover exact codes from it


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_identity_hessian_gives_round_to_nearest(spec):
    w = weight()
    grid = Grid.of(w, spec)
    assert torch.equal(grid.snap(w), fake_quantize(w, spec))  # the grid is the quantizer's, bit for bit
    assert torch.equal(gptq_round(w, torch.eye(w.shape[1]), grid), fake_quantize(w, spec))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_beats_rtn_on_layer_output(spec, act_order):
    w, (x, h) = weight(), correlated()
    grid = Grid.of(w, spec)
    rtn, q = grid.snap(w), gptq_round(w, h, grid, GPTQOptions(act_order=act_order))
    err = lambda r: ((x @ w.T - x @ r.T) ** 2).mean()  # noqa: E731
    assert err(q) < 0.5 * err(rtn)
    assert output_error(w, q, h) == pytest.approx(float(err(q)), rel=1e-3)  # the same quantity


def test_dead_inputs_and_a_singular_hessian_are_handled():
    w, (_, h) = weight(), correlated()
    h = h.clone()
    h[5, :], h[:, 5] = 0, 0  # an input channel never seen in calibration
    grid = Grid.of(w, SPECS[0])
    q = gptq_round(w, h, grid)
    assert torch.isfinite(q).all() and torch.equal(grid.snap(q), q)


@pytest.mark.parametrize("arch, expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_true_sequential_groups(arch, expected):
    assert sequential_groups(adapter_for(arch)) == expected


def test_hessian_is_of_the_linears_actual_input():
    model = make_tiny_model("llama")
    adapter = adapter_for("llama")
    ids = torch.randint(0, 384, (3, 20), generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, adapter, ids, "cpu")
    block = adapter.blocks(model)[0]
    mods = {n: block.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.v_proj")}
    hs = collect_hessians(block, mods, x, kwargs, batch=2)
    with torch.no_grad():
        normed = block.input_layernorm(x).reshape(-1, x.shape[-1]).double()
    torch.testing.assert_close(hs["self_attn.q_proj"], normed.T @ normed / normed.shape[0])
    torch.testing.assert_close(hs["self_attn.v_proj"], hs["self_attn.q_proj"])


# ------------------------------------------------------------------------------------------------- the engine


def config(method="gptq", **kw):
    base = dict(method=method, wbits=3, abits=16, group_size=16, nsamples=2, seqlen=32, epochs=1, seed=1)
    return QuantConfig(**{**base, **kw})


def logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits


def assert_on_grid(loaded, cfg):
    for block in loaded.adapter.blocks(loaded.model):
        for name, lin in loaded.adapter.block_linears(block).items():
            assert lin.weight_spec is None  # rounded once, not re-quantized on the fly
            extract_codes(lin.weight.detach(), cfg.weight_spec, name=name)


ENGINE_RUNS = [
    ("llama", config("gptq")), ("opt", config("gptq")),
    ("llama", config("gptq", gptq_grid="mse", gptq_act_order=False, wbits=4, group_size=None)),
    ("llama", config("affinequant", rounding="gptq", norm_matrices=True)),  # online norm matrices
    ("opt", config("affinequant", rounding="gptq")), ("opt", config("omniquant", rounding="gptq", wbits=2)),
]


@pytest.mark.parametrize("arch, cfg", ENGINE_RUNS, ids=lambda v: v if isinstance(v, str) else
                         f"{v.label}-{v.name}-{v.gptq_grid}-ao{int(v.gptq_act_order)}-nm{int(bool(v.norm_matrices))}")
def test_engine_end_to_end(arch, cfg, tiny_tokenizer):
    loaded = tiny_loaded(arch, tiny_tokenizer)
    quantize(loaded, cfg, progress=False)
    log = loaded.calibration_log
    assert len(log) == 2
    for entry in log:
        assert set(entry.gptq) == set(loaded.adapter.linears)
        rtn = sum(s["rtn"] for s in entry.gptq.values())
        assert sum(s["gptq"] for s in entry.gptq.values()) < rtn  # on the calibration inputs, same grid
    assert_on_grid(loaded, cfg)
    assert torch.isfinite(logits(loaded, torch.randint(0, 384, (1, 16)))).all()


def test_gptq_lowers_block_loss_against_rtn_on_the_same_learnt_grid(tiny_tokenizer):
    results = {}
    for rounding in (None, "gptq"):
        loaded = tiny_loaded("llama", tiny_tokenizer)
        quantize(loaded, config("omniquant", rounding=rounding, nsamples=2, seqlen=64), progress=False)
        results[rounding] = [e.loss_after for e in loaded.calibration_log]
    assert results["gptq"][0] < results[None][0]


def test_resume_gives_identical_gptq_weights(tmp_path, tiny_tokenizer, monkeypatch):
    cfg = config("affinequant", rounding="gptq")
    ref = tiny_loaded("llama", tiny_tokenizer)
    quantize(ref, cfg, checkpoint_dir=tmp_path / "whole", progress=False)

    real = engine.gptq_block
    calls = {"n": 0}

    def dies_in_block_1(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed while rounding block 1
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "gptq_block", dies_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_loaded("llama", tiny_tokenizer), cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    monkeypatch.setattr(engine, "gptq_block", real)
    saved = json.loads((tmp_path / "ckpt" / "block_000.json").read_text())
    assert set(saved["gptq"]) == set(ref.adapter.linears)

    resumed = tiny_loaded("llama", tiny_tokenizer)
    quantize(resumed, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    for (name, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    errors = lambda log: [{k: (s["rtn"], s["gptq"]) for k, s in e.gptq.items()} for e in log]  # noqa: E731
    assert errors(resumed.calibration_log) == errors(ref.calibration_log)
    # a run without GPTQ rounding may not resume from these checkpoints
    with pytest.raises(LowbitError, match="another configuration"):
        quantize(tiny_loaded("llama", tiny_tokenizer), config("affinequant"), checkpoint_dir=tmp_path / "ckpt",
                 progress=False)


def test_saved_model_records_the_rounding_and_reloads(tmp_path, tiny_tokenizer):
    cfg = config("affinequant", rounding="gptq")
    loaded = tiny_loaded("llama", tiny_tokenizer)
    quantize(loaded, cfg, progress=False)
    out = save_quantized(loaded, cfg, tmp_path / "q", save_dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["config"]["rounding"] == "gptq"
    assert "gptq" in json.loads((out / "calibration_log.json").read_text())[0]
    back = load_model(str(out))
    assert back.quant_config == dataclasses.replace(cfg, weight_lr=3e-5)  # the recipe's rate, spelled out
    ids = torch.randint(0, 384, (1, 16))
    torch.testing.assert_close(logits(back, ids), logits(loaded, ids))


def test_plain_configs_serialise_as_before():
    """Fields added for GPTQ are written only when set: older checkpoint manifests still match (resume)."""
    assert not any(k.startswith("gptq") or k == "rounding" for k in QuantConfig(method="affinequant").to_dict())
    cfg = QuantConfig(method="gptq", gptq_act_order=False)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["gptq_act_order"] is False


@pytest.mark.parametrize("kw, match", [
    (dict(method="gptq", abits=8), "weight-only"),
    (dict(method="affinequant", rounding="gptq", abits=4), "weight-only"),
    (dict(method="gptq", wbits=16), "weight-only"),
    (dict(method="rtn", rounding="gptq"), "--method gptq"),
    (dict(method="gptq", rounding="rtn"), "contradicts"),
    (dict(method="gptq", gptq_grid="hessian"), "--gptq-grid"),
    (dict(method="affinequant", rounding="nearest"), "unknown rounding"),
    (dict(method="affinequant", gptq_act_order=False), "apply only with GPTQ"),
    (dict(method="rtn", gptq_grid="mse"), "apply only with GPTQ"),
])
def test_bad_gptq_configs_are_refused(kw, match):
    with pytest.raises(LowbitError, match=match):
        QuantConfig(**kw)


def test_redundant_rounding_is_the_same_config():
    """--rounding naming the method's own rounding changes nothing, so a resume without the flag still matches."""
    assert QuantConfig(method="affinequant", rounding="rtn") == QuantConfig(method="affinequant")
    assert QuantConfig(method="gptq", rounding="gptq").to_dict() == QuantConfig(method="gptq").to_dict()


def test_benchmark_run_names():
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        from ptq_table import parse_run
    finally:
        sys.path.pop(0)

    class Args:
        nsamples, seqlen, epochs, batch_size, seed = 64, 2048, 4, 1, 0

    gptq, affine = parse_run("gptq:W4A16", Args), parse_run("affinequant+gptq:W3A16g64", Args)
    assert (gptq.method, gptq.rounding_method, gptq.name) == ("gptq", "gptq", "W4A16")
    assert (affine.method, affine.rounding, affine.label, affine.name) == ("affinequant", "gptq", "affinequant+weights+gptq", "W3A16g64")
    assert parse_run("affinequant:W4A4", Args).label == "affinequant"


def test_cli_gptq_then_eval(tmp_path, capsys, tiny_model_dir):
    from lowbit.cli import main
    from lowbit.data import calibration_text

    text = tmp_path / "eval.txt"
    text.write_text(calibration_text("wikitext2")[:8000])
    out = tmp_path / "q"
    common = ["-q", "quantize", "--model", str(tiny_model_dir("llama")), "--nsamples", "2", "--calib-seqlen", "32",
              "--epochs", "1", "--device", "cpu", "--output", str(out)]
    assert main([*common, "--method", "affinequant", "--rounding", "gptq", "--abits", "4"]) == 2
    assert "weight-only" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--method", "affinequant", "--rounding", "gptq", "--group-size", "32"]) == 0
    assert json.loads((out / "quantization.json").read_text())["config"]["rounding"] == "gptq"
    assert main(["-q", "eval", "--model", str(out), "--tasks", str(text), "--seqlen", "64"]) == 0
    assert "affinequant+weights+gptq W4A16g32" in capsys.readouterr().out
