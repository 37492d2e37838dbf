"""compressed-tensors export: a tiny quantized Llama, loaded back by transformers + compressed-tensors, gives our logits."""

import json

import pytest
import torch
from test_gptq import logits, quantized_tiny, stored_twin

from lowbit import LowbitError, QuantConfig
from lowbit.export.compressed_tensors import save_compressed_tensors

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


@pytest.mark.parametrize("symmetric,group_size", [(True, 32), (False, 32), (False, None)])
def test_transformers_loads_our_export(tmp_path, symmetric, group_size):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = QuantConfig(wbits=4, group_size=group_size, weight_symmetric=symmetric)
    loaded = quantized_tiny(config)
    out = save_compressed_tensors(loaded, config, tmp_path / "ct")
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta["format"] == "pack-quantized" and meta["ignore"] == ["lm_head"]
    assert meta["config_groups"]["group_0"]["weights"]["strategy"] == ("group" if group_size else "channel")
    # asymmetric pack-quantized checkpoints only load decompressed in transformers today
    # (vllm-project/llm-compressor#1618): the compressed path builds unpacked zero points on meta
    kwargs = {} if symmetric else {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs)
    got = logits(theirs)
    # the compressed path dequantizes in the model's float32, the decompressing one in the scales' fp16
    exact = (got - logits(stored_twin(loaded, config, fp16_weights=not symmetric))).abs().max().item()
    vs_ours = (got - logits(loaded.model)).abs().max().item()
    print(f"compressed-tensors sym={symmetric} g={group_size}: max |diff| {exact:.2e} against the same stored "
          f"rounding, {vs_ours:.2e} against our float32 model (logits up to {logits(loaded.model).abs().max():.1f})")
    assert exact < 1e-4  # any layout error (nibble order, offset, transposition) is of order 1
    assert vs_ours < 0.05  # fp16 storage of scales, embeddings and norms


def test_refuses_activation_quantization_and_other_bits(tmp_path):
    w4a8 = QuantConfig(wbits=4, abits=8, group_size=32)
    with pytest.raises(LowbitError, match="W4A8g32.*runs only in lowbit's format"):
        save_compressed_tensors(quantized_tiny(w4a8), w4a8, tmp_path / "a")
    w6 = QuantConfig(wbits=6, group_size=32)
    with pytest.raises(LowbitError, match="6-bit weights"):
        save_compressed_tensors(quantized_tiny(w6), w6, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_zero_points_outside_the_format_are_shifted_exactly_or_refused(tmp_path):
    config = QuantConfig(wbits=4, group_size=32)
    loaded = quantized_tiny(config)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a group on the grid whose values are all negative: codes 0..15, zero point 20
        q_proj.weight[0, :32] = (torch.arange(32) % 16 - 20) * 0.01
    with pytest.raises(LowbitError, match="zero point outside 0..15.*no room.*zero 20"):
        save_compressed_tensors(loaded, config, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():  # all positive, codes 0..9, zero point -3: codes and zero shifted by +3 is exact
        q_proj.weight[0, :32] = (torch.arange(32) % 10 + 3) * 0.01
    expected = logits(stored_twin(loaded, config, fp16_weights=True))
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = save_compressed_tensors(loaded, config, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert (logits(theirs) - expected).abs().max() < 1e-4
