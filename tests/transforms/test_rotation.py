"""Rotations are exact before quantization, compose with every calibrated transform, and survive save → load."""

import json

import pytest
import torch
from conftest import make_tiny_model, randomise_transforms

from lowbit import LowbitError, QuantConfig, load_model, quantize, save_quantized
from lowbit.models.registry import adapter_for
from lowbit.ptq.block import BlockCalibration, TransformPlan
from lowbit.ptq.capture import capture_block_inputs
from lowbit.transforms.online import online_op
from lowbit.transforms.rotation import inner_linears, rotate


def _gains_far_from_one(model) -> None:
    """Norm gains far from 1, as trained models have, so that folding them (residual) is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) * 3 + 0.1)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rotated_rtn(tiny_model_dir, **bits):
    """A tiny Llama quantized by RTN after ``--rotate inputs``, a batch of ids and its logits."""
    loaded = load_model(tiny_model_dir("llama"))
    config = QuantConfig(method="rtn", rotate="inputs", **bits)
    quantize(loaded, config)
    ids = torch.randint(0, 384, (1, 16))
    return loaded, config, ids, _logits(loaded.model, ids)


@pytest.mark.parametrize("where,arch", [("inputs", "llama"), ("inputs", "qwen2"), ("inputs", "opt"),
                                        ("residual", "llama"), ("residual", "mistral"), ("residual", "qwen2")])
def test_rotation_keeps_logits(where, arch):
    model = make_tiny_model(arch).float()
    _gains_far_from_one(model)
    embed = model.get_input_embeddings()
    tied = model.lm_head.weight is embed.weight
    embed_before = embed.weight.detach().clone()
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    adapter = adapter_for(model.config.model_type)
    report = rotate(model, adapter, where, seed=5)
    assert (_logits(model, ids) - expected).abs().max() <= 1e-3
    assert report.kind == "hadamard" and report.width == 64 and report.where == where
    norms = [b.get_submodule(p.source) for b in adapter.blocks(model) for p in adapter.norm_pairs()]
    if where == "inputs":  # residual untouched, each norm followed by the rotation, down_proj's input rotated
        inner = [b.get_submodule(n) for b in adapter.blocks(model) for n in inner_linears(adapter)]
        assert torch.equal(embed.weight, embed_before) and all(online_op(m) is not None for m in norms + inner)
    else:  # every residual vector rotated, nothing online, gains folded, a tied head untied
        assert not torch.allclose(embed.weight, embed_before) and not any(online_op(n) for n in norms)
        assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
        assert report.untied_head == tied and model.lm_head.weight is not embed.weight
        assert model.config.tie_word_embeddings is False


@pytest.mark.parametrize("where", ["inputs", "residual"])
def test_rotation_spreads_an_outlier_channel_at_the_projections(where):
    model = make_tiny_model("llama").float()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = 80.0
    seen = {}
    handle = model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("x", args[0].detach()))
    ids = torch.randint(0, 384, (1, 32))
    peak_to_rms = lambda x: float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())  # noqa: E731
    _logits(model, ids)
    before = peak_to_rms(seen["x"])
    rotate(model, adapter_for("llama"), where, seed=0)
    _logits(model, ids)
    handle.remove()
    assert peak_to_rms(seen["x"]) < before / 2


@pytest.mark.parametrize("plan", [TransformPlan(scales=True, matrices=True, sf=0.3),
                                  TransformPlan(scales=True, shifts=True, matrices=True, norm_matrices=True, sf=0.3)],
                         ids=["diagonal", "norm-matrices"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_calibrated_transforms_compose_into_the_input_rotation(arch, plan):
    model = make_tiny_model(arch).float()
    adapter = adapter_for(model.config.model_type)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 384, (2, 24), generator=gen)
    expected = _logits(model, ids)
    rotate(model, adapter, "inputs", seed=1)
    x, kwargs = capture_block_inputs(model, adapter, ids, "cpu")
    for block in adapter.blocks(model):
        calib = BlockCalibration(block, adapter, adapter.heads(model.config), plan, None, None)
        calib.init_transforms(x, kwargs, batch=2)
        randomise_transforms(calib, gen)
        online = calib.merge()
        # one op per norm (composed) and one on the MLP's inner input
        assert sorted(online) == sorted([p.source for p in adapter.norm_pairs()] + list(inner_linears(adapter)))
        with torch.no_grad():
            out = block(x, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
    assert (_logits(model, ids) - expected).abs().max() <= 1e-3


def test_mlp_scales_refused_after_an_input_rotation():
    model = make_tiny_model("llama")
    adapter = adapter_for("llama")
    rotate(model, adapter, "inputs")
    x, kwargs = capture_block_inputs(model, adapter, torch.randint(0, 384, (1, 8)), "cpu")
    calib = BlockCalibration(adapter.blocks(model)[0], adapter, adapter.heads(model.config),
                             TransformPlan(scales=True, mlp_scales=True), None, None)
    with pytest.raises(LowbitError, match="online transform on their input"):
        calib.init_transforms(x, kwargs, batch=1)
    with pytest.raises(LowbitError, match="drop one"):
        QuantConfig(method="affinequant", abits=4, rotate="inputs", mlp_scales=True)
    from lowbit.ptq.recipes import plan_for

    assert not plan_for(QuantConfig(method="affinequant", abits=4, rotate="inputs")).mlp_scales  # the default steps aside


def test_composed_online_op_equals_the_two_in_turn():
    from lowbit.transforms.online import OnlineTransform

    gen = torch.Generator().manual_seed(0)
    first = OnlineTransform(torch.randn(1, 8, 8, generator=gen) + 4 * torch.eye(8), torch.randn(8, generator=gen))
    second_inv, second_shift = torch.randn(2, 4, 4, generator=gen) + 4 * torch.eye(4), torch.randn(8, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    expected = OnlineTransform(second_inv, second_shift)(first(x))
    torch.testing.assert_close(first.followed_by(second_inv, second_shift)(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["inputs", "residual"])
def test_quantize_with_rotation_saves_and_reloads(tmp_path, tiny_model_dir, where):
    loaded = load_model(tiny_model_dir("llama"))
    ids = torch.randint(0, 384, (1, 16))
    fp = _logits(loaded.model, ids)
    config = QuantConfig(method="omniquant", wbits=8, abits=8, nsamples=2, seqlen=32, epochs=1, rotate=where)
    quantize(loaded, config, progress=False)
    expected = _logits(loaded.model, ids)
    assert (expected - fp).abs().max() < 0.05 * fp.abs().max()  # 8 bits of a rotated model: close to float
    out = save_quantized(loaded, config, tmp_path / "q", save_dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["config"]["rotate"] == where and meta["rotation"]["where"] == where
    assert bool(meta.get("online_ops")) == (where == "inputs")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is (where == "inputs")
    if where == "inputs":  # every block's down_proj rotation is the same matrix: written once
        _check_shared_once(meta, out / "online_transforms.safetensors")
    again = load_model(out)
    assert again.quant_config.rotate == where and again.quant_config.label == f"{where}-rotated omniquant"
    torch.testing.assert_close(_logits(again.model, ids), expected, atol=1e-5, rtol=1e-5)


def _check_shared_once(meta: dict, path):
    from safetensors import safe_open

    down = [f"model.layers.{b}.mlp.down_proj.lowbit_online.inverse" for b in (0, 1)]
    assert meta["shared_online"][down[1]] == down[0] and meta["format_version"] == 2  # (RTN's norm ops too)
    with safe_open(str(path), framework="pt") as handle:
        assert down[0] in handle.keys() and down[1] not in handle.keys()


def test_equal_online_tensors_are_stored_once_and_a_bad_map_is_refused():
    from lowbit.ptq.checkpoint import stored_once, with_shared

    a, b = torch.randn(3, 4), torch.randn(3, 4)
    tensors = {"x": a, "y": a.clone(), "z": b, "w": a[:2].clone()}
    unique, shared = stored_once(tensors)
    assert set(unique) == {"w", "x", "z"} and shared == {"y": "x"}
    allowed = set(tensors) | {"missing"}
    assert all(torch.equal(t, tensors[k]) for k, t in with_shared(unique, shared, allowed, "f").items())
    for bad in ({"y": "missing"}, {"x": "z"}, ["y"], {"y": ["x"]}, {"v": "x"}):  # "v": not an online op's tensor
        with pytest.raises(LowbitError, match="corrupt"):
            with_shared(unique, bad, allowed, "quantization.json")


def test_rotation_config_and_refusals(tiny_model_dir):
    assert "rotate" not in QuantConfig().to_dict()  # manifests of earlier runs still match
    assert QuantConfig.from_dict(QuantConfig(rotate="inputs").to_dict()).rotate == "inputs"
    with pytest.raises(LowbitError, match="--rotate must be one of"):
        QuantConfig(rotate=True)
    opt = load_model(tiny_model_dir("opt"))
    with pytest.raises(LowbitError, match="RMSNorm"):
        quantize(opt, QuantConfig(method="rtn", rotate="residual"))
    llama = load_model(tiny_model_dir("llama"))
    quantize(llama, QuantConfig(method="rtn", wbits=8, rotate="inputs"))
    with pytest.raises(LowbitError, match="already runs transforms"):
        rotate(llama.model, llama.adapter, "inputs")


def test_a_rotated_calibration_resumes_itself_not_an_unrotated_one(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "ckpt"
    base = dict(method="affinequant", wbits=4, abits=8, nsamples=2, seqlen=32, epochs=1)
    ids = torch.randint(0, 384, (1, 16))
    first = load_model(tiny_model_dir("llama"))
    quantize(first, QuantConfig(**base, rotate="inputs"), checkpoint_dir=str(ckpt), progress=False)
    resumed = load_model(tiny_model_dir("llama"))  # every block restored from the checkpoints
    quantize(resumed, QuantConfig(**base, rotate="inputs"), checkpoint_dir=str(ckpt), progress=False)
    assert all(e.seconds == f.seconds for e, f in zip(first.calibration_log, resumed.calibration_log))
    torch.testing.assert_close(_logits(resumed.model, ids), _logits(first.model, ids), atol=0, rtol=0)
    with pytest.raises(LowbitError, match="another configuration"):
        quantize(load_model(tiny_model_dir("llama")), QuantConfig(**base), checkpoint_dir=str(ckpt), progress=False)


def test_rotated_w4a4_packs_and_reloads_with_its_online_ops(tmp_path, tiny_model_dir):
    from lowbit import load_quantized, save_packed

    loaded, config, ids, expected = _rotated_rtn(tiny_model_dir, wbits=4, abits=4)
    out = save_packed(loaded, config, tmp_path / "packed", dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert any(name.endswith("mlp.down_proj") for name in meta["online_ops"])
    _check_shared_once(meta, out / "model.safetensors")
    again = load_quantized(out, dtype="float32")
    torch.testing.assert_close(_logits(again.model, ids), expected, atol=1e-4, rtol=1e-4)


def test_swapping_linears_in_place_keeps_the_input_rotation(tiny_model_dir):
    """lowbit bench packs a fake-quant output in place and builds its float twin: both keep down_proj's rotation."""
    import copy

    from lowbit.export.inplace import pack_quantized, to_float_linears

    loaded, config, ids, expected = _rotated_rtn(tiny_model_dir, wbits=4)
    packed, twin = copy.deepcopy(loaded.model), copy.deepcopy(loaded.model)
    pack_quantized(packed, config)
    to_float_linears(twin, torch.float32)
    for model in (packed, twin):
        assert online_op(model.model.layers[0].mlp.down_proj) is not None
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_restoring_a_checkpointed_block_runs_only_the_ops_it_saved():
    from dataclasses import asdict

    from lowbit.ptq.checkpoint import BlockCheckpoints
    from lowbit.ptq.engine import BlockLog

    model = make_tiny_model("llama")
    adapter = adapter_for("llama")
    rotate(model, adapter, "inputs")  # ops on the norms and down_proj of the fresh block
    block = adapter.blocks(model)[0]
    calib = BlockCalibration(block, adapter, adapter.heads(model.config), TransformPlan(), None, None)
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    saved["input_layernorm.lowbit_online.inverse"] = online_op(block.input_layernorm).inverse.clone()
    BlockCheckpoints(None, {}).restore(0, calib, (saved, asdict(BlockLog(0, 0.0, 0.0, online_ops=["input_layernorm"]))))
    assert online_op(block.input_layernorm) is not None
    assert online_op(block.post_attention_layernorm) is None and online_op(block.mlp.down_proj) is None


@pytest.mark.gpu
def test_a_rotated_output_runs_on_the_gpu_after_loading(tmp_path, tiny_model_dir):
    loaded, config, ids, expected = _rotated_rtn(tiny_model_dir, wbits=4, abits=8)
    out = save_quantized(loaded, config, tmp_path / "q", save_dtype=torch.float32)
    again = load_model(out, dtype="float32", device="cuda")
    torch.testing.assert_close(_logits(again.model, ids.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)
