import torch
from torch import nn

from lowbit.quant.fake_quant import QuantLinear
from lowbit.quant.quantizer import QuantSpec, fake_quantize


def test_quant_linear_matches_manual_fake_quant_and_bakes():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(5, 32)
    wspec, aspec = QuantSpec(4, granularity="group", group_size=8), QuantSpec(6, granularity="token")
    q = QuantLinear(lin, wspec, aspec)
    expected = fake_quantize(x, aspec) @ fake_quantize(lin.weight, wspec).T + lin.bias
    torch.testing.assert_close(q(x), expected)
    q.bake_weight()
    assert q.weight_spec is None
    torch.testing.assert_close(q(x), expected)
    # the wrapper shares the parameter: baking rounded the original linear's weight
    assert lin.weight is q.weight
