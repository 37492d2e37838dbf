"""The sampled INT4 backward is unbiased: over many draws its mean converges to the exact gradient.

Statistic: with T draws, ``z = sum (mean - exact)^2 / sum (var / T)`` is about 1 for an unbiased estimator
(``var`` the per-element sample variance) and grows like ``T * bias^2 / var`` for a biased one. Each test also
runs a deliberately broken estimator (kept rows not divided by ``p``) through the same check and requires it to
fail, so the check demonstrably can fail.
"""

import copy

import pytest
import torch
from torch import nn

import lowbit.train.backward as bwd
from lowbit.train import QuantTrainLinear, TrainQuantConfig
from lowbit.train.sampling import RowSample, sample_rows

DRAWS = 300
BOUND = 1.5
SCALAR_BOUND = 6.63  # one element: z is chi-square with 1 dof when unbiased (its 99% quantile); 1.5 fails 22%


def z_statistic(draws: torch.Tensor, exact: torch.Tensor) -> float:
    mean, var = draws.mean(0), draws.var(0) / draws.shape[0]
    return float(((mean - exact) ** 2).sum() / var.sum())


def z_bound(draws: torch.Tensor) -> float:
    """99.9% bound of ``z_statistic`` for an unbiased estimator, never below BOUND.

    z is about chi-square over its effective degrees of freedom ``k = (sum var)^2 / sum var^2``: a vector whose
    variance sits in a few elements (per-channel LSQ steps) has a small ``k`` and a wide z, so the fixed 1.5
    fails unbiased draws (z -> 1 as draws grow: 1.99, 1.78, 0.79, 1.00 at 200..1600 draws for that case).
    The chi-square quantile is the Wilson-Hilferty approximation (z_0.999 = 3.090).
    """
    var = draws.var(0)
    k = float(var.sum() ** 2 / (var ** 2).sum().clamp_min(1e-30))
    quantile = k * (1 - 2 / (9 * k) + 3.090 * (2 / (9 * k)) ** 0.5) ** 3
    return max(BOUND, quantile / k)


