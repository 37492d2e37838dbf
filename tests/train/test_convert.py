"""convert(): which layers are swapped, outputs stay close, bad widths refused before anything changes."""

import copy

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train import QuantTrainLinear, TrainQuantConfig, convert, quantized_layers


def _ids(seed=0, batch=2, seqlen=32):
    return torch.randint(0, 384, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_convert_swaps_linears_but_keeps_head(arch):
    model = make_tiny_model(arch)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    convert(model, TrainQuantConfig())
    layers = quantized_layers(model)
    assert len(layers) == n_linear - 1
    assert type(model.lm_head) is nn.Linear
    assert all(not name.endswith("lm_head") for name in layers)


def test_conversion_keeps_outputs_close():
    model = make_tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        q4 = convert(copy.deepcopy(model), TrainQuantConfig())
        q8 = convert(copy.deepcopy(model), TrainQuantConfig(bits=8, backward="int8"))
        e4, e8 = _rel(q4(ids).logits, ref), _rel(q8(ids).logits, ref)
    # 4-bit everywhere in a 2-block random model: ~10-20% logit error; 8-bit: ~1%
    assert e4 < 0.35 and e8 < 0.03 and e8 < e4 / 5
    # the argmax prediction mostly survives 4-bit conversion
    with torch.no_grad():
        agree = (q4(ids).logits.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.8


def test_keep_is_configurable():
    model = make_tiny_model("llama")
    convert(model, TrainQuantConfig(keep=("model.layers.0.mlp.*",)))
    assert isinstance(model.lm_head, QuantTrainLinear)  # tied to the embedding: same Parameter object
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantTrainLinear)


def test_untileable_layer_refused_and_model_untouched():
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10), nn.Linear(10, 10))
    with pytest.raises(LowbitError, match=r"width 100 of 2; use block_size in \(4\)|width 100 of 2"):
        convert(model, TrainQuantConfig(keep=("3",)))
    assert not quantized_layers(model)
    convert(model, TrainQuantConfig(keep=("3",), pad=True))
    assert quantized_layers(model)["2"]._pad == 28


def test_convert_twice_and_nothing_to_convert():
    model = convert(make_tiny_model("llama"))
    with pytest.raises(LowbitError, match="only once"):
        convert(model)
    with pytest.raises(LowbitError, match="no nn.Linear"):
        convert(nn.Sequential(nn.Linear(8, 8)), TrainQuantConfig(keep=("0",)))


def test_converted_model_trains_and_autocast():
    model = convert(make_tiny_model("llama").train(), TrainQuantConfig(seed=3))
    ids = _ids(1, batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.3
    steps = [m.act_step for m in quantized_layers(model).values()]
    assert all(s.grad is not None and torch.isfinite(s.grad) for s in steps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
