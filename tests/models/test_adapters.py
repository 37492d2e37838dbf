"""Adapters on tiny random configs of every supported family: names resolve, shapes pair up, forward runs."""

import pytest
import torch
from conftest import make_tiny_model

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.models.loading import LoadedModel
from lowbit.models.registry import SUPPORTED, adapter_for
from lowbit.ptq import quantize
from lowbit.quant.fake_quant import QuantLinear

ARCHS = ["llama", "mistral", "qwen2", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
def test_pairs_resolve_and_shapes_match(arch):
    model = make_tiny_model(arch)
    adapter = adapter_for(model.config.model_type)
    adapter.validate(model)
    heads = adapter.heads(model.config)
    blocks = adapter.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        for pair in adapter.pairs:
            source = block.get_submodule(pair.source)
            targets = [block.get_submodule(t) for t in pair.targets]
            if pair.kind == "norm":
                assert all(t.in_features == source.weight.shape[0] for t in targets)
            elif pair.elementwise:  # up -> down, fc1 -> fc2: one scale per inner feature
                assert pair.kind == "linear" and not pair.per_head
                assert targets[0].in_features == source.out_features
            elif pair.kind == "linear":  # v -> o: o reads every query head's copy of its KV head
                assert source.out_features == heads.num_kv_heads * heads.head_dim
                assert targets[0].in_features == heads.num_heads * heads.head_dim
            else:  # q <-> k
                assert source.out_features == heads.num_heads * heads.head_dim
                assert targets[0].out_features == heads.num_kv_heads * heads.head_dim
        assert set(adapter.block_linears(block)) == set(adapter.linears)


def test_gqa_layout_and_rope_flags():
    llama = make_tiny_model("llama")
    adapter = adapter_for("llama")
    heads = adapter.heads(llama.config)
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim, heads.group) == (4, 2, 16, 2)
    qk = [p for p in adapter.pairs if p.kind == "qk"][0]
    assert adapter.rope and not qk.commutes  # RoPE sits between q/k projections and their product
    assert [p for p in adapter_for("opt").pairs if p.kind == "qk"][0].commutes


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_w8a8_wraps_every_block_linear_and_stays_close(arch, tiny_tokenizer):
    model = make_tiny_model(arch)
    ids = tiny_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    loaded = LoadedModel(model, tiny_tokenizer, adapter_for(model.config.model_type), arch)
    quantize(loaded, QuantConfig(method="rtn", wbits=8, abits=8))
    wrapped = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(wrapped) == len(loaded.adapter.linears) * model.config.num_hidden_layers
    assert not isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_unknown_architecture_lists_supported():
    with pytest.raises(LowbitError) as err:
        adapter_for("gpt2")
    assert "unsupported architecture 'gpt2'" in str(err.value)
    for name in SUPPORTED:
        assert name in str(err.value)