def _draw(estimator, grad, operand, ratio, seed):
    """DRAWS independent estimates of one product from fresh bit splits and samples."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(DRAWS):
        rows, weight = bwd.split_rows(grad, gen)
        out.append(estimator(rows, weight, operand, ratio, gen, 4))
    return torch.stack(out)


def _draw_input(grad, qw, ratio, seed):
    return _draw(bwd.int4_grad_input, grad, qw, ratio, seed)


def _draw_weight(grad, qx, ratio, seed):
    return _draw(bwd.int4_grad_weight, grad, qx, ratio, seed)


def _without_reweighting(scores, ratio, generator):
    """The bug the negative controls plant: kept rows treated as if p = 1 (no 1/p)."""
    s = sample_rows(scores, ratio, generator)
    return RowSample(s.index, torch.ones_like(s.inv_p), torch.ones_like(s.p_kept))


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_grad_input_is_unbiased(ratio, monkeypatch):
    grad, qw, _ = bwd.heavy_tailed_problem(0)
    exact = grad @ qw
    assert z_statistic(_draw_input(grad, qw, ratio, 1), exact) < BOUND
    if ratio < 1:
        monkeypatch.setattr(bwd, "sample_rows", _without_reweighting)
        assert z_statistic(_draw_input(grad, qw, ratio, 1), exact) > 10 * BOUND


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_grad_weight_is_unbiased(ratio, monkeypatch):
    grad, _, qx = bwd.heavy_tailed_problem(1)
    exact = grad.T @ qx
    calls = []
    real_rq = bwd.requantize_rows
    monkeypatch.setattr(bwd, "requantize_rows", lambda *a: calls.append(1) or real_rq(*a))
    assert z_statistic(_draw_weight(grad, qx, ratio, 2), exact) < BOUND
    if ratio < 1:
        assert calls  # the re-quantized (p < 1) path really ran
        monkeypatch.setattr(bwd, "sample_rows", _without_reweighting)
        assert z_statistic(_draw_weight(grad, qx, ratio, 2), exact) > 10 * BOUND
    else:
        assert not calls  # sampling off: the forward's INT4 activations are used exactly


def relative_variance(draws, exact):
    return float(((draws - exact) ** 2).sum(dim=(1, 2)).mean() / (exact**2).sum())


def test_leverage_scores_beat_uniform_sampling(monkeypatch):
    """At the same expected row budget, water-filled leverage scores give less variance than uniform keep."""
    grad, qw, qx = bwd.heavy_tailed_problem(3)
    lss_in = relative_variance(_draw_input(grad, qw, 0.5, 4), grad @ qw)
    lss_w = relative_variance(_draw_weight(grad, qx, 0.5, 4), grad.T @ qx)
    monkeypatch.setattr("lowbit.train.sampling.waterfill", lambda s, m: torch.full_like(s, m / s.numel()))
    uni_in = relative_variance(_draw_input(grad, qw, 0.5, 4), grad @ qw)
    uni_w = relative_variance(_draw_weight(grad, qx, 0.5, 4), grad.T @ qx)
    assert lss_in < 0.5 * uni_in and lss_w < 0.5 * uni_w


def _layer_pair(config, seed=0, k=64, c=48, n=40):
    torch.manual_seed(seed)
    lin = nn.Linear(k, c)
    x = torch.randn(n, k) * torch.logspace(-1, 0.5, k)  # uneven channels
    exact = QuantTrainLinear(copy.deepcopy(lin), config.with_(backward="float"))
    sampled = QuantTrainLinear(copy.deepcopy(lin), config)
    exact.initialize(x)
    sampled.initialize(x)
    return exact, sampled, x


def _layer_grads(layer, x, target):
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    ((layer(x) - target) ** 2).sum().backward()
    grads = {"x": x.grad, "weight": layer.weight.grad, "weight_step": layer.weight_step.grad}
    if layer.act_step is not None:
        grads["act_step"] = layer.act_step.grad
    return grads


@pytest.mark.parametrize("granularity", ["tensor", "token_channel"])
def test_full_layer_gradients_are_unbiased(granularity):
    """Every gradient of the layer (input, weight, LSQ steps) averages to the exact STE gradient."""
    cfg = TrainQuantConfig(seed=5)
    if granularity != "tensor":
        cfg = cfg.with_(act_granularity="token", weight_granularity="channel")
    exact_layer, layer, x = _layer_pair(cfg)
    target = torch.randn(x.shape[0], 48, generator=torch.Generator().manual_seed(9))
    exact = _layer_grads(exact_layer, x, target)
    draws = [_layer_grads(layer, x, target) for _ in range(200)]
    for name, value in exact.items():
        stacked = torch.stack([d[name] for d in draws]).reshape(len(draws), -1)
        assert z_statistic(stacked, value.reshape(-1)) < (z_bound(stacked) if value.numel() > 1 else SCALAR_BOUND), name
    # bias gradient is exact (float)
    assert torch.allclose(layer.bias.grad, exact_layer.bias.grad, atol=1e-5)


def test_kernel_noise_keeps_the_backward_unbiased(monkeypatch):
    """With the kernels' counter-based (Philox) uniforms in place of torch.rand, for the bit split and grad-weight's
    re-quantization, both products stay unbiased (the kernel path draws these exact numbers)."""
    from lowbit.train import sampling

    monkeypatch.setattr(sampling, "uniform_noise", sampling.philox_noise)
    grad, qw, qx = bwd.heavy_tailed_problem(6)
    assert z_statistic(_draw_input(grad, qw, 0.5, 7), grad @ qw) < BOUND
    assert z_statistic(_draw_weight(grad, qx, 0.5, 8), grad.T @ qx) < BOUND
