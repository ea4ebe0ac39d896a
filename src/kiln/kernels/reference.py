"""Plain PyTorch reference implementations of the ops that have (or will have) fast kernels.

These are the CPU path and the ground truth every GPU kernel is tested against, so they favour clarity:
loops over sequences, float32 math, no fusion.

Paged KV cache layout: k_cache and v_cache are [num_blocks, block_size, num_kv_heads, head_dim]; token
`pos` of a sequence lives in slot `block_table[pos // block_size] * block_size + pos % block_size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [num_tokens, kv_heads, head_dim]; slots: [num_tokens] int64 flat slot of each token."""
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)


def sequence_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions 0..length-1 of one sequence; block_table: [max_blocks] int32."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_lens: list[int],
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Causal attention of packed queries over each sequence's paged keys and values.

    q: [num_tokens, heads, head_dim], the queries of all sequences packed back to back; sequence i owns
    query_lens[i] tokens, which are its last query_lens[i] positions out of seq_lens[i] (a cached
    prefix followed by new tokens; decode is query_len 1). block_tables: [num_seqs, max_blocks] int32.
    sliding_window > 0 lets a query at position p see keys at positions > p - sliding_window only.
    Grouped-query attention: query head h reads KV head h // (heads // kv_heads).
    Returns [num_tokens, heads, head_dim] in q's dtype.
    """
    block_size = k_cache.shape[1]
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        slots = sequence_slots(block_tables[i], seq_len, block_size)
        k = k_cache.view(-1, kv_heads, k_cache.shape[3])[slots].float()  # [seq_len, kv_heads, D]
        v = v_cache.view(-1, kv_heads, v_cache.shape[3])[slots].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # [seq_len, heads, D]
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        qi = q[start : start + q_len].float()  # [q_len, heads, D]
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale  # [heads, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        visible = k_pos <= q_pos
        if sliding_window > 0:
            visible &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
        start += q_len
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] holding gate then up -> silu(gate) * up: [num_tokens, d]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden]; weight: [hidden]. Returns (norm(x + residual), x + residual).

    The sum is taken in x's dtype (it is the next layer's residual), the normalization in float32.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding. positions: [num_tokens] int64; q: [num_tokens, heads, D];
    k: [num_tokens, kv_heads, D]; cos, sin: [max_positions, D] float32 (each half repeated)."""
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def linear_int(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only integer linear (formats in kiln.quant.formats): dequantize to x's dtype, then matmul."""
    from kiln.quant.formats import dequantize_int

    parts = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        parts["zeros"] = zeros
    return F.linear(x, dequantize_int(parts, x.dtype))


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 e4m3: x quantized per token (dynamic scales), weight [out, in] e4m3 with per-row scales.

    Computed as the exact product of the two dequantized operands, in float32, returned in x's dtype.
    """
    from kiln.quant.formats import fake_quantize_fp8_per_token

    xq = fake_quantize_fp8_per_token(x.float())
    w = weight.float() * weight_scale.float().unsqueeze(1)
    return F.linear(xq, w).to(x.dtype)
