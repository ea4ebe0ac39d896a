"""Paged varlen prefill attention: packed queries of several sequences against their paged KV caches.

Shapes and dtypes:
  q:               [num_tokens, heads, head_dim] fp16/bf16/fp32, unit last stride (any other strides);
                   the queries of all sequences packed back to back.
  query_start_loc: [num_seqs + 1] int32/int64 device tensor, cumulative query lengths from 0.
  seq_lens:        [num_seqs] int32/int64 device tensor, cache length after this step (prefix + new).
                   Sequence i's queries are its positions seq_len - q_len .. seq_len - 1: a cached prefix
                   (prefix reuse, chunked prefill) followed by the new tokens; q_len 1 is a decode row,
                   q_len 0 (a padding row) does nothing.
  k/v_cache, block_tables: the paged layout described in decode_attention (same checks); all keys
                   and values, the new ones included, are read from the cache.
  max_query_len:   Python int >= every q_len: sizes the grid.
  out:             [num_tokens, heads, head_dim] in q's dtype.
Causal; sliding_window > 0: a query at position p sees keys at positions > p - sliding_window only.
head_dim <= 256 (padded to a power of two with masks), block_size a power of two >= 8.

Work decomposition: FlashAttention-2 style. Grid (heads, cdiv(max_query_len, BLOCK_M), num_seqs); a
program owns BLOCK_M consecutive queries of one head of one sequence and exits at once when the
sequence has fewer queries. Heads vary fastest so the G query heads sharing a KV head run together and
share its K/V tiles in L2; M tiles are taken in reverse order so the heaviest (longest-context) tiles
start first and the short ones fill the tail of the last wave. Keys are visited in BLOCK_N tiles from
the tile holding the first row's window start to the tile holding the last row's position: tiles that
every row sees entirely go through an unmasked loop, only the diagonal tiles (and the window's trailing
edge) pay for the masks. K/V tiles are gathered through the block table exactly as in decode_attention
(shared helpers). Online softmax in fp32 on log2(e)-prescaled scores (exp2); P is rounded to the
input dtype for the PV tl.dot; both dots accumulate in fp32.

Roofline (Mistral-7B: 32 heads, 8 KV heads, head_dim 128, bf16, 2048-token prompt from scratch): causal
FLOPs 4 * heads * head_dim * L^2 / 2 = 34 GFLOP per layer, 1.1 TFLOP for 32 layers; bytes are tiny in
comparison (q + out 32 MiB, K/V 8 MiB per layer), so the kernel is compute bound: at 50% of the H100's
~990 TFLOP/s dense bf16 rate the model's attention costs ~2.2 ms of the time to first token. Each K/V
tile is reused by BLOCK_M query rows (arithmetic intensity ~BLOCK_M FLOP/B from L2), which is why
BLOCK_M is 128 where registers allow. Decode rows (q_len 1) inside a mixed batch waste BLOCK_M - 1 rows
of tensor-core work per tile; pure decode batches go to decode_attention instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kiln.kernels.decode_attention import LOG2E, NEG_INIT, attend_kv_tiles, check_paged_inputs, dot_precision
from kiln.kernels.pdl import grid_dependency_sync, pdl_args


class PrefillConfig(NamedTuple):
    """Launch knobs of the prefill kernel (sweep them on the GPU). Powers of two, block_m/n >= 16."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def default_prefill_config(head_dim: int) -> PrefillConfig:
    if head_dim <= 64:
        return PrefillConfig(128, 64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        # acc 128x128 fp32 over 256 threads = 64 registers each; q + 3 stages of K/V tiles ~128 KiB smem.
        return PrefillConfig(128, 64, num_warps=8, num_stages=3)
    return PrefillConfig(64, 32, num_warps=4, num_stages=2)


# num_m_blocks follows the prompt length: not specializing on it (Triton would on 1 and multiples of 16)
# keeps a new prompt length from compiling the kernel again in the middle of serving.
@triton.jit(do_not_specialize=["num_m_blocks"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_ct, stride_ch,
    qk_scale, sliding_window, num_m_blocks,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    head = tl.program_id(0)
    m_block = num_m_blocks - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
    m_start = m_block * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = seq_len - q_len + offs_m
    qo_mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0)

    first = seq_len - q_len + m_start  # position of the tile's first query
    last = seq_len - q_len + tl.minimum(m_start + BLOCK_M, q_len) - 1  # ... and of its last real one
    # Key tiles [t_lo, t_hi) hold every key some row sees. Tiles in [t_full_lo, t_full_hi) are seen whole
    # by every row: causally (the tile ends at or before `first`) and by the window (it starts after
    # last - sliding_window). The ranges nest: t_lo <= t_full_lo <= t_full_hi <= t_hi.
    t_hi = tl.cdiv(last + 1, BLOCK_N)
    t_full_hi = (first + 1) // BLOCK_N
    t_lo = 0
    t_full_lo = 0
    if HAS_WINDOW:
        t_lo = tl.maximum(first - sliding_window + 1, 0) // BLOCK_N
        t_full_lo = tl.minimum(tl.cdiv(tl.maximum(last - sliding_window + 1, 0), BLOCK_N), t_full_hi)

    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    head_off = (head // GROUP) * stride_ch
    k_head = k_ptr + head_off
    v_head = v_ptr + head_off
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    if HAS_WINDOW:
        acc, l_i, m_i = attend_kv_tiles(
            acc, l_i, m_i, q, q_pos, k_head, v_head, bt_row, t_lo, t_full_lo, seq_len, sliding_window,
            qk_scale, stride_cb, stride_ct, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, True, DOT_PRECISION,
        )
    acc, l_i, m_i = attend_kv_tiles(
        acc, l_i, m_i, q, q_pos, k_head, v_head, bt_row, t_full_lo, t_full_hi, seq_len, sliding_window,
        qk_scale, stride_cb, stride_ct, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, HAS_WINDOW, DOT_PRECISION,
    )
    acc, l_i, m_i = attend_kv_tiles(
        acc, l_i, m_i, q, q_pos, k_head, v_head, bt_row, t_full_hi, t_hi, seq_len, sliding_window,
        qk_scale, stride_cb, stride_ct, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, HAS_WINDOW, DOT_PRECISION,
    )

    # Every real row sees at least its own key, so l_i > 0 there; padding rows are not stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=qo_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of packed varlen queries over their paged caches; see the module docstring.

    Returns `out` ([num_tokens, heads, head_dim], q's dtype). No host sync: the grid comes from shapes and
    max_query_len only.
    """
    out = check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, out)
    num_tokens, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_start_loc must be int32/int64 [{num_seqs + 1}]")
    if num_seqs > 65535:
        raise ValueError(f"at most 65535 sequences per launch, got {num_seqs}")
    cfg = config or default_prefill_config(head_dim)
    for name, v in (("block_m", cfg.block_m), ("block_n", cfg.block_n)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    num_m_blocks = triton.cdiv(max_query_len, cfg.block_m)
    _prefill_kernel[(heads, num_m_blocks, num_seqs)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * LOG2E, sliding_window, num_m_blocks,
        GROUP=heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_WINDOW=sliding_window > 0,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(q.device),
    )
    return out
