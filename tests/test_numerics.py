"""The FP8 contract, bit for bit: golden bytes, the reference formula, edge blocks, NaN/Inf."""

from __future__ import annotations

import pytest
import torch
from conftest import FP8, reference_fp8, same_bits

from omni_fp8.converter import numerics
from omni_fp8.converter.errors import NonFiniteWeightError
from omni_fp8.converter.numerics import (
    block_scale_shape,
    dequantize_weight,
    quantize_blockwise,
    quantize_per_tensor,
    quantize_weight,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx.double()).pow(2).sum()))


def test_golden_bytes_per_tensor():
    # amax 448 -> scale 1: every value is its own nearest E4M3 value, RNE on the ties.
    w = torch.tensor([[448.0, -448.0, 1.0, 0.0, 1.0625, 1.1875, 0.001953125, -3.5]])
    q, s = quantize_per_tensor(w)
    assert s.dtype == torch.float32 and s.shape == () and s.item() == 1.0
    # 1.0625 is halfway between 1.0 (0x38) and 1.125 (0x39): even mantissa wins -> 0x38.
    # 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3a): even -> 0x3a.
    # 2**-9 is the smallest subnormal (0x01).
    assert q.view(torch.uint8).tolist() == [[0x7E, 0xFE, 0x38, 0x00, 0x38, 0x3A, 0x01, 0xC6]]


def test_golden_scale_is_amax_over_448_in_float32():
    w = torch.tensor([[0.1, -0.3, 0.2, 0.05]], dtype=torch.bfloat16)
    q, s = quantize_per_tensor(w)
    amax = torch.tensor(0.30078125, dtype=torch.float32)  # bf16(-0.3) exactly
    assert s.item() == (amax / 448).item()
    assert same_bits(q[0, 1:2], torch.tensor([-448.0]).to(FP8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 48), (1, 16), (1100, 1024)])  # the last spans chunks
def test_per_tensor_matches_formula(dtype, shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w[0, : min(4, shape[1])] = 0.5  # an outlier sets the scale
    q, s = quantize_per_tensor(w)
    rq, rs = reference_fp8(w)
    assert same_bits(q, rq)
    assert same_bits(s, rs)
    assert sqnr_db(w.float(), dequantize_weight(q, s)) > 14  # outliers cost resolution, still bounded


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,block",
    [((256, 256), (128, 128)), ((300, 200), (128, 128)), ((48, 32), (128, 128)), ((160, 400), (16, 128))],
)
def test_blockwise_matches_formula_including_partial_edge_blocks(dtype, shape, block):
    torch.manual_seed(1)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w[: block[0], : block[1]] *= 50  # one loud block must not flatten the others
    w[-1, :] = 0
    q, s = quantize_blockwise(w, block)
    rq, rs = reference_fp8(w, block)
    assert s.shape == block_scale_shape(shape, block) == rs.shape
    assert same_bits(q, rq)
    assert same_bits(s, rs)


@pytest.mark.parametrize("outlier,gain_db", [(50.0, 0.0), (2000.0, 3.0)])
def test_block_scales_are_never_worse_and_win_on_extreme_outliers(outlier, gain_db):
    # E4M3 spans 2**17, so per-tensor scaling only hurts once outliers push the rest of the
    # matrix below 2**-6 * scale, into subnormals; block scales confine that to the outlier's block.
    torch.manual_seed(2)
    w = torch.randn(512, 512) * 0.02
    w[:4, :4] = outlier
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[:128, :128] = False
    per_tensor = dequantize_weight(*quantize_per_tensor(w))
    blocked = dequantize_weight(*quantize_blockwise(w, (128, 128)), block_size=(128, 128))
    assert sqnr_db(w[rest], blocked[rest]) >= sqnr_db(w[rest], per_tensor[rest]) + gain_db
    assert sqnr_db(w[rest], blocked[rest]) > 30


def test_all_zero_weight_gets_scale_one():
    q, s = quantize_per_tensor(torch.zeros(32, 16, dtype=torch.bfloat16))
    assert s.item() == 1.0 and not q.float().any()
    q, s = quantize_blockwise(torch.zeros(32, 48), (16, 16))
    assert torch.equal(s, torch.ones(2, 3)) and not q.float().any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("block", [None, (16, 16)])
def test_non_finite_weight_is_an_error_naming_the_tensor(bad, block):
    w = torch.randn(32, 32)
    w[17, 5] = bad
    with pytest.raises(NonFiniteWeightError, match=r"^blocks\.3\.attn\.to_q\.weight: the weight holds NaN or Inf"):
        quantize_weight(w, block, name="blocks.3.attn.to_q.weight")


def test_dequantize_block_grid_covers_partial_blocks():
    torch.manual_seed(3)
    w = torch.randn(40, 70)
    q, s = quantize_blockwise(w, (16, 32))
    deq = dequantize_weight(q, s, block_size=(16, 32), dtype=torch.bfloat16)
    assert deq.dtype == torch.bfloat16 and deq.shape == w.shape
    assert sqnr_db(w, deq.float()) > 25


def test_refuses_non_matrix_and_non_float_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_tensor(torch.ones(4))
    with pytest.raises(ValueError, match="cannot quantize"):
        quantize_per_tensor(torch.ones(4, 4, dtype=torch.int32))


def test_chunking_is_invisible(monkeypatch):
    torch.manual_seed(4)
    w = torch.randn(96, 80, dtype=torch.bfloat16)
    whole = quantize_per_tensor(w)
    monkeypatch.setattr(numerics, "_CHUNK_ELEMENTS", 1000)  # not a multiple of the row length
    chunked = quantize_per_tensor(w)
    assert same_bits(whole[0], chunked[0]) and same_bits(whole[1], chunked[1])


