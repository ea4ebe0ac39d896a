"""RMSNorm, optionally adding the residual first (the fused form the GPU kernel implements)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import reference, use_triton
from kiln.layers.base import WeightLoading


class RMSNorm(WeightLoading):
    def __init__(self, hidden: int, eps: float, quantize_fp8: bool = False):
        """quantize_fp8: the layer reading the output is fp8 W8A8; on the GPU path the kernel then also
        quantizes the output per token and attaches it (kernels/rmsnorm.py), saving that layer a kernel."""
        super().__init__()
        self.eps = eps
        self.quantize_fp8 = quantize_fp8
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); x, residual: [num_tokens, hidden]."""
        if use_triton(x):
            from kiln.kernels.rmsnorm import rms_norm

            # the sum is written into `residual`
            return rms_norm(x, self.weight, self.eps, residual, quantize_fp8=self.quantize_fp8)
        return reference.rms_norm(x, self.weight, self.eps, residual)
