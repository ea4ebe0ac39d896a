"""RMSNorm, optionally adding the residual first (the fused form the GPU kernel implements)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.layers.base import WeightLoading


class RMSNorm(WeightLoading):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); x, residual: [num_tokens, hidden]."""
        if residual is not None:
            x = x + residual
        residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), residual
