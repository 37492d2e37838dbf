"""extract_codes recovers the exact integer grid behind rounded weights, and refuses weights that are not on one."""

import pytest
import torch

from lowbit import QuantConfig, quantize
from lowbit.errors import LowbitError
from lowbit.export.codes import LinearCodes, extract_codes, iter_quantized_linears
from lowbit.models.loading import LoadedModel
from lowbit.models.registry import adapter_for
from lowbit.quant.quantizer import QuantSpec, fake_quantize

SPECS = [QuantSpec(b, sym, "group", 16) for b in range(2, 9) for sym in (False, True)] + [
    QuantSpec(4, False, "channel"), QuantSpec(3, True, "channel")]


def rounded(spec: QuantSpec, seed: int = 0, clip: float | None = None) -> torch.Tensor:
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(seed))
    w[0] = 0.1  # constant row: scale clamped, zero point far outside [0, 2^b)
    w[1] = 0.0
    w[2] = w[2].abs() + 1.0  # one sign only: with clipping its near-zero end code stays unused
    w[3, :16] = 0.1 + torch.arange(16) * 1e-7  # a range smaller than one SCALE_MIN step
    factors = None
    if clip is not None:
        rows = 12 * (64 // (spec.group_size or 64))
        factors = (torch.full((rows,), clip), torch.full((rows,), clip * 0.9))
    return fake_quantize(w, spec, clip=factors)


def check_layout(codes: LinearCodes, spec: QuantSpec) -> None:
    assert codes.codes.dtype == torch.int16 and codes.scales.dtype == codes.zeros.dtype == torch.float32
    assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) < 2**spec.bits
    assert torch.equal(codes.zeros, codes.zeros.round())
    if spec.symmetric:
        assert (codes.zeros == 2 ** (spec.bits - 1)).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("clip", [None, 0.8])
def test_float32_weights_come_back_bit_exact(spec, clip):
    wq = rounded(spec, clip=clip)
    codes = extract_codes(wq, spec)
    check_layout(codes, spec)
    assert codes.group_size == (spec.group_size or 64)
    assert torch.equal(codes.dequantize(), wq)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", [QuantSpec(4, False, "group", 16), QuantSpec(8, True, "channel"),
                                  QuantSpec(2, False, "channel")], ids=str)
def test_half_storage_within_its_rounding(spec, dtype):
    wq = rounded(spec, clip=0.9)
    stored = wq.to(dtype)
    codes = extract_codes(stored, spec)
    check_layout(codes, spec)
    eps = torch.finfo(dtype).eps
    grouped = stored.float().reshape(-1, codes.group_size)
    tol = eps * (grouped.abs() + grouped.abs().amax(-1, keepdim=True))
    assert ((codes.dequantize().reshape_as(grouped) - grouped).abs() <= tol).all()
    # fp16 keeps the very codes the quantizer chose wherever the scale was not clamped (rows 4 onwards); bf16's
    # 8 significant bits round an 8-bit grid by up to a step, so only the values above are promised there
    if dtype == torch.float16:
        assert torch.equal(codes.codes[4:], extract_codes(wq, spec).codes[4:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_off_the_grid_is_refused_with_its_name(dtype):
    spec = QuantSpec(4, False, "group", 16)
    w = rounded(spec)
    w[7, 5] += 0.3 * float(w[7].abs().max()) / 15  # a third of a step off
    with pytest.raises(LowbitError, match=r"layers.0.q_proj is not on a 4-bit grid.*row 7"):
        extract_codes(w.to(dtype), spec, name="layers.0.q_proj")
    with pytest.raises(LowbitError, match="not on a 4-bit grid"):
        extract_codes(torch.randn(8, 64), spec)  # never quantized at all


def test_bad_shapes_and_values_are_refused():
    spec = QuantSpec(4, False, "group", 48)
    with pytest.raises(LowbitError, match="does not divide"):
        extract_codes(torch.zeros(4, 64), spec)
    with pytest.raises(LowbitError, match="2-D"):
        extract_codes(torch.zeros(4, 4, 4), QuantSpec(4))
    for bad in (float("nan"), float("inf")):
        w = torch.zeros(3, 8)
        w[2, 5] = bad
        with pytest.raises(LowbitError, match="row 2 is not finite"):
            extract_codes(w, QuantSpec(4))
    with pytest.raises(LowbitError, match="scales and zeros"):
        LinearCodes(torch.zeros(2, 8, dtype=torch.int16), torch.ones(2, 3), torch.zeros(2, 3), 4, 4)


def test_iter_quantized_linears_after_rtn():
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    loaded = LoadedModel(model, None, adapter_for("llama"), "tiny")
    config = QuantConfig(method="rtn", wbits=3, group_size=32)
    quantize(loaded, config)
    found = list(iter_quantized_linears(model, config))
    assert len(found) == 2 * 7
    assert found[0][0] == "model.layers.0.self_attn.q_proj" and found[-1][0] == "model.layers.1.mlp.down_proj"
    for name, module, codes in found:
        assert model.get_submodule(name) is module
        assert torch.equal(codes.dequantize(), module.weight)
    assert list(iter_quantized_linears(model, QuantConfig(wbits=16, abits=8))) == []


def test_zero_point_tie_leaves_the_top_code_unused_and_is_still_recovered():
    """min = -6.5, max = 8.5: scale 1, -min/scale = 6.5 rounds to 6 and the max to 8 (half to even): codes 0..14."""
    spec = QuantSpec(4, False, "channel")
    w = torch.linspace(-6.5, 8.5, 64).reshape(1, 64) * 2.0**-5  # power-of-two lattice, as GGUF weights
    wq = fake_quantize(w, spec)
    assert float(wq.max() - wq.min()) == pytest.approx(14 * 2.0**-5)  # one code short of the full span
    codes = extract_codes(wq, spec)
    assert torch.equal(codes.dequantize(), wq) and int(codes.codes.max() - codes.codes.min()) == 14
