"""Packing and the round-to-nearest quantizers against plain per-element references."""

from __future__ import annotations

import pytest
import torch

from kiln.quant.formats import (
    FP8_MAX,
    dequantize_int,
    fake_quantize_fp8_per_token,
    pack_int4,
    quantize_asymmetric_int4,
    quantize_fp8,
    quantize_symmetric,
    unpack_int4,
)


def test_pack_int4_nibble_order() -> None:
    q = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    for o in range(5):
        for j in range(6):
            byte = int(packed[o, j])
            assert byte & 0xF == q[o, 2 * j] and byte >> 4 == q[o, 2 * j + 1]
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


def _reference_dequant(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int) -> torch.Tensor:
    out = torch.empty(q.shape)
    for o in range(q.shape[0]):
        for i in range(q.shape[1]):
            z = 0 if zeros is None else float(zeros[o, i // group])
            out[o, i] = (float(q[o, i]) - z) * float(scales[o, i // group])
    return out


@pytest.mark.parametrize("group", [0, 8, 16])
def test_int8_symmetric(group: int) -> None:
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    parts = quantize_symmetric(w, 8, group)
    g = group or 32
    assert parts["qweight"].dtype == torch.int8 and parts["scales"].shape == (6, 32 // g)
    assert parts["qweight"].abs().max() <= 127
    ref = _reference_dequant(parts["qweight"], parts["scales"], None, g)
    assert torch.allclose(dequantize_int(parts, torch.float32), ref, atol=1e-6)
    # round to nearest: each weight within half a step of its value
    step = parts["scales"].repeat_interleave(g, dim=1)
    assert ((dequantize_int(parts, torch.float32) - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [0, 8])
def test_int4_symmetric_uses_zero_point_8(group: int) -> None:
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    parts = quantize_symmetric(w, 4, group)
    assert (parts["zeros"] == 8).all()
    g = group or 16
    ref = _reference_dequant(unpack_int4(parts["qweight"]), parts["scales"], parts["zeros"], g)
    deq = dequantize_int(parts, torch.float32)
    assert torch.allclose(deq, ref, atol=1e-6)
    step = parts["scales"].repeat_interleave(g, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int4_asymmetric_range_and_error() -> None:
    w = torch.rand(4, 32, generator=torch.Generator().manual_seed(3)) * 3 + 0.5  # all positive
    parts = quantize_asymmetric_int4(w, 8)
    q = unpack_int4(parts["qweight"])
    assert q.max() <= 15 and parts["zeros"].max() <= 15
    deq = dequantize_int(parts, torch.float32)
    ref = _reference_dequant(q, parts["scales"], parts["zeros"], 8)
    assert torch.allclose(deq, ref, atol=1e-6)
    step = parts["scales"].float().repeat_interleave(8, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()
    # asymmetric beats symmetric on one-sided data
    sym = dequantize_int(quantize_symmetric(w, 4, 8), torch.float32)
    assert (deq - w).pow(2).mean() < 0.5 * (sym - w).pow(2).mean()


def test_fp8_weights_and_tokens() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    parts = quantize_fp8(w)
    assert parts["weight"].dtype == torch.float8_e4m3fn and parts["weight_scale"].shape == (8,)
    assert parts["weight"].float().abs().amax(dim=1).allclose(torch.full((8,), FP8_MAX))
    deq = parts["weight"].float() * parts["weight_scale"].unsqueeze(1)
    assert ((deq - w).abs() / w.abs().clamp(min=1e-3)).median() < 0.04  # e4m3: 3 mantissa bits
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(5)) * torch.tensor([1.0, 100, 0.01, 5, 1]).unsqueeze(1)
    xq = fake_quantize_fp8_per_token(x)
    assert ((xq - x).abs().amax(dim=1) <= x.abs().amax(dim=1) / 16).all()  # per-token scale follows each row


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_uses_the_stored_half_precision_scales(bits: int) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)) * 3
    parts = quantize_symmetric(w, bits, 16, torch.bfloat16)
    assert parts["scales"].dtype == torch.bfloat16
    deq = dequantize_int(parts, torch.float32)
    step = parts["scales"].float().repeat_interleave(16, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()
    asym = quantize_asymmetric_int4(w, 16, scale_dtype=torch.bfloat16)
    deq = dequantize_int(asym, torch.float32)
    step = asym["scales"].float().repeat_interleave(16, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()
