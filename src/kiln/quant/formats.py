"""Quantized weight formats: how a [out, in] weight is stored, and the plain round-to-nearest quantizers.

Integer formats (int8_wo, int4_wo, int4_awq) store, per linear layer:
    qweight  int8  [out, in]       (8 bits, symmetric, values -127..127), or
             uint8 [out, in // 2]  (4 bits: column 2j in the low nibble, 2j+1 in the high one, values 0..15)
    scales   float [out, in // group]   (group = in for per-channel)
    zeros    uint8 [out, in // group]   4-bit only: the integer zero point (8 for symmetric int4_wo)
and dequantize as  w[o, i] = (q[o, i] - zero[o, i // group]) * scale[o, i // group].

fp8 stores `weight` as float8_e4m3fn [out, in] with `weight_scale` float32 [out] (per output channel);
activations are quantized per token at run time.

All tensors keep the [out, ...] leading dimension, so tensor-parallel sharding splits them like the
plain weight (dim 0 for column-parallel, dim 1 for row-parallel, group boundaries permitting).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] integers 0..15 -> [out, in // 2] uint8; column 2j low nibble, 2j+1 high nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in // 2] uint8 -> [out, in] uint8 values 0..15 (inverse of pack_int4)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in // group, group] (group_size 0 means the whole row)."""
    g = group_size or w.shape[1]
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def quantize_symmetric(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Round-to-nearest symmetric quantization (int8_wo, int4_wo). Returns qweight, scales (, zeros).

    Scales are stored in `scale_dtype` (default w's dtype) and rounding uses the stored values, so the
    checkpoint dequantizes to exactly the nearest grid point.
    """
    scale_dtype = scale_dtype or w.dtype
    groups = _groups(w.float(), group_size)
    qmax = 2 ** (bits - 1) - 1  # 127 or 7
    scales = (groups.abs().amax(dim=-1).clamp(min=1e-10) / qmax).to(scale_dtype).float()  # [out, n_groups]
    q = torch.round(groups / scales.unsqueeze(-1)).clamp(-qmax - (bits == 4), qmax)
    q = q.reshape(w.shape)
    if bits == 8:
        return {"qweight": q.to(torch.int8), "scales": scales.to(scale_dtype)}
    zeros = torch.full_like(scales, 8, dtype=torch.uint8)
    return {"qweight": pack_int4(q + 8), "scales": scales.to(scale_dtype), "zeros": zeros}


def quantize_asymmetric_int4(
    w: torch.Tensor, group_size: int, max_val: torch.Tensor | None = None, min_val: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Group-wise asymmetric int4 (AWQ's format): scale and integer zero point from each group's range.

    max_val / min_val: optional [out, n_groups] clipped ranges (AWQ's clip search); default the true range.
    Scales are stored in `scale_dtype` (default w's dtype); rounding uses the stored values.
    """
    scale_dtype = scale_dtype or w.dtype
    groups = _groups(w.float(), group_size)
    hi = groups.amax(dim=-1) if max_val is None else max_val
    lo = groups.amin(dim=-1) if min_val is None else min_val
    hi, lo = hi.clamp(min=0), lo.clamp(max=0)  # the range always holds 0, so 0 is exact
    scales = ((hi - lo) / 15).clamp(min=1e-10).to(scale_dtype).float()  # [out, n_groups]
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(groups / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, 15).reshape(w.shape)
    return {"qweight": pack_int4(q), "scales": scales.to(scale_dtype), "zeros": zeros.to(torch.uint8)}


def dequantize_int(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """qweight/scales(/zeros) as stored -> [out, in] weight in `dtype`."""
    qweight, scales = tensors["qweight"], tensors["scales"]
    if qweight.dtype == torch.int8:
        q = qweight.float()
    else:
        q = unpack_int4(qweight).float() - tensors["zeros"].float().repeat_interleave(
            qweight.shape[1] * 2 // scales.shape[1], dim=1
        )
    group = q.shape[1] // scales.shape[1]
    return (q * scales.float().repeat_interleave(group, dim=1)).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Quantize and dequantize back (used by AWQ's searches to measure the error of a choice)."""
    if symmetric:
        return dequantize_int(quantize_symmetric(w, bits, group_size), w.dtype)
    return dequantize_int(quantize_asymmetric_int4(w, group_size), w.dtype)


def quantize_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-output-channel e4m3: weight [out, in] float8_e4m3fn, weight_scale [out] float32."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    q = (w.float() / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def fake_quantize_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token activation quantization to e4m3 and back: [tokens, in] -> same, x's dtype."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
