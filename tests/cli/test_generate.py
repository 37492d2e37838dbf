"""generate / bench / export / quantize --format on tiny models, CPU: our loop against HF's, every source kind."""

import json

import pytest
import torch
from conftest import make_tiny_model

from lowbit import load_model
from lowbit.cli import main
from lowbit.generate import GenerateOptions, generate


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with weights large enough that greedy decoding does not repeat one token forever."""
    model = make_tiny_model("llama", seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path_factory.mktemp("lively")
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory, lively_dir):
    """The same W4A16g32 RTN result saved fake-quant and packed, through the CLI."""
    root = tmp_path_factory.mktemp("q")
    for fmt in ("fake", "packed"):
        assert main(["-q", "quantize", "--model", str(lively_dir), "--wbits", "4", "--group-size", "32",
                     "--format", fmt, "--output", str(root / fmt), "--device", "cpu"]) == 0
    return root / "fake", root / "packed"


def test_greedy_matches_hf_generate_and_streams_the_same_text(lively_dir):
    loaded = load_model(lively_dir)
    pieces = []
    ours = generate(loaded.model, loaded.tokenizer, "The history of", GenerateOptions(max_new_tokens=24,
                    stop_at_eos=False), on_text=pieces.append)
    ids = loaded.tokenizer("The history of", return_tensors="pt").input_ids
    ref = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert list(ours.token_ids) == ref[0, ids.shape[1]:].tolist()
    assert len(set(ours.token_ids)) > 3  # a real continuation, not one token repeated
    assert len(pieces) > 1 and "".join(pieces) == ours.text


def test_sampling_is_seeded(lively_dir):
    loaded = load_model(lively_dir)

    def run(seed):
        options = GenerateOptions(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=seed, stop_at_eos=False)
        return generate(loaded.model, loaded.tokenizer, "It was", options).token_ids

    assert run(1) == run(1) != run(2)


def test_packed_and_fake_quant_generate_the_same_tokens(quantized_dirs):
    fake, packed = quantized_dirs
    outs = []
    for directory in (fake, packed):
        loaded = load_model(directory)
        outs.append(generate(loaded.model, loaded.tokenizer, "In 1905 the", GenerateOptions(max_new_tokens=12,
                                                                                            stop_at_eos=False)))
    assert type(load_model(packed).model.model.layers[0].mlp.up_proj).__name__ == "PackedLinear"
    assert outs[0].token_ids == outs[1].token_ids


def test_cli_generate_streams_to_stdout(capsys, quantized_dirs):
    assert main(["-q", "generate", "--model", str(quantized_dirs[1]), "--prompt", "The", "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


def test_prompt_longer_than_context_is_one_line_and_prints_nothing(capsys, lively_dir):
    rc = main(["-q", "generate", "--model", str(lively_dir), "--prompt", "word " * 600, "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [
        line for line in captured.err.strip().splitlines() if line.startswith("lowbit: error: the prompt is")]
    assert "the model's context is 512 tokens" in captured.err


def test_cli_bench_reports_both_models(tmp_path, capsys, quantized_dirs, lively_dir):
    for source in (str(quantized_dirs[1]), str(lively_dir)):
        out = tmp_path / "bench.json"
        assert main(["-q", "bench", "--model", source, "--prompt-len", "16", "--decode-tokens", "4",
                     "--batch-sizes", "1,2", "--warmup", "0", "--repeats", "1", "--device", "cpu",
                     "--group-size", "32", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        models = {r["model"] for r in rows}
        assert len(models) == 2 and any("float" in m for m in models)
        decode = [r for r in rows if r["metric"] == "decode_tokens_per_s"]
        assert {r["batch"] for r in decode} == {1, 2} and all(r["value"] > 0 for r in decode)
        assert "| decode_tokens_per_s |" in capsys.readouterr().out


def test_cli_export_all_formats_and_refusals(tmp_path, capsys, quantized_dirs):
    fake, packed = quantized_dirs
    for fmt in ("lowbit", "gptq", "compressed-tensors"):
        assert main(["-q", "export", "--model", str(fake), "--format", fmt, "--output", str(tmp_path / fmt)]) == 0
        assert (tmp_path / fmt / "model.safetensors").is_file()
    # from a packed checkpoint too: the same GPTQ tensors
    assert main(["-q", "export", "--model", str(packed), "--format", "gptq", "--output", str(tmp_path / "g2")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "gptq" / "model.safetensors")), load_file(str(tmp_path / "g2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k.endswith(("qweight", "qzeros")))
    capsys.readouterr()
    assert main(["-q", "export", "--model", str(packed), "--format", "lowbit", "--output", str(tmp_path / "x")]) == 2
    assert "already a lowbit packed checkpoint" in capsys.readouterr().err
    assert main(["-q", "export", "--model", str(fake), "--format", "gptq", "--output", str(tmp_path / "gptq")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_quantize_packed_refuses_float_weights_before_loading(tmp_path, capsys):
    rc = main(["-q", "quantize", "--wbits", "16", "--abits", "8", "--format", "packed", "--output", str(tmp_path / "o")])
    assert rc == 2 and "--format packed stores integer weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("batch", [1, 3])
def test_static_cache_decode_step_matches_hf_greedy(lively_dir, batch):
    """The step the GPU benchmark captures in a CUDA graph (static cache, 4-D mask, device-side position), run
    eagerly: the same greedy tokens as transformers' own generate, also after a rewind."""
    from lowbit.bench import GraphDecoder

    loaded = load_model(lively_dir)
    prompt = torch.randint(0, 384, (batch, 10), generator=torch.Generator().manual_seed(batch))
    ref = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    decoder = GraphDecoder(loaded.model, prompt, decode_tokens=8, capture=False)
    for _ in range(2):
        tokens = [decoder.token.clone()]
        for _ in range(8):
            decoder.decode(1)
            tokens.append(decoder.token.clone())
        assert torch.equal(torch.cat(tokens, 1), ref[:, 10:])
        decoder.rewind()


def test_random_llama_packed_by_rtn_matches_fake_quant_and_benches():
    """The benchmark's model builder and in-place packer on CPU sizes: packing equals RTN fake quantization."""
    import copy

    from lowbit import QuantConfig, quantize
    from lowbit.bench import BenchOptions, bench_pair
    from lowbit.export.inplace import pack_rtn, random_llama
    from lowbit.models.loading import LoadedModel
    from lowbit.models.registry import adapter_for

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=384, max_position_embeddings=128)
    model = random_llama("cpu", torch.float32, seed=0, **tiny)
    assert torch.equal(model.model.embed_tokens.weight, random_llama("cpu", torch.float32, seed=0, **tiny)
                       .model.embed_tokens.weight)  # seeded
    fake = quantize(LoadedModel(copy.deepcopy(model), None, adapter_for("llama"), "r"),
                    QuantConfig(wbits=4, group_size=32)).model
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    options = BenchOptions(prompt_len=8, decode_tokens=3, batch_sizes=(1,), warmup=0, repeats=1)
    fp, w4 = bench_pair(model, options, lambda m: pack_rtn(m, 4, 32), ("fp", "w4"))
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "PackedLinear"
    with torch.no_grad():
        assert (model(ids).logits - fake(ids).logits).abs().max() < 1e-4
    assert w4.weight_bytes < fp.weight_bytes and fp.decode_tokens_per_s[1] > 0 and w4.prefill_tokens_per_s[1] > 0
