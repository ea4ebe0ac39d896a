"""Paged attention as a layer: rotate q and k, write this step's keys and values into the cache, attend.

`AttentionMetadata` describes one packed batch; the model runner builds it once per step and the
model passes it down to every layer (no global state). On CUDA tensors the work is done by Triton
kernels (rotary fused with the cache write; a decode kernel when every sequence adds one token, a
varlen prefill kernel otherwise); on the CPU by the PyTorch references in kernels/reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kiln.kernels import reference, use_triton
from kiln.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot each new token is written to (-1: none)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int: the cache blocks of each sequence
    seq_lens: list[int]  # per sequence: tokens in the cache after this step (prefix + new)
    query_lens: list[int]  # per sequence: new tokens in this step
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer
    # For the kernels: the same lengths as device tensors, and launch shapes fixed by the runner.
    seq_lens_t: torch.Tensor | None = None  # [num_seqs] int
    query_start_loc: torch.Tensor | None = None  # [num_seqs + 1] int, cumulative query_lens
    max_query_len: int = 0
    decode: bool = False  # every sequence adds exactly one token (the decode kernel applies)
    num_splits: int = 1  # split-KV parallelism of the decode kernel


class Attention(nn.Module):
    def __init__(
        self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int,
        rotary: RotaryEmbedding,
    ):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.rotary = [rotary]  # shared by all layers, kept out of this module's state

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """positions: [num_tokens]; q: [num_tokens, heads, D]; k, v: [num_tokens, kv_heads, D], before
        the rotary embedding -> [num_tokens, heads, D]."""
        k_cache, v_cache = meta.kv_caches[self.layer]
        rotary = self.rotary[0]
        if not use_triton(q):
            q, k = rotary(positions, q, k)
            reference.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            return reference.paged_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_lens,
                self.scale, self.sliding_window,
            )
        from kiln.kernels.rotary import rotary_and_cache_write

        rotary_and_cache_write(positions, q, k, v, rotary.cos, rotary.sin, k_cache, v_cache, meta.slot_mapping)
        assert meta.seq_lens_t is not None
        if meta.decode:
            from kiln.kernels.decode_attention import paged_decode_attention

            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens_t, self.scale, self.sliding_window,
                meta.num_splits,
            )
        from kiln.kernels.prefill_attention import paged_prefill_attention

        assert meta.query_start_loc is not None
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens_t, meta.query_start_loc,
            meta.max_query_len, self.scale, self.sliding_window,
        )
