"""Which checkpoint tensors are quantized, and round-to-nearest quantization of one weight.

Only the decoder's linear projections are quantized; embeddings, the LM head and norms stay in the
checkpoint dtype (the head is ~1/20 of a 7B model's bytes and the most sensitive layer).
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.quant.formats import quantize_asymmetric_int4, quantize_fp8, quantize_symmetric
from kiln.quant.methods import QuantConfig

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_quantized_linear(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES


def check_group_size(name: str, in_features: int, quant: QuantConfig, tp_size: int) -> None:
    g = quant.group_size
    if not g or quant.algo == "fp8":
        return
    row_parallel = name.split(".")[-2] in ("o_proj", "down_proj")
    local = in_features // tp_size if row_parallel else in_features
    if in_features % g or (row_parallel and (in_features % tp_size or local % g)):
        where = f" per rank ({in_features} / tp_size {tp_size} = {in_features / tp_size:g})" if row_parallel and tp_size > 1 else ""
        raise KilnError(
            f"group size {g} does not divide the input size {local if where else in_features}{where} of "
            f"{name}: choose a group size that divides it (e.g. 32 or 64), or 0 for per-channel"
        )


def quantize_weight(
    name: str, w: torch.Tensor, quant: QuantConfig, dtype: torch.dtype, tp_size: int = 1
) -> dict[str, torch.Tensor]:
    """Quantize the [out, in] weight `name` (ending in .weight) -> {prefix.qweight: ..., ...}."""
    check_group_size(name, w.shape[1], quant, tp_size)
    prefix = name[: -len(".weight")]
    w32 = w.float()
    if quant.algo == "fp8":
        parts = quantize_fp8(w32)
    elif quant.algo in ("int8_wo", "int4_wo"):
        parts = quantize_symmetric(w32, quant.bits, quant.group_size, dtype)
    elif quant.algo == "int4_awq":
        parts = quantize_asymmetric_int4(w32, quant.group_size, scale_dtype=dtype)
    else:
        raise ValueError(f"not a quantized format: {quant.algo}")
    out = {}
    for key, value in parts.items():
        out[f"{prefix}.{key}"] = value.to(dtype) if key == "scales" else value
    return out
