"""End-to-end scale tuning: it lowers the KL to the full-precision model, keeps every weight on its grid with the
same codes, saves and reloads, and refuses what it cannot do."""

import json

import pytest
import torch
from conftest import tiny_loaded

from lowbit import load_model
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.export.codes import extract_codes
from lowbit.export.packed import save_packed
from lowbit.models.saving import resolved_config, save_quantized
from lowbit.ptq import quantize


def config(method="rtn", **kw):
    base = dict(method=method, wbits=3, abits=16, group_size=16, nsamples=4, seqlen=32, epochs=1, seed=0)
    return QuantConfig(**{**base, **kw})


def block_codes(loaded, spec):
    return {f"{b} {n}": extract_codes(lin.weight.detach(), spec)
            for b, block in enumerate(loaded.adapter.blocks(loaded.model))
            for n, lin in loaded.adapter.block_linears(block).items()}


@pytest.mark.parametrize("arch, method", [("llama", "rtn"), ("opt", "rtn"), ("llama", "omniquant")])
def test_e2e_lowers_the_kl_and_keeps_the_codes(tiny_tokenizer, arch, method):
    plain, tuned = tiny_loaded(arch, tiny_tokenizer), tiny_loaded(arch, tiny_tokenizer)
    quantize(plain, config(method), progress=False)
    cfg = config(method, e2e_epochs=3, e2e_lr=1e-2)
    quantize(tuned, cfg, progress=False)
    log = tuned.e2e_log
    assert log.epoch_losses[-1] < log.loss_before and log.gains > 0
    before, after = block_codes(plain, cfg.weight_spec), block_codes(tuned, cfg.weight_spec)
    for name in before:  # same integers, new scales: the tuned weight is still exactly on a grid
        assert torch.equal(before[name].codes, after[name].codes), name
        assert torch.equal(before[name].zeros, after[name].zeros), name
    assert any(not torch.allclose(before[n].scales, after[n].scales) for n in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e2e_tunes_a_half_precision_model_in_float32_and_restores_it(tiny_tokenizer, dtype):
    """A half-precision model (what the CLI loads on CUDA) is tuned in float32 and handed back in its dtype, with
    the parameters that were frozen still frozen and the others trainable."""
    loaded = tiny_loaded("llama", tiny_tokenizer)
    loaded.model.to(dtype)
    frozen = loaded.model.get_input_embeddings().weight
    frozen.requires_grad_(False)
    quantize(loaded, config(e2e_epochs=2, e2e_lr=1e-2), progress=False)
    assert loaded.e2e_log.epoch_losses[-1] < loaded.e2e_log.loss_before
    assert {p.dtype for p in loaded.model.parameters()} == {dtype}
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in loaded.model.parameters() if p is not frozen)


def test_e2e_is_seeded_and_saves(tmp_path, tiny_tokenizer):
    cfg = config(e2e_epochs=1, e2e_lr=1e-2)
    a, b = tiny_loaded("llama", tiny_tokenizer), tiny_loaded("llama", tiny_tokenizer)
    quantize(a, cfg, progress=False)
    quantize(b, cfg, progress=False)
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = a.model(ids).logits
        assert torch.equal(b.model(ids).logits, want)
    assert cfg.label == "rtn+e2e"
    # packed: the kernels' reference dequantizes group by group, another float32 order (as in the rotation tests)
    for fmt, save, atol in (("fake", lambda d: save_quantized(a, cfg, d, save_dtype=torch.float32), 1e-4),
                            ("packed", lambda d: save_packed(a, cfg, d), 1e-3)):
        out = save(tmp_path / fmt)
        meta = json.loads((out / "quantization.json").read_text())
        assert (meta["config"]["e2e_epochs"], meta["config"]["e2e_lr"]) == (1, 1e-2)
        back = load_model(str(out))
        with torch.no_grad():
            torch.testing.assert_close(back.model(ids).logits, want, atol=atol, rtol=atol)


def test_e2e_is_refused_where_it_does_not_apply():
    with pytest.raises(LowbitError, match="weight-only"):
        config(abits=8, e2e_epochs=1)
    with pytest.raises(LowbitError, match="e2e-epochs"):
        config(e2e_epochs=-1)
    with pytest.raises(LowbitError, match="e2e-lr"):
        config(e2e_epochs=1, e2e_lr=0.0)
    assert "e2e_epochs" not in config().to_dict()  # a later field: older files and manifests stay as they were
    # a saved config records the rate it ran with, the default one included
    assert resolved_config(config(e2e_epochs=1), None)["e2e_lr"] == QuantConfig.e2e_lr
