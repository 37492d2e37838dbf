"""GraphedTrainStep: eager fallback equals a hand-written step (CPU); on CUDA the captured step equals the eager one
for a float model, follows a scheduler, refuses new shapes, and draws new random numbers on every replay."""

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train import TrainQuantConfig, convert
from lowbit.train.graphs import GraphedTrainStep, GraphStepConfig, layer_generators, make_capturable


def _model(device="cpu", quant=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).to(device)
    if quant:
        convert(model, TrainQuantConfig(seed=seed, block_size=32))
    return model


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x).float(), y)


def _batches(n, device="cpu", rows=48):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 64, generator=gen).to(device), torch.randn(rows, 32, generator=gen).to(device))
            for _ in range(n)]


@pytest.mark.parametrize("quant", [False, True])
def test_eager_fallback_is_a_plain_training_step(quant):
    a, b = _model(quant=quant), _model(quant=quant)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    step = GraphedTrainStep(a, opt_a, _loss, GraphStepConfig(clip_norm=0.5, autocast_dtype=None))
    for x, y in _batches(4):
        got = step(x, y)
        opt_b.zero_grad(set_to_none=True)
        want = _loss(b, x, y)
        want.backward()
        nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        opt_b.step()
        assert torch.equal(got, want.detach())
    assert not step.captured  # nothing is captured off CUDA
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bad_config_and_inputs():
    with pytest.raises(LowbitError, match="warmup_steps"):
        GraphStepConfig(warmup_steps=0)
    with pytest.raises(LowbitError, match="clip norm"):
        GraphStepConfig(clip_norm=0.0)
    model = _model()
    step = GraphedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), _loss)
    with pytest.raises(LowbitError, match="input tensors"):
        step()


def test_eager_non_finite_loss_refused_before_the_update():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    step = GraphedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, x: m(x).sum() * float("nan"),
                            GraphStepConfig(autocast_dtype=None, check_finite=True))
    with pytest.raises(LowbitError, match="loss became nan at step 1"):
        step(_batches(1)[0][0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_make_capturable_needs_a_fresh_optimizer():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    make_capturable(opt, "cpu")  # off CUDA: nothing to change
    assert not isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    GraphedTrainStep(model, opt, _loss, GraphStepConfig(autocast_dtype=None))(*_batches(1)[0])
    with pytest.raises(LowbitError, match="fresh optimizer"):
        make_capturable(opt, "cpu")


def test_layer_generators_are_the_layers_own():
    model = _model(quant=True)
    gens = layer_generators(model, torch.device("cpu"))
    assert len(gens) == 2 and gens[0] is model[0].generator("cpu") and gens[0] is not gens[1]


def _cuda_run(quant, graph, steps=8, lr_factor=None, repeat=False):
    model = _model("cuda", quant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    make_capturable(opt, "cuda")  # in both runs: capturable AdamW rounds differently from the default one
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor or (lambda s: 1.0 / (1 + s)))
    step = GraphedTrainStep(model, opt, _loss, GraphStepConfig(warmup_steps=2, enabled=graph))
    losses = []
    for x, y in _batches(1, "cuda") * steps if repeat else _batches(steps, "cuda"):
        losses.append(float(step(x, y)))
        sched.step()
    return model, step, losses


@pytest.mark.gpu
def test_captured_float_step_equals_eager_with_a_schedule():
    eager, _, eager_losses = _cuda_run(quant=False, graph=False)
    graphed, step, graphed_losses = _cuda_run(quant=False, graph=True)
    assert step.captured and step.calls == 8
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_capture_refuses_an_uncapturable_optimizer_and_warns_of_float_rates():
    model = _model("cuda", quant=True)
    assert model[0].generator("cuda") is model[0].generator(torch.device("cuda", torch.cuda.current_device()))
    step = GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-2), _loss, GraphStepConfig(warmup_steps=1))
    x, y = _batches(1, "cuda")[0]
    step(x, y)
    for _ in range(2):  # refused at capture, and again without recording anything
        with pytest.raises(LowbitError, match="make_capturable"):
            step(x, y)
    sgd = GraphedTrainStep(model, torch.optim.SGD(model.parameters(), lr=1e-2), _loss, GraphStepConfig(warmup_steps=1))
    sgd(x, y)
    with pytest.warns(UserWarning, match="Python float"):
        sgd(x, y)
    assert sgd.captured


@pytest.mark.gpu
def test_captured_step_refuses_a_new_shape():
    _, step, _ = _cuda_run(quant=False, graph=True, steps=3)
    x, y = _batches(1, "cuda", rows=16)[0]
    with pytest.raises(LowbitError, match="shape"):
        step(x, y)


@pytest.mark.gpu
def test_captured_quantized_step_draws_new_noise_each_replay():
    # learning rate 0 after capture: the parameters stay put, so two replays on one batch differ only by the
    # backward's random draws (bit split, sampling), which a graph would freeze if the layer generators were not
    # registered
    model, step, losses = _cuda_run(quant=True, graph=True, steps=3, lr_factor=lambda s: 0.0)
    x, y = _batches(1, "cuda")[0]
    step(x, y)
    first = model[0].weight.grad.clone()
    step(x, y)
    second = model[0].weight.grad.clone()
    assert torch.isfinite(first).all() and not torch.equal(first, second)
    # same seeds, same draws: a second run repeats the first bit for bit
    _, _, again = _cuda_run(quant=True, graph=True, steps=3, lr_factor=lambda s: 0.0)
    assert again == losses


@pytest.mark.gpu
def test_captured_quantized_step_trains_like_eager():
    # one batch over and over, a constant learning rate: the loss must fall, in both runs alike
    _, _, eager = _cuda_run(quant=True, graph=False, steps=12, lr_factor=lambda s: 1.0, repeat=True)
    _, step, graphed = _cuda_run(quant=True, graph=True, steps=12, lr_factor=lambda s: 1.0, repeat=True)
    assert step.captured
    assert graphed[:2] == pytest.approx(eager[:2], rel=1e-5)  # the warm-up steps are eager in both runs
    assert eager[-1] < 0.8 * eager[0] and graphed[-1] < 0.8 * graphed[0]
    assert abs(graphed[-1] - eager[-1]) < 0.1 * eager[0]
