"""Rotary position embedding (the "rotate half" form of GPT-NeoX and Hugging Face Llama).

cos/sin are computed once in float32 for every position up to the engine's max_seq_len and indexed by
each token's position, so packed batches of any mix of prefill and decode need no special case.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import RopeConfig
from kiln.kernels import reference


def inverse_frequencies(head_dim: int, rope: RopeConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[head_dim // 2] float32, with linear or Llama-3 frequency scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: RopeConfig, max_positions: int, device: torch.device | str):
        super().__init__()
        inv = inverse_frequencies(head_dim, rope, device)
        pos = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv)  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens]; q: [num_tokens, heads, head_dim]; k: [num_tokens, kv_heads, head_dim]."""
        return reference.rotary_embedding(positions, q, k, self.cos, self.sin)
