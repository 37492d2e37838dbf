"""param_groups: LSQ steps in their own AdamW group (own lr, no decay), every parameter exactly once."""

import pytest
import torch
from conftest import make_tiny_model

from lowbit.errors import LowbitError
from lowbit.train import TrainQuantConfig, convert, quantized_layers
from lowbit.train.optim import DEFAULT_LSQ_LR_RATIO, lsq_parameters, param_groups, warmup_schedule


def test_groups_split_lsq_steps_and_cover_every_parameter_once():
    model = convert(make_tiny_model("llama"), TrainQuantConfig())
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["weights", "lsq_steps"]
    weights, steps = groups
    layers = quantized_layers(model).values()
    expected = {id(m.act_step) for m in layers} | {id(m.weight_step) for m in layers}
    assert {id(p) for p in steps["params"]} == expected and len(steps["params"]) == len(expected)
    assert steps["lr"] == pytest.approx(DEFAULT_LSQ_LR_RATIO * 1e-3) and steps["weight_decay"] == 0.0
    assert weights["lr"] == 1e-3 and weights["weight_decay"] == 0.1
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert param_groups(model, 1e-3, lsq_lr=5e-6)[1]["lr"] == 5e-6


def test_float_model_has_one_group_and_bad_values_refused():
    model = make_tiny_model("llama")
    assert [g["name"] for g in param_groups(model, 1e-3)] == ["weights"]
    assert lsq_parameters(model) == []
    for kwargs in ({"lr": 0}, {"lr": 1e-3, "lsq_lr": -1.0}, {"lr": 1e-3, "weight_decay": -0.1}):
        with pytest.raises(LowbitError, match="must be"):
            param_groups(model, **kwargs)


def test_adam_moves_steps_by_their_own_lr():
    """Adam's first update is about lr in size whatever the gradient: the step moves by lsq_lr, not lr."""
    model = convert(make_tiny_model("llama"), TrainQuantConfig(backward="float"))
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids)  # first-batch init of the steps
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, lsq_lr=1e-5))
    before = [p.detach().clone() for p in lsq_parameters(model)]
    model(ids, labels=ids).loss.backward()
    opt.step()
    moved = torch.stack([(p.detach() - b).abs().max() for p, b in zip(lsq_parameters(model), before)])
    assert float(moved.max()) <= 1.01e-5 and float(moved.max()) > 0.5e-5


def test_warmup_schedule_shapes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_schedule(opt, steps=10, decay="linear")
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5) and lrs == sorted(lrs, reverse=True)
    with pytest.raises(LowbitError, match="decay"):
        warmup_schedule(opt, 10, decay="step")
