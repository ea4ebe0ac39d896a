"""The weight-loading protocol every layer with parameters follows.

`shard(name, full, shard_id)` cuts this rank's slice out of a full checkpoint tensor (kiln convert);
`weight_loader(name, local, shard_id)` copies a rank-local slice into the parameter (kiln build).
The defaults here are for replicated parameters; parallel layers override them.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightLoading(nn.Module):
    def shard(self, name: str, full: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        return full

    def weight_loader(self, name: str, local: torch.Tensor, shard_id: object = None) -> None:
        param = getattr(self, name)
        if param.shape != local.shape:
            raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(local.shape)}")
        param.data.copy_(local)
