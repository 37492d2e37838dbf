"""save_packed → load_quantized gives the fake-quant model's logits with packed weights, and refuses bad files."""

import json
import os

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file

from lowbit import QuantConfig, load_model, quantize, save_quantized
from lowbit.errors import LowbitError
from lowbit.export import PackedLinear, load_quantized, packed_weight_bytes, save_packed
from lowbit.models.loading import LoadedModel
from lowbit.models.registry import adapter_for

# float32 storage: the packed model multiplies by (code - zero) * scale, the fake-quant model by that same value
# rounded once to float32. Measured max |logit difference| (logits up to ~1.2): 0 on the kernels' references,
# at most 6e-7 with the Triton kernels on the CPU interpreter (LOWBIT_KERNELS=triton TRITON_INTERPRET=1)
ATOL = 2e-5
CONFIGS = [
    QuantConfig(method="rtn", wbits=4),  # W4A16, per channel
    QuantConfig(method="rtn", wbits=3, group_size=32),  # W3A16g32 (tiny widths are 64 and 128)
    QuantConfig(method="rtn", wbits=2, group_size=32),  # W2A16g32
    QuantConfig(method="rtn", wbits=4, abits=4),  # W4A4
    QuantConfig(method="rtn", wbits=6, abits=6),  # W6A6
]


def ids(seed=0):
    return torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def quantized(arch, config, tokenizer):
    loaded = LoadedModel(make_tiny_model(arch), tokenizer, adapter_for(arch), f"tiny-{arch}")
    return quantize(loaded, config, progress=False)


