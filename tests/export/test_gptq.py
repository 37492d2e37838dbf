"""GPTQ export, checked against the format's reference unpacking code.

No GPTQ loader installs on this CPU-only torch: transformers 5 loads GPTQ through optimum + gptqmodel, and
gptqmodel 7.7 needs torch >= 2.14.1 and pulls CUDA wheels. So the layout is read back with a transcription of
GPTQModel 7.7.0's own code: ``convert_gptq_v1_to_v2_format_module`` (gptqmodel/utils/model.py: v1 qzeros plus
``0b00010001000100010001000100010001``) then ``BaseQuantLinear.dequantize_weight`` for 4 bits
(gptqmodel/nn_modules/qlinear/__init__.py: shift-and-mask unpacking of qzeros along columns and qweight along
rows, ``weight = scales[g_idx] * (weight - zeros[g_idx])``), and the logits of the rebuilt model compared with ours.
"""

import copy
import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

from lowbit import LowbitError, QuantConfig, quantize
from lowbit.export.gptq import save_gptq
from lowbit.export.w4a16 import w4a16_layers
from lowbit.models.loading import LoadedModel
from lowbit.models.registry import adapter_for


def quantized_tiny(config: QuantConfig, seed: int = 0) -> LoadedModel:
    """A tiny Llama with weights large enough that every layer matters, quantized with ``config``."""
    model = make_tiny_model("llama", seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name else torch.randn(param.shape, generator=generator) * 0.2)
    loaded = LoadedModel(model, None, adapter_for("llama"), "tiny")
    return quantize(loaded, config)


def stored_twin(loaded: LoadedModel, config: QuantConfig, fp16_weights: bool) -> torch.nn.Module:
    """Our model with exactly the rounding of the export: fp16 scales and float tensors, same codes; with
    ``fp16_weights`` also the weights rounded to fp16, as a loader that dequantizes in the scales' dtype does."""
    twin = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for param in twin.parameters():
            param.copy_(param.half().float())
        for name, _, codes in w4a16_layers(loaded.model, config):
            half = copy.copy(codes)
            object.__setattr__(half, "scales", codes.scales.half().float())
            weight = half.dequantize()
            twin.get_submodule(name).weight.copy_(weight.half().float() if fp16_weights else weight)
    return twin


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits=4):
    """GPTQModel 7.7.0, v1 checkpoint -> v2 in memory -> ``dequantize_weight`` (4-bit path), transcribed."""
    qzeros = qzeros + 0b00010001000100010001000100010001  # convert_gptq_v1_to_v2_format_module, bits == 4
    pack_factor, maxq = 32 // bits, 2**bits - 1
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, pack_factor), wf.unsqueeze(0))
    zeros = torch.bitwise_and(zeros, maxq).reshape(qzeros.shape[0], -1)[:, : scales.shape[1]]
    weight = torch.bitwise_and(
        torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, pack_factor, -1), wf.unsqueeze(-1)), maxq)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    g = g_idx.long()
    return scales[g].float() * (weight - zeros[g]).float()  # (in, out): the transposed linear weight


def rebuild(directory) -> torch.nn.Module:
    """The exported model with every GPTQ layer dequantized by the reference code, as a plain HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(directory / "model.safetensors"))
    state = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            layer = key.removesuffix(".qweight")
            state[f"{layer}.weight"] = gptqmodel_dequantize(
                value, tensors[f"{layer}.qzeros"], tensors[f"{layer}.scales"], tensors[f"{layer}.g_idx"]).t()
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("symmetric,group_size", [(True, 32), (False, 32), (False, None)])
def test_reference_unpacking_gives_our_logits(tmp_path, symmetric, group_size):
    from transformers import GPTQConfig

    config = QuantConfig(wbits=4, group_size=group_size, weight_symmetric=symmetric)
    loaded = quantized_tiny(config)
    out = save_gptq(loaded, config, tmp_path / "gptq")
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta == {**meta, "quant_method": "gptq", "bits": 4, "group_size": group_size or -1, "desc_act": False,
                    "sym": symmetric, "checkpoint_format": "gptq"}
    GPTQConfig.from_dict(meta)  # transformers accepts the block as a GPTQ config
    tensors = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.qweight"].dtype == torch.int32 and tensors[f"{q}.qweight"].shape == (64 // 8, 64)
    assert tensors[f"{q}.qzeros"].shape == (64 // (group_size or 64), 64 // 8)
    assert tensors[f"{q}.scales"].dtype == torch.float16 and tensors[f"{q}.g_idx"].dtype == torch.int32
    got = logits(rebuild(out))
    exact = (got - logits(stored_twin(loaded, config, fp16_weights=False))).abs().max().item()
    vs_ours = (got - logits(loaded.model)).abs().max().item()
    print(f"gptq sym={symmetric} g={group_size}: max |diff| {exact:.2e} against the same stored rounding, "
          f"{vs_ours:.2e} against our float32 model")
    assert exact < 1e-4
    assert vs_ours < 0.05


def test_zero_point_zero_is_shifted_when_exact_and_refused_otherwise(tmp_path):
    """GPTQ v1 stores zero - 1 in 4 bits, so a zero point of 0 does not fit; codes 0..9 leave room to shift."""
    config = QuantConfig(wbits=4, group_size=32)
    loaded = quantized_tiny(config)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[0, :32] = (torch.arange(32) % 10) * 0.01  # all >= 0: zero point 0, codes 0..9
    out = save_gptq(loaded, config, tmp_path / "ok")
    got = logits(rebuild(out))
    assert (got - logits(stored_twin(loaded, config, fp16_weights=False))).abs().max() < 1e-4
    with torch.no_grad():
        q_proj.weight[0, :32] = (torch.arange(32) % 16) * 0.01  # zero point 0 with codes 0..15: no room
    with pytest.raises(LowbitError, match="zero point outside 1..15.*compressed-tensors"):
        save_gptq(loaded, config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_refuses_w4a4(tmp_path):
    config = QuantConfig(wbits=4, abits=4, group_size=32)
    with pytest.raises(LowbitError, match="GPTQ export is for W4A16 results; W4A4g32"):
        save_gptq(quantized_tiny(config), config, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
