"""Tensor-parallel linear layers.

Each layer knows how its weights split across ranks: `shard` cuts this rank's slice out of a full
Hugging Face tensor (used by `kiln convert`, which writes one file per rank), and `weight_loader` puts a
rank-local slice into this layer's parameter (used by `kiln build`, which fuses q/k/v and gate/up into
the runtime layout). The sharding rule lives here and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.distributed.comm import SINGLE, TPGroup
from kiln.layers.base import WeightLoading
from kiln.quant.methods import QuantConfig, quant_method


def _split(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {size} ranks")
    return x.chunk(size, dim=dim)[rank].contiguous()


class LinearBase(WeightLoading):
    """y = x W^T (+ b), W of shape [out_features, in_features] local to this rank.

    The quantization method decides which tensors hold W (`weight`, or `qweight`/`scales`/`zeros`, ...);
    all of them have out_features as their first dimension.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, quant: QuantConfig | None):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.out_features = out_features
        self.quant_config = quant or QuantConfig()
        self.quant_method = quant_method(quant)
        self.quant_method.create_weights(self, in_features, out_features)
        self.plan = None  # the kernel plan measured for this shape on this GPU (kernels/tuning.py)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x)
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE,
        quant: QuantConfig | None = None,
    ):
        super().__init__(in_features, out_features // tp.size, bias, tp, quant)

    def shard(self, name: str, full: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        return _split(full, 0, self.tp.rank, self.tp.size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate and up)."""

    def __init__(
        self, in_features: int, out_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE,
        quant: QuantConfig | None = None,
    ):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp, quant)

    def weight_loader(self, name: str, local: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        param = getattr(self, name)
        offset = sum(self.out_sizes[:shard_id]) // self.tp.size
        size = self.out_sizes[shard_id] // self.tp.size
        target = param.data.narrow(0, offset, size)
        if target.shape != local.shape:
            raise ValueError(f"{name}[{shard_id}]: expected {tuple(target.shape)}, got {tuple(local.shape)}")
        target.copy_(local)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split across ranks, KV heads replicated when fewer than ranks."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup = SINGLE,
        quant: QuantConfig | None = None,
    ):
        if num_heads % tp.size:
            raise ValueError(f"{num_heads} attention heads do not split into {tp.size} ranks")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads do not split into or replicate over {tp.size} ranks")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size  # per rank
        self.num_kv_heads = max(1, num_kv_heads // tp.size)  # per rank
        self.total_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, tp, quant)

    def _range(self, shard_id: object) -> tuple[int, int]:
        """(offset, size) of q, k or v inside this rank's fused output, in features."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]  # type: ignore[index]

    def shard(self, name: str, full: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        if shard_id == "q" or self.total_kv_heads >= self.tp.size:
            return _split(full, 0, self.tp.rank, self.tp.size)
        kv_head = self.tp.rank * self.total_kv_heads // self.tp.size  # replicated KV head
        return full.narrow(0, kv_head * self.head_dim, self.head_dim).contiguous()

    def weight_loader(self, name: str, local: torch.Tensor, shard_id: object = None) -> None:
        offset, size = self._range(shard_id)
        target = getattr(self, name).data.narrow(0, offset, size)
        if target.shape != local.shape:
            raise ValueError(f"{name}[{shard_id}]: expected {tuple(target.shape)}, got {tuple(local.shape)}")
        target.copy_(local)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed by all-reduce, then the bias (replicated) added."""

    def __init__(
        self, in_features: int, out_features: int, tp: TPGroup = SINGLE, bias: bool = False,
        quant: QuantConfig | None = None,
    ):
        super().__init__(in_features // tp.size, out_features, bias, tp, quant)

    def shard(self, name: str, full: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        if full.dim() == 1 or (name in ("scales", "zeros") and full.shape[1] == 1):
            return full  # bias and per-output-channel scales: every rank needs all of them
        return _split(full, 1, self.tp.rank, self.tp.size)

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """gated: x [..., 2 * in_features] holds gate then up, and the input is silu(gate) * up (the MLP's
        down projection; a quantized kernel may read it so without a kernel of its own)."""
        y = self.quant_method.apply_gated(self, x) if gated else self.quant_method.apply(self, x)
        out = self.tp.all_reduce(y)
        return out if self.bias is None else out + self.bias
