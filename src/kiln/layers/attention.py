"""Paged attention as a layer: write this step's keys and values into the cache, then attend.

`AttentionMetadata` describes one packed batch; the model runner builds it once per step and the
model passes it down to every layer (no global state). The math is delegated to a backend; on the CPU
that is the PyTorch reference in kernels/reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.kernels import reference


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot each new token is written to
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: list[int]  # per sequence: tokens in the cache after this step (prefix + new)
    query_lens: list[int]  # per sequence: new tokens in this step
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer


class Attention(nn.Module):
    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [num_tokens, heads, D]; k, v: [num_tokens, kv_heads, D] -> [num_tokens, heads, D]."""
        k_cache, v_cache = meta.kv_caches[self.layer]
        reference.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return reference.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_lens,
            self.scale, self.sliding_window,
        )
