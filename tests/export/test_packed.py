"""save_packed writes real packed integers plus float tensors and metadata, atomically, and refuses bad input."""

import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open

from lowbit import QuantConfig, quantize
from lowbit.errors import LowbitError
from lowbit.export import extract_codes, save_packed
from lowbit.models.loading import LoadedModel
from lowbit.models.registry import adapter_for
from lowbit.quant.packing import PackedInts, unpack


def quantized(arch, config, tokenizer, seed=0):
    loaded = LoadedModel(make_tiny_model(arch, seed), tokenizer, adapter_for(arch), f"tiny-{arch}")
    return quantize(loaded, config, progress=False)


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_layout_metadata_and_codes(tmp_path, tiny_tokenizer):
    config = QuantConfig(method="rtn", wbits=4, abits=8, group_size=32)
    loaded = quantized("llama", config, tiny_tokenizer)
    out = save_packed(loaded, config, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary directory left behind
    tensors = read(out / "model.safetensors")
    q = "model.layers.1.mlp.down_proj"  # (64, 128)
    assert tensors[f"{q}.qweight"].dtype == torch.uint8 and tensors[f"{q}.qweight"].shape == (64, 64)
    assert tensors[f"{q}.scales"].shape == tensors[f"{q}.zeros"].shape == (64, 4)
    assert tensors[f"{q}.scales"].dtype == torch.float32 and f"{q}.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" not in tensors  # tied to the embedding: stored once
    codes = unpack(PackedInts(tensors[f"{q}.qweight"], 4, 128))
    expected = extract_codes(loaded.model.get_submodule(q).weight, config.weight_spec)
    assert torch.equal(codes, expected.codes) and torch.equal(tensors[f"{q}.zeros"], expected.zeros)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["format"] == "lowbit-packed" and meta["format_version"] == 1 and meta["method"] == "rtn"
    assert meta["weights"]["bits"] == 4 and meta["weights"]["group_size"] == 32 and len(meta["weights"]["layers"]) == 14
    assert meta["activations"] == {"bits": 8, "granularity": "token", "symmetric": False, "dynamic": True}
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} and meta["online_ops"] == []
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_file_holds_bits_per_weight(tmp_path, tiny_tokenizer, bits):
    """The quantized layers' bytes on disk are bits/16 of fp16, plus one scale and zero per group."""
    config = QuantConfig(method="rtn", wbits=bits, group_size=64)
    out = save_packed(quantized("opt", config, tiny_tokenizer), config, tmp_path / "q")
    tensors = read(out / "model.safetensors")
    packed = sum(t.numel() for k, t in tensors.items() if k.endswith(".qweight"))
    weights = 2 * (4 * 64 * 64 + 2 * 64 * 128)  # two OPT blocks: q, k, v, out (64x64), fc1, fc2 (64x128)
    assert packed == weights * bits // 8


def test_existing_output_needs_overwrite(tmp_path, tiny_tokenizer):
    config = QuantConfig(method="rtn", wbits=4)
    loaded = quantized("llama", config, tiny_tokenizer)
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        save_packed(loaded, config, target)
    assert (target / "keep.txt").read_text() == "mine"
    save_packed(loaded, config, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["float weights", "not quantized", "bad dtype"])
def test_bad_requests_write_nothing(tmp_path, tiny_tokenizer, case):
    config = QuantConfig(method="rtn", wbits=4, group_size=32)
    loaded = LoadedModel(make_tiny_model("llama"), tiny_tokenizer, adapter_for("llama"), "tiny")  # never quantized
    kwargs = {}
    if case == "float weights":
        config, message = QuantConfig(method="rtn", wbits=16, abits=8), "nothing to pack"
    elif case == "not quantized":
        message = r"model.layers.0.self_attn.q_proj is not on a 4-bit grid"
    else:
        quantize(loaded, config)
        kwargs, message = {"dtype": torch.int8}, "float16, bfloat16 or float32"
    with pytest.raises(LowbitError, match=message):
        save_packed(loaded, config, tmp_path / "q", **kwargs)
    assert list(tmp_path.iterdir()) == []
