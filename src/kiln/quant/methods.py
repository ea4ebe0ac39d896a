"""How a linear layer holds and applies its weight for each quantization format.

A `QuantMethod` creates the layer's parameters (so sharding and loading see the stored tensors) and
computes y = x W^T. On the CPU every format goes through the reference path: dequantize, then matmul
(fp8 also quantizes the activations per token, as the GPU's W8A8 matmul does). On CUDA tensors the
integer formats run kiln's Triton kernels on the packed weights and fp8 runs the fp8 tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels import silu_and_mul, use_triton
from kiln.quant.formats import dequantize_int, fake_quantize_fp8_per_token


@dataclass(frozen=True)
class QuantConfig:
    """What a checkpoint's linear layers hold. algo None is full precision."""

    algo: str | None = None
    group_size: int = 0  # 0: per output channel
    # How fp8's weights were made (quant/fp8.py); recorded for the user, the runtime never needs it.
    smoothquant: float | None = None  # smoothing strength alpha folded into the weights (0: none)
    gptq: bool = False  # weights rounded by GPTQ instead of to nearest

    @property
    def bits(self) -> int:
        return {"int8_wo": 8, "int4_wo": 4, "int4_awq": 4, "fp8": 8}.get(self.algo or "", 16)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"quant_algo": self.algo, "group_size": self.group_size, "bits": self.bits}
        if self.smoothquant is not None:
            d["smoothquant"] = self.smoothquant
        if self.gptq:
            d["gptq"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        algo = d.get("quant_algo")
        alpha = d.get("smoothquant")
        return cls(None if algo in (None, "full_prec") else algo, int(d.get("group_size") or 0),
                   None if alpha is None else float(alpha), bool(d.get("gptq", False)))


def _param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class FullPrecision:
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = _param(out_features, in_features)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight)

    def apply_gated(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up times the weight, x [..., 2 * in_features] holding gate then up (the MLP's down
        projection); a format whose kernel can read the gated input itself overrides this."""
        return self.apply(layer, silu_and_mul(x))


class WeightOnlyInt(FullPrecision):
    """int8_wo, int4_wo and int4_awq: integer weights, scales per group (zeros for 4 bits)."""

    def __init__(self, bits: int, group_size: int):
        self.bits = bits
        self.group_size = group_size

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        groups = in_features // self.group_size if self.group_size else 1
        if self.bits == 8:
            layer.qweight = _param(out_features, in_features, dtype=torch.int8)
        else:
            layer.qweight = _param(out_features, in_features // 2, dtype=torch.uint8)
            layer.zeros = _param(out_features, groups, dtype=torch.uint8)
        layer.scales = _param(out_features, groups)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        parts = {"qweight": layer.qweight, "scales": layer.scales}
        if self.bits == 4:
            parts["zeros"] = layer.zeros
        return dequantize_int(parts, layer.scales.dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not use_triton(x):
            return F.linear(x, self.dequantized_weight(layer))
        if self.bits == 4:
            return self._int4(layer, x)
        from kiln.kernels.int8_matmul import int8_matmul

        return int8_matmul(x, layer.qweight, layer.scales, self.group_size or layer.in_features, **_plan_args(layer))

    def apply_gated(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4 and use_triton(x):
            return self._int4(layer, x, gated=True)
        return super().apply_gated(layer, x)

    def _int4(self, layer: nn.Module, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        from kiln.kernels.int4_matmul import int4_matmul

        group = self.group_size or layer.in_features
        return int4_matmul(x, layer.qweight, layer.scales, layer.zeros, group, gated=gated, **_plan_args(layer))


class Fp8(FullPrecision):
    """W8A8 e4m3: per-output-channel weight scales, dynamic per-token activation scales."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = _param(out_features, in_features, dtype=torch.float8_e4m3fn)
        layer.weight_scale = _param(out_features, dtype=torch.float32)

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (layer.weight.float() * layer.weight_scale.unsqueeze(1)).to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from kiln.kernels.fp8_matmul import fp8_matmul

            plan = {} if layer.plan is None else {"gemv_max_m": layer.plan.gemv_max_m, "gemv": layer.plan.gemv}
            return fp8_matmul(x, layer.weight, layer.weight_scale, **plan)
        return F.linear(fake_quantize_fp8_per_token(x), self.dequantized_weight(layer, x.dtype))


def _plan_args(layer: nn.Module) -> dict[str, Any]:
    """The measured kernel plan of this layer as the int kernels' keyword arguments ({}: their defaults)."""
    plan = layer.plan
    if plan is None:
        return {}
    args = {"gemv_max_m": plan.gemv_max_m, "dequant_min_m": plan.dequant_min_m, "gemv": plan.gemv, "gemm": plan.gemm}
    if layer.quant_method.bits == 4:
        args.update(use_gemv1=plan.use_gemv1, gemv1=plan.gemv1)
    return args


def quant_method(cfg: QuantConfig | None) -> FullPrecision:
    if cfg is None or cfg.algo is None:
        return FullPrecision()
    if cfg.algo == "fp8":
        return Fp8()
    return WeightOnlyInt(cfg.bits, cfg.group_size)