# --- Extreme inputs: every finite weight gets a finite, positive scale and a faithful FP8 code ---

def _fp8_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of E4M3FN values at magnitude ``v`` (float64): 2**-9 among subnormals."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    return torch.pow(2.0, exponent - 3)


def _check_faithful(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block) -> None:
    assert scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and (scale > 0).all(), scale
    assert numerics.has_fp8_nan(q) is False
    deq = dequantize_weight(q, scale, block, torch.float64)
    w64 = w.double()
    s = scale.double() if block is None else (
        scale.double().repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]])
    # one FP8 rounding step at the value's magnitude, plus float32's own rounding of q * s
    bound = _fp8_step(w64 / s) * s + w64.abs() * 2.0**-22
    assert ((deq - w64).abs() <= bound).all(), ((deq - w64).abs() - bound).max()


def _extremes(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    info = torch.finfo(dtype)
    smallest_subnormal = torch.tensor(info.smallest_normal * info.eps, dtype=torch.float64)
    cases = {
        "largest": torch.full((16, 32), info.max, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(16),
        "largest-and-tiny": torch.cat([torch.full((1, 32), info.max, dtype=torch.float64),
                                       torch.full((15, 32), float(info.smallest_normal), dtype=torch.float64)]),
        "smallest-subnormal": torch.full((16, 32), float(smallest_subnormal), dtype=torch.float64),
        "subnormals": torch.randint(-8, 9, (32, 48)).double() * float(smallest_subnormal),
        "smallest-normal": torch.full((16, 16), float(info.smallest_normal), dtype=torch.float64),
        "all-equal-rows": torch.arange(1, 33, dtype=torch.float64)[:, None].expand(32, 48) * 0.01,
        "one-nonzero": torch.zeros(16, 32, dtype=torch.float64).index_put_((torch.tensor(3), torch.tensor(5)),
                                                                            torch.tensor(1e-3, dtype=torch.float64)),
    }
    if dtype == torch.float32:
        cases["tiny-1e-44"] = torch.full((16, 16), 1e-44, dtype=torch.float64)
    return {name: t.to(dtype) for name, t in cases.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, (16, 16), (16, 32)])
def test_extreme_inputs_give_finite_scales_and_faithful_codes(dtype, block):
    torch.manual_seed(5)
    for name, w in _extremes(dtype).items():
        assert torch.isfinite(w).all(), name
        q, scale = quantize_weight(w, block)
        _check_faithful(w, q, scale, block)
        rq, rs = reference_fp8(w, block)
        assert same_bits(q, rq) and same_bits(scale, rs), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_element_edge_blocks(dtype):
    # 17 x 33 with 16 x 16 blocks: the bottom-right block holds one element, the others partial.
    w = (torch.randn(17, 33) * 0.1).to(dtype)
    w[16, 32] = torch.finfo(dtype).tiny
    w[0, 32] = torch.finfo(dtype).max
    q, scale = quantize_blockwise(w, (16, 16))
    assert scale.shape == (2, 3)
    _check_faithful(w, q, scale, (16, 16))


def test_the_subnormal_edge_of_the_issue():
    # amax 1e-44: amax / 448 underflows to 0 in float32, which used to give scale 0 and NaN codes.
    w = torch.full((16, 16), 1e-44)
    assert (torch.tensor(1e-44) / 448).item() == 0.0
    for block in (None, (16, 16)):
        q, scale = quantize_weight(w, block)
        assert (scale == torch.finfo(torch.float32).tiny).all()
        assert not torch.isnan(q.float()).any()
        assert torch.equal(dequantize_weight(q, scale, block), torch.zeros(16, 16))  # 1e-44 is below half a step


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_scales_share_the_floor(dtype):
    info = torch.finfo(dtype)
    x = torch.stack([torch.full((32,), float(info.smallest_normal) * info.eps),
                     torch.full((32,), info.max), torch.zeros(32), torch.full((32,), 1e-3)]).to(dtype)
    for group in (None, 16):
        q, s = numerics.quantize_activation(x, group)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert not torch.isnan(q.float()).any()
        expected = (x[0, 0].float() / 448).clamp_min(torch.finfo(torch.float32).tiny)
        assert (s[0] == expected).all()


def test_has_fp8_nan_finds_both_nan_codes():
    q = torch.zeros(5, 7, dtype=FP8)
    assert not numerics.has_fp8_nan(q)
    for code in (0x7F, 0xFF):
        bad = q.clone()
        bad.view(torch.uint8)[4, 6] = code
        assert numerics.has_fp8_nan(bad)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -0.5])
def test_check_scale_refuses_what_the_contract_never_writes(value):
    from omni_fp8.converter.errors import CorruptScaleError

    with pytest.raises(CorruptScaleError, match=r"x.weight_scale holds .*; FP8 scales must be finite and positive"):
        numerics.check_scale(torch.tensor(value), name="x.weight_scale", where="f.safetensors")
    numerics.check_scale(torch.tensor(1e-38), name="x.weight_scale", where="f.safetensors")


def test_cast_checked_refuses_overflow_and_names_the_tensor():
    from omni_fp8.converter.errors import DtypeRangeError

    t = torch.tensor([1.0, 1e6, -3.0])
    with pytest.raises(DtypeRangeError, match=r"norm.weight: holds 1e\+06, beyond float16's largest value 65504"):
        numerics.cast_checked(t, torch.float16, name="norm.weight")
    assert numerics.cast_checked(t, torch.bfloat16, name="x").dtype == torch.bfloat16
    assert torch.isinf(numerics.cast_checked(torch.tensor([float("inf")]), torch.float16, name="x")).all()  # kept as is
