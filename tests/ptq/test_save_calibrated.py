"""A calibrated model with online transforms survives save → load with identical logits."""

import json

import torch

from lowbit import QuantConfig, load_model, quantize, save_quantized


def test_online_transforms_are_saved_and_reloaded(tmp_path, tiny_tokenizer, tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama"))
    config = QuantConfig(method="affinequant", wbits=4, abits=8, nsamples=2, seqlen=32, epochs=1, norm_matrices=True)
    quantize(loaded, config, progress=False)
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        expected = loaded.model(ids).logits
    out = save_quantized(loaded, config, tmp_path / "q", save_dtype=torch.float32)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["online_ops"] == [f"model.layers.{b}.{n}" for b in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")]
    assert (out / "calibration_log.json").is_file() and (out / "calibration_loss.png").stat().st_size > 1000
    again = load_model(out)
    with torch.no_grad():
        got = again.model(ids).logits
    assert torch.equal(got, expected)
