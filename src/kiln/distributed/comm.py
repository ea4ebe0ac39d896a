"""The tensor-parallel group a layer belongs to, and the two collectives the Llama decoder needs.

Layers receive a `TPGroup` when they are built and keep their rank and size; with one rank every
collective is a no-op, so the single-GPU and CPU paths never touch torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup when size > 1
    fast: Any = None  # distributed/symm.py's one-shot all-reduce for small CUDA messages, where it works

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            if self.fast is not None:
                out = self.fast(x)
                if out is not None:
                    return out
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's `x` along the last dimension (same shape on every rank)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TPGroup()
