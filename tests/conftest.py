"""Shared fixtures: a tiny byte-level BPE tokenizer trained on shipped text, and tiny random models."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Without a GPU, Triton kernels only ever run in its interpreter. Triton's own library functions (tl.randint,
    # tl.sum, ...) are themselves @triton.jit and are interpreted only if TRITON_INTERPRET is set before triton is
    # first imported; the per-module reloads of ``triton_path`` cannot fix those afterwards.
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 384


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data.texts import calibration_text

    lines = calibration_text("wikitext2").splitlines()[:3000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(arch: str):
    """A 2-block random config of each supported family; the Llama one uses GQA (4 query / 2 KV heads)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)
    if arch == "llama":
        return LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(intermediate_size=128, num_key_value_heads=2, sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if arch == "opt":
        return OPTConfig(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def tiny_loaded(arch: str, tokenizer):
    """A tiny model of ``arch`` as ``load_model`` would hand it over (adapter attached)."""
    from lowbit.models.loading import LoadedModel
    from lowbit.models.registry import adapter_for

    model = make_tiny_model(arch)
    return LoadedModel(model, tokenizer, adapter_for(model.config.model_type), arch)


def randomise_transforms(calib, gen: torch.Generator) -> None:
    """Push every transform far from identity while keeping matrices strictly diagonally dominant."""
    with torch.no_grad():
        for t in calib.transforms.values():
            t.set_epoch(4, 5)  # the last epoch: the mask's band is fully open
            t.log_scale.add_((torch.rand(t.log_scale.shape, generator=gen) * 1.5 + 0.5).log())
            if t.offdiag is not None:
                n, b, _ = t.offdiag.shape
                t.offdiag.add_((torch.rand(n, b, b, generator=gen) - 0.5) * 2 / b)
            if t.shift is not None:
                t.shift.add_(torch.randn(t.shift.shape, generator=gen))
            assert t.dominance_margin() > 0


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Save a tiny model of ``arch`` (with tokenizer) as an HF safetensors directory; cached per arch."""
    cache: dict[str, object] = {}

    def build(arch: str = "llama"):
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_tiny_model(arch).save_pretrained(path, safe_serialization=True)
            tiny_tokenizer.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return build


def kernel_device() -> str:
    """Where the kernel tests run: CUDA when present, else the CPU (through Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_path():
    """A function that switches ``lowbit.kernels`` modules to Triton for the rest of the test module.

    Without CUDA, Triton's interpreter must be on when a kernel is *defined*, so the modules are (re)imported after
    ``TRITON_INTERPRET=1`` is set. ``autotune=False`` pins one launch configuration per kernel (fast CPU tests).
    Returns the device the tests should use.
    """
    with pytest.MonkeyPatch.context() as mp:

        def enable(*modules: str, autotune: bool = True) -> str:
            mp.setenv("LOWBIT_KERNELS", "triton")
            if not autotune:
                mp.setenv("LOWBIT_AUTOTUNE", "0")
            if not torch.cuda.is_available():
                mp.setenv("TRITON_INTERPRET", "1")
                for name in modules:
                    importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
            return kernel_device()

        yield enable


# |W4A16 kernel - float32 truth| <= W4A16_TOL * (|x| @ |W|.T): accumulation order, 16-bit scales, output rounding
W4A16_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_w4a16_close(y, x, weight, bias=None):
    """A W4A16 kernel's output against ``F.linear(x, weight.dequantize(), bias)`` in float32, within W4A16_TOL."""
    dense = weight.dequantize()
    truth = torch.nn.functional.linear(x.float(), dense, None if bias is None else bias.float())
    bound = W4A16_TOL[x.dtype] * (x.float().abs() @ dense.abs().T) + 1e-6
    assert y.dtype == x.dtype and y.shape == truth.shape
    excess = ((y.float() - truth).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"