def snapshot(directory):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_rtn_round_trip_matches_fake_quant(tmp_path, tiny_tokenizer, arch, config):
    loaded = quantized(arch, config, tiny_tokenizer)
    expected = logits(loaded.model, ids())
    again = load_quantized(save_packed(loaded, config, tmp_path / "q", dtype=torch.float32))
    packed = [m for m in again.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * len(adapter_for(arch).linears)
    assert all(m.qweight.dtype == torch.uint8 for m in packed)
    assert (packed[0].act_bits is None) == (config.act_spec is None)
    assert again.quant_config == config
    diff = (logits(again.model, ids()) - expected).abs().max()
    print(f'MEASURED {arch} {config.name} {float(diff):.3g}')
    assert diff <= ATOL


@pytest.mark.parametrize("arch, config", [
    ("llama", QuantConfig(method="affinequant", wbits=4, abits=4, nsamples=2, seqlen=32, epochs=1, norm_matrices=True)),
    ("opt", QuantConfig(method="omniquant", wbits=3, group_size=32, nsamples=2, seqlen=32, epochs=1)),
], ids=["affinequant-llama-W4A4", "omniquant-opt-W3A16g32"])
def test_calibrated_round_trip(tmp_path, tiny_model_dir, arch, config):
    """Learnt clipping, merged transforms and (AffineQuant) online norm matrices all survive packing."""
    loaded = load_model(tiny_model_dir(arch))
    quantize(loaded, config, progress=False)
    expected = logits(loaded.model, ids(1))
    out = save_packed(loaded, config, tmp_path / "q", dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert bool(meta["online_ops"]) == (config.method == "affinequant")
    again = load_quantized(out)
    diff = (logits(again.model, ids(1)) - expected).abs().max()
    print(f'MEASURED {arch} {config.method} {float(diff):.3g} {float(expected.abs().max()):.3g}')
    assert diff <= ATOL


def test_half_storage_rounds_only_the_float_tensors(tmp_path, tiny_tokenizer):
    config = QuantConfig(method="rtn", wbits=4, group_size=32)
    loaded = quantized("opt", config, tiny_tokenizer)
    out = save_packed(loaded, config, tmp_path / "q")  # float16 by default
    quantized_names = {f"{n}.weight" for n in json.loads((out / "quantization.json").read_text())["weights"]["layers"]}
    with torch.no_grad():  # the fake-quant model with every other tensor (biases included) rounded to fp16
        for name, p in loaded.model.named_parameters():
            if name not in quantized_names:
                p.copy_(p.half().float())
    again = load_quantized(out, dtype=torch.float32)
    assert (logits(again.model, ids()) - logits(loaded.model, ids())).abs().max() <= ATOL


def test_w4a16_memory_stays_packed(tmp_path, tiny_tokenizer):
    """Per channel, the scale and zero point cost 8 bytes a row: at width 256 that is 0.25 + 8 / 512 of fp16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True), dtype=torch.float32)
    config = QuantConfig(method="rtn", wbits=4)
    loaded = quantize(LoadedModel(wide, tiny_tokenizer, adapter_for("llama"), "wide"), config)
    again = load_quantized(save_packed(loaded, config, tmp_path / "q"), dtype=torch.float16)
    sizes = packed_weight_bytes(again.model)
    linear_weights = 4 * 256 * 256 - 2 * 256 * 128 + 3 * 256 * 512  # q, o 256x256; k, v 128x256; MLP 3 x 256x512
    assert sizes.quantized_layers == 7 and sizes.quantized_fp16 == 2 * linear_weights
    assert sizes.ratio <= 0.27 and sizes.embeddings == 384 * 256 * 2  # tied lm_head counted once
    assert not any(p.dim() == 2 and p.shape[0] * p.shape[1] >= 128 * 256 for n, p in again.model.named_parameters()
                   if "embed" not in n)  # no float copy of any quantized weight
    assert sizes.total == sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                               for t in [*again.model.parameters(), *again.model.buffers()]}.values())


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    config = QuantConfig(method="rtn", wbits=4, group_size=32)
    out = tmp_path_factory.mktemp("packed") / "q"
    return save_packed(quantized("llama", config, tiny_tokenizer), config, out)


def corrupt_copy(saved, tmp_path, edit):
    import shutil

    target = tmp_path / "bad"
    shutil.copytree(saved, target)
    edit(target)
    return target


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])


def newer_version(d):
    meta = json.loads((d / "quantization.json").read_text())
    meta.update(format_version=99, lowbit_version="9.0")
    (d / "quantization.json").write_text(json.dumps(meta))


def edit_tensors(change):
    def edit(d):
        tensors = load_file(d / "model.safetensors")
        change(tensors)
        save_file(tensors, d / "model.safetensors")
    return edit


def reshape_scales(t):
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:, :1].contiguous()


def halve_scales(t):
    t["model.layers.1.self_attn.o_proj.scales"] = t["model.layers.1.self_attn.o_proj.scales"].half()


def negate_scale(t):
    t["model.layers.0.self_attn.k_proj.scales"][3, 1] = -1.0


def narrow_norm(t):
    t["model.norm.weight"] = t["model.norm.weight"][:32].contiguous()


CORRUPTIONS = {
    "truncated": (truncate, r"model.safetensors is truncated or corrupt"),
    "newer version": (newer_version, r"written by lowbit 9.0 \(packed format 99\).*upgrade lowbit"),
    "edited shape": (edit_tensors(reshape_scales), r"up_proj.scales has shape \(128, 1\), the model config needs \(128, 2\)"),
    "float shape": (edit_tensors(narrow_norm), r"model.norm.weight has shape \(32,\), the model config needs \(64,\)"),
    "dtype": (edit_tensors(halve_scales), r"o_proj.scales is torch.float16, expected torch.float32"),
    "bad values": (edit_tensors(negate_scale), r"k_proj has non-positive or non-finite scales"),
    "missing": (edit_tensors(lambda t: t.pop("model.layers.1.mlp.gate_proj.zeros")), r"lacks 1 tensor.*gate_proj.zeros"),
    "extra": (edit_tensors(lambda t: t.update(stray=torch.zeros(1))), r"holds 1 tensor\(s\) this model does not have: stray"),
    "no metadata": (lambda d: (d / "quantization.json").unlink(), r"no quantization.json"),
    "other format": (lambda d: (d / "quantization.json").write_text('{"format": "lowbit-fake-quant"}'),
                     r"fake-quant .* load it with load_model"),
    "garbled json": (lambda d: (d / "quantization.json").write_text("{"), r"not valid JSON"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_one_clear_error_and_nothing_written(tmp_path, saved, case):
    edit, message = CORRUPTIONS[case]
    bad = corrupt_copy(saved, tmp_path, edit)
    before = snapshot(tmp_path)
    with pytest.raises(LowbitError, match=message) as err:
        load_quantized(bad)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_fake_quant_checkpoint_points_to_load_model(tmp_path, tiny_tokenizer):
    config = QuantConfig(method="rtn", wbits=4)
    out = save_quantized(quantized("llama", config, tiny_tokenizer), config, tmp_path / "fake")
    with pytest.raises(LowbitError, match="load it with load_model"):
        load_quantized(out)
    assert not os.path.exists(tmp_path / "packed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [QuantConfig(method="rtn", wbits=4, group_size=32),
                                    QuantConfig(method="rtn", wbits=4, abits=4)], ids=lambda c: c.name)
def test_cuda_kernels_match_cpu_reference(tmp_path, tiny_tokenizer, config):
    out = save_packed(quantized("llama", config, tiny_tokenizer), config, tmp_path / "q")
    cpu = logits(load_quantized(out, dtype=torch.float32).model, ids())
    gpu = load_quantized(out, device="cuda", dtype=torch.float16)
    assert all(m.qweight.is_cuda for m in gpu.model.modules() if isinstance(m, PackedLinear))
    got = logits(gpu.model, ids().cuda()).cpu()
    assert (got - cpu).abs().max() <= 0.05 * cpu.abs().max()  # fp16 activations against float32
