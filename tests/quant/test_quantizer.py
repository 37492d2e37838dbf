"""The quantizer against hand-computed cases (round half to even, as torch.round)."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.quantizer import QuantSpec, fake_quantize, quantize


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_asymmetric_per_channel_hand_computed():
    # row 0: min -1, max 2, 2 bits -> scale 1, zero 1; 0.5 rounds to 0 (half to even)
    # row 1: min 0, max 6 -> scale 2, zero 0; 3 -> 1.5 -> 2 -> 4; 5 -> 2.5 -> 2 -> 4
    x = t([[-1.0, 0.0, 0.5, 2.0], [0.0, 3.0, 5.0, 6.0]])
    qt = quantize(x, QuantSpec(2, symmetric=False, granularity="channel"))
    assert qt.scale.flatten().tolist() == [1.0, 2.0]
    assert qt.zero.flatten().tolist() == [1.0, 0.0]
    assert qt.q.tolist() == [[0, 1, 1, 3], [0, 2, 2, 3]]
    assert fake_quantize(x, QuantSpec(2)).tolist() == [[-1, 0, 0, 2], [0, 4, 4, 6]]


def test_symmetric_hand_computed():
    x = t([[-7.0, 3.5, 1.0, 0.4]])
    spec = QuantSpec(4, symmetric=True)
    assert (spec.qmin, spec.qmax) == (-8, 7)
    qt = quantize(x, spec)
    assert qt.scale.item() == 1.0 and qt.zero is None
    assert qt.q.tolist() == [[-7, 4, 1, 0]]


def test_per_group_hand_computed():
    # groups of 2: [0, 1] -> scale 1/3, zero 0; [10, 13] -> scale 1, zero -10
    x = t([[0.0, 1.0, 10.0, 13.0]])
    qt = quantize(x, QuantSpec(2, granularity="group", group_size=2))
    assert qt.q.tolist() == [[0, 3], [0, 3]]
    assert qt.zero.flatten().tolist() == [0.0, -10.0]
    torch.testing.assert_close(fake_quantize(x, QuantSpec(2, granularity="group", group_size=2)), x)


def test_per_tensor_shares_one_scale():
    x = t([[0.0, 1.0], [2.0, 3.0]])
    qt = quantize(x, QuantSpec(2, granularity="tensor"))
    assert qt.scale.numel() == 1 and qt.scale.item() == 1.0
    torch.testing.assert_close(fake_quantize(x, QuantSpec(2, granularity="tensor")), x)


def test_per_token_on_3d_activations_is_rowwise():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    spec = QuantSpec(4, granularity="token")
    out = fake_quantize(x, spec)
    for b in range(2):
        for s in range(3):
            torch.testing.assert_close(out[b, s], fake_quantize(x[b, s : s + 1], spec)[0])


@pytest.mark.parametrize("bits", range(2, 9))
def test_error_bounded_by_half_step_and_levels(bits):
    torch.manual_seed(bits)
    x = torch.randn(8, 64)
    spec = QuantSpec(bits)
    qt = quantize(x, spec)
    assert qt.q.min() >= 0 and qt.q.max() <= 2**bits - 1
    assert torch.equal(qt.q, qt.q.round())
    err = (fake_quantize(x, spec) - x).abs()
    # min-max range is inside the grid up to the rounded zero point: error at most one step
    assert (err <= qt.scale.reshape(8, 1) * 1.0 + 1e-6).all()
    assert len(torch.unique(qt.q)) <= 2**bits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_constant_rows_are_finite_and_exact(dtype):
    x = torch.tensor([[0.5] * 8, [0.0] * 8, [-3.0] * 8], dtype=dtype)
    out = fake_quantize(x, QuantSpec(4, granularity="token"))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, x)


def test_straight_through_gradient_and_clip_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    fake_quantize(x, QuantSpec(3)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    up = torch.full((4,), 0.9, requires_grad=True)
    low = torch.full((4,), 0.9, requires_grad=True)
    loss = (fake_quantize(x.detach(), QuantSpec(3), clip=(up, low)) - x.detach()).pow(2).sum()
    loss.backward()
    assert up.grad is not None and up.grad.abs().sum() > 0


def test_clipping_shrinks_the_range():
    x = t([[-4.0, 0.0, 4.0]])
    qt = quantize(x, QuantSpec(2, symmetric=True), clip=(torch.tensor([0.5]), torch.tensor([0.5])))
    assert qt.scale.item() == pytest.approx(2.0)  # amax 4 * 0.5 / qmax 1


def test_none_spec_is_identity():
    x = torch.randn(3, 3)
    assert fake_quantize(x, None) is x


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 2.5])
def test_bad_bits_refused(bits):
    with pytest.raises(LowbitError, match="bits must be an integer from 2 to 8"):
        QuantSpec(bits)


def test_group_size_must_divide_width():
    spec = QuantSpec(4, granularity="group", group_size=48)
    with pytest.raises(LowbitError, match="group size 48 does not divide the input width 64"):
        fake_quantize(torch.randn(2, 64), spec)
    with pytest.raises(LowbitError):
        QuantSpec(4, granularity="group")
    with pytest.raises(LowbitError):
        QuantSpec(4, granularity="channel", group_size=64)
