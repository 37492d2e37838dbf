"""Merging is exact: with quantization off, transformed-and-merged models give the original logits."""

import pytest
import torch
from conftest import make_tiny_model, randomise_transforms as randomise

from lowbit.errors import LowbitError
from lowbit.models.registry import adapter_for
from lowbit.ptq.block import BlockCalibration, TransformPlan
from lowbit.ptq.capture import capture_block_inputs

PLANS = {
    "scales": TransformPlan(scales=True),
    "scales+shifts": TransformPlan(scales=True, shifts=True),
    "matrices": TransformPlan(scales=True, shifts=True, matrices=True, sf=0.3),
    "norm_matrices": TransformPlan(scales=True, shifts=True, matrices=True, norm_matrices=True, sf=0.3),
    # the MLP's inner pair through SwiGLU's product / OPT's ReLU: exact only as a positive diagonal without shift
    "mlp_scales": TransformPlan(scales=True, shifts=True, matrices=True, norm_matrices=True, sf=0.3, mlp_scales=True),
}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_transform_and_merge_keep_logits(arch, plan_name):
    model = make_tiny_model(arch).float()
    adapter = adapter_for(model.config.model_type)
    heads = adapter.heads(model.config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 384, (2, 24), generator=gen)
    with torch.no_grad():
        expected = model(ids).logits
    x, kwargs = capture_block_inputs(model, adapter, ids, "cpu")
    online = []
    for block in adapter.blocks(model):
        with torch.no_grad():
            ref = block(x, **kwargs)
            ref = ref[0] if isinstance(ref, tuple) else ref
        calib = BlockCalibration(block, adapter, heads, PLANS[plan_name], None, None)
        calib.init_transforms(x, kwargs, batch=2)
        randomise(calib, gen)
        with torch.no_grad():
            torch.testing.assert_close(calib(x, kwargs), ref, atol=1e-4, rtol=1e-4)  # during calibration
        online += calib.merge()
        with torch.no_grad():
            merged = block(x, **kwargs)
            merged = merged[0] if isinstance(merged, tuple) else merged
        torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)  # after merging
        x = ref
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max() <= 1e-3
    assert bool(online) == PLANS[plan_name].norm_matrices  # only a full norm matrix stays online


def test_shifts_only_where_biases_absorb_them():
    for arch, expect_shift in (("llama", False), ("opt", True)):
        model = make_tiny_model(arch)
        adapter = adapter_for(model.config.model_type)
        ids = torch.randint(0, 384, (1, 8))
        x, kwargs = capture_block_inputs(model, adapter, ids, "cpu")
        calib = BlockCalibration(adapter.blocks(model)[0], adapter, adapter.heads(model.config),
                                 TransformPlan(scales=True, shifts=True), None, None)
        calib.init_transforms(x, kwargs, batch=1)
        assert any(t.shift is not None for t in calib.transforms.values()) == expect_shift


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_mlp_pair_is_a_diagonal_without_shift_and_only_when_asked(arch):
    model = make_tiny_model(arch)
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, 384, (1, 8), generator=torch.Generator().manual_seed(1))
    x, kwargs = capture_block_inputs(model, adapter, ids, "cpu")
    for mlp_scales in (False, True):
        calib = BlockCalibration(adapter.blocks(model)[0], adapter, adapter.heads(model.config),
                                 TransformPlan(scales=True, shifts=True, matrices=True, mlp_scales=mlp_scales), None, None)
        calib.init_transforms(x, kwargs, batch=1)
        inner = [str(i) for i, p in enumerate(calib.pairs) if p.elementwise]
        assert len(inner) == 1
        assert (inner[0] in calib.transforms) == mlp_scales
        if mlp_scales:
            t = calib.transforms[inner[0]]
            assert t.is_diagonal and t.shift is None


def test_mlp_scales_defaults_and_old_manifests():
    from lowbit.config import QuantConfig
    from lowbit.ptq.recipes import plan_for

    assert "mlp_scales" not in TransformPlan().to_dict()  # manifests of earlier runs still match
    assert TransformPlan(mlp_scales=True).to_dict()["mlp_scales"] is True
    for method in ("smoothquant", "omniquant", "affinequant"):
        # on by default for AffineQuant with activation bits only: SmoothQuant and OmniQuant run as published
        assert plan_for(QuantConfig(method=method, wbits=6, abits=6)).mlp_scales == (method == "affinequant")
        assert plan_for(QuantConfig(method=method, wbits=6, abits=6, mlp_scales=True)).mlp_scales
        assert not plan_for(QuantConfig(method=method, wbits=6, abits=6, mlp_scales=False)).mlp_scales
    assert not plan_for(QuantConfig(method="affinequant", wbits=4)).mlp_scales  # weight-only: off by default
    assert not plan_for(QuantConfig(method="omniquant", wbits=4, mlp_scales=True)).mlp_scales  # no scales there
    assert QuantConfig.from_dict(QuantConfig(method="affinequant", mlp_scales=True).to_dict()).mlp_scales
    assert QuantConfig.from_dict(QuantConfig(method="affinequant", mlp_scales=False).to_dict()).mlp_scales is False
    assert "mlp_scales" not in QuantConfig(method="affinequant").to_dict()
    with pytest.raises(LowbitError, match="mlp_scales"):
        QuantConfig(method="affinequant", mlp_scales="yes")


def test_default_mlp_scales_left_out_where_inexact():
    from lowbit.config import QuantConfig
    from lowbit.ptq.recipes import plan_for_model

    model, adapter = make_tiny_model("opt"), adapter_for("opt")
    config = QuantConfig(method="affinequant", wbits=4, abits=4)
    assert plan_for_model(config, adapter, model.config).mlp_scales  # ReLU: exact
    model.config.activation_function = "gelu"
    assert not plan_for_model(config, adapter, model.config).mlp_scales  # the default steps aside
    explicit = QuantConfig(method="affinequant", wbits=4, abits=4, mlp_scales=True)
    assert plan_for_model(explicit, adapter, model.config).mlp_scales  # asked for: the engine refuses it


def test_mlp_scales_refuse_an_opt_without_relu():
    model = make_tiny_model("opt")
    pair = [p for p in adapter_for("opt").pairs if p.elementwise][0]
    pair.check(model.config)  # the tiny OPT uses ReLU
    model.config.activation_function = "gelu"
    with pytest.raises(LowbitError, match="activation_function"):
        pair.check(model.config)
    [p for p in adapter_for("llama").pairs if p.elementwise][0].check(model.config)  # gated: any activation
