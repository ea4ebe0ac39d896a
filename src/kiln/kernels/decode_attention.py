"""Paged decode attention: one new query token per sequence against its paged KV cache (flash-decoding).

Shapes and dtypes:
  q:            [num_seqs, heads, head_dim] fp16/bf16/fp32, unit last stride (any token/head strides);
                the query of position seq_len - 1 of each sequence.
  k/v_cache:    [num_blocks, block_size, kv_heads, head_dim], q's dtype, both with the same strides and
                a unit last stride (the allocator makes them contiguous). Token `pos` of sequence i lives
                in block block_tables[i, pos // block_size], row pos % block_size. The current token's
                K/V are already in the cache.
  block_tables: [num_seqs, max_blocks] int32 or int64, unit last stride.
  seq_lens:     [num_seqs] int32 or int64 on the device: cached tokens including the new one. A row with
                seq_len 0 (a padding row of a CUDA-graph bucket) reads nothing and outputs zeros.
  out:          [num_seqs, heads, head_dim] in q's dtype.
Constraints: heads % kv_heads == 0; head_dim <= 256 (padded to a power of two >= 16 with masks);
block_size a power of two >= 8. Causal (the query is the last position); sliding_window > 0 keeps
keys at positions >= seq_len - sliding_window only, and whole tiles before that are never loaded.

Work decomposition. One program per (sequence, KV head, split) handles all G = heads // kv_heads query
heads that share the KV head as the rows of one tile (padded to >= 16 rows so tl.dot applies), so each
K/V byte is read once per KV head, not G times. Per iteration it reads one KV tile of TILE_N tokens
(DecodeConfig.tile_n, default 64 for head_dim <= 128): when block_size >= TILE_N the tile is a
sub-tile of one cache block (one block-table read per tile); when block_size < TILE_N (block 8..32)
the tile spans several cache blocks and each token looks up its own block (a tiny gather of table
entries that all hit L1). Tiles start at multiples of TILE_N in position space.

Split-KV: the tiles from the window start to seq_len are divided into `num_splits` contiguous ranges
computed in the kernel from seq_len, so the grid (num_seqs, kv_heads, num_splits) depends only on
shapes and one Python int: a CUDA graph captured once is right for every later (longer) step. With
num_splits > 1 each split writes its partial (running max in log2 units, sum of exp2, unnormalized
accumulator) to fp32 scratch and `_combine_kernel` rescales and sums them; a split with no tiles
writes max=-1e30, sum=0, acc=0 and drops out of the combine. With num_splits == 1 the output is
written directly.

Softmax in fp32 on log2(e)-prescaled scores (exp2); P is rounded to the cache dtype for the PV
tl.dot, which accumulates in fp32.

Roofline (Mistral-7B: 32 heads, 8 KV heads, head_dim 128, bf16). Bytes: K and V of every cached token,
2 * seq_len * kv_heads * head_dim * 2 B = 4 KiB per token per layer, 16 MiB per sequence at 4096
tokens, ~5 us at H100 HBM bandwidth (~3.3 TB/s). FLOPs: 4 * heads * head_dim * seq_len = 4 FLOP per
K/V byte with G = 4: deep in the memory-bound region (the ridge is ~300 FLOP/B), so padding G from 4
to 16 rows of tensor-core work costs nothing; what matters is keeping enough loads in flight. At batch
1 the grid has only kv_heads = 8 programs: split-KV multiplies that to fill the SMs
(choose_num_splits). Per-split overhead: q (G * head_dim) and the fp32 partial (G * (head_dim + 2)),
small next to a split's >= 128 tokens of K/V.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import grid_dependency_sync, launch_dependents, pdl_args

LOG2E = 1.4426950408889634
# Running-max start value: finite so that a row which has only seen masked (-inf) scores gets
# exp2(-inf - NEG_INIT) = 0 and alpha = exp2(0) = 1 instead of the NaN of (-inf) - (-inf).
NEG_INIT = tl.constexpr(-1.0e30)
MAX_HEAD_DIM = 256
MAX_SPLITS = 32


class DecodeConfig(NamedTuple):
    """Launch knobs of the decode kernel (sweep them on the GPU)."""

    tile_n: int = 64  # KV tokens per iteration, power of two >= 16
    num_warps: int = 4
    num_stages: int = 2


def default_decode_config(head_dim: int) -> DecodeConfig:
    # Keep a K plus a V tile at ~32 KiB of bf16 so registers and the pipeline buffers stay small.
    return DecodeConfig(tile_n=64 if head_dim <= 128 else 32)


@triton.jit
def _kv_row_offsets(
    bt_row, n0, seq_len, stride_cb, stride_ct,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
):
    """Element offsets (int64, [TILE_N]) into a cache of the rows holding key positions n0 .. n0+TILE_N-1
    of one sequence (bt_row: its block-table row; n0 a multiple of TILE_N). Positions >= seq_len get a
    valid offset (block 0) and must be masked by the caller."""
    offs_n = tl.arange(0, TILE_N)
    if BLOCK_SIZE >= TILE_N:
        # The tile lies inside one cache block: one table read, and rows known to be consecutive.
        blk = tl.load(bt_row + n0 // BLOCK_SIZE).to(tl.int64)
        rows = blk * stride_cb + ((n0 % BLOCK_SIZE) + offs_n) * stride_ct
    else:
        pos = n0 + offs_n
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < seq_len, other=0).to(tl.int64)
        rows = blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct
    return rows


@triton.jit
def attend_kv_tiles(
    acc, l_i, m_i, q, q_pos,
    k_head_ptr, v_head_ptr, bt_row, t_begin, t_end, seq_len, sliding_window, qk_scale,
    stride_cb, stride_ct,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the key tiles t_begin .. t_end-1 of one sequence.

    q: [M, BLOCK_D] query rows, q_pos: [M] their positions; k/v_head_ptr point at the cache with the KV
    head's offset added. MASKED applies causality, the sliding window and seq_len per element; without it
    every key of every tile must be visible to every row (the caller's promise), and nothing is masked.
    DOT_PRECISION: "ieee" for fp32 caches (no silent tf32); "tf32", the default, for fp16/bf16 (where it
    changes nothing).
    Shared with prefill_attention.
    """
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for t in range(t_begin, t_end):
        n0 = t * TILE_N
        k_pos = n0 + offs_n
        offs = _kv_row_offsets(bt_row, n0, seq_len, stride_cb, stride_ct, BLOCK_SIZE, TILE_N)
        offs = offs[:, None] + offs_d[None, :]
        if MASKED:
            kv_mask = (k_pos < seq_len)[:, None] & d_mask[None, :]
            k = tl.load(k_head_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(v_head_ptr + offs, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_head_ptr + offs, mask=d_mask[None, :], other=0.0)
            v = tl.load(v_head_ptr + offs, mask=d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_head_ptr + offs)
            v = tl.load(v_head_ptr + offs)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, TILE_N], log2 units
        if MASKED:
            # Keys past seq_len are past every real row's position too (rows past the queries are
            # never stored), so causality also masks them.
            visible = k_pos[None, :] <= q_pos[:, None]
            if HAS_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qs, stride_qh, stride_os, stride_oh, stride_bt, stride_cb, stride_ct, stride_ch,
    qk_scale, sliding_window, num_splits, num_heads,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    qo_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    seq64 = seq.to(tl.int64)
    q = tl.load(q_ptr + seq64 * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)

    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - sliding_window, 0)
    t_lo = lo // TILE_N
    t_hi = tl.cdiv(seq_len, TILE_N)
    per_split = tl.cdiv(t_hi - t_lo, num_splits)
    t_begin = t_lo + split * per_split
    t_end = tl.minimum(t_begin + per_split, t_hi)  # may be <= t_begin: an empty split

    m_i = tl.full([BLOCK_G], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    head_off = kv_head * stride_ch
    acc, l_i, m_i = attend_kv_tiles(
        acc, l_i, m_i, q, q_pos,
        k_ptr + head_off, v_ptr + head_off, bt_ptr + seq64 * stride_bt, t_begin, t_end, seq_len,
        sliding_window, qk_scale, stride_cb, stride_ct,
        HEAD_DIM, BLOCK_D, BLOCK_SIZE, TILE_N, True, HAS_WINDOW, DOT_PRECISION,
    )

    launch_dependents(USE_PDL)  # main loop done: the next kernel may start (KILN_PDL=late)
    if SPLIT:
        row = (seq64 * num_heads + heads) * num_splits + split  # partial buffers: [seqs, heads, splits, ...]
        g_mask = offs_g < GROUP
        tl.store(part_m_ptr + row, m_i, mask=g_mask)
        tl.store(part_l_ptr + row, l_i, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=qo_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only for seq_len 0: zeros
        out_ptrs = out_ptr + seq64 * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=qo_mask)


@triton.jit
def _combine_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_os, stride_oh, num_splits, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    row = (seq * num_heads + head) * num_splits + offs_s
    m = tl.load(part_m_ptr + row, mask=s_mask, other=NEG_INIT)
    part_l = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                  other=0.0)
    # Empty splits have m = NEG_INIT: weight 0 next to any real split; if all are empty, l_sum = 0.
    w = tl.exp2(m - tl.max(m, 0))
    l_sum = tl.sum(part_l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, out: torch.Tensor | None,
) -> torch.Tensor:
    """Validate the arguments shared by the decode and prefill kernels; returns `out` (allocated if None)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be 3-D and the caches 4-D, got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    _, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    if q.shape[2] != head_dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if block_size < 8 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 8, got {block_size}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype} must be q's dtype {q.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and the caches must have a unit last stride")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError("block_tables must be [num_seqs, max_blocks] with a unit last stride")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a unit last stride")
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of each sequence's one new query over its paged cache; see the module docstring.

    Returns `out` ([num_seqs, heads, head_dim], q's dtype). No host sync: safe to capture in a CUDA graph
    (the split scratch is allocated from shapes only).
    """
    out = check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, out)
    num_seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if q.shape[0] != seq_lens.shape[0]:
        raise ValueError("decode takes one query per sequence")
    if not 1 <= num_splits <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")
    cfg = config or default_decode_config(head_dim)
    if cfg.tile_n < 16 or cfg.tile_n & (cfg.tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 16, got {cfg.tile_n}")
    if num_seqs == 0:
        return out

    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    split = num_splits > 1
    if split:
        part_m = torch.empty((num_seqs, heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((num_seqs, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # never touched
    _decode_kernel[(num_seqs, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * LOG2E, sliding_window, num_splits, heads,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, TILE_N=cfg.tile_n, HAS_WINDOW=sliding_window > 0, SPLIT=split,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(q.device, late=True),
    )
    if split:
        _combine_kernel[(num_seqs, heads)](
            out, part_m, part_l, part_acc,
            out.stride(0), out.stride(1), num_splits, heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4 if block_d * num_splits >= 2048 else 2, **pdl_args(q.device),
        )
    return out


def choose_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int, block_size: int, num_sms: int) -> int:
    """Split-KV factor for a decode batch; a pure function of the launch shape (fixed per CUDA graph).

    Without splits the grid has num_seqs * kv_heads programs, 8 at batch 1 on Mistral-7B: 8 of 132
    SMs would stream the whole cache. Aim for ~2 programs per SM (one streaming while the other waits on
    memory) but give each split at least 2 cache blocks and 128 tokens, or the fixed cost of a split (q
    load, partial write, the combine kernel) outweighs its share of K/V. Capped at MAX_SPLITS: beyond
    that the combine's scratch traffic grows and the SMs are full anyway. max_seq_len is the longest
    context the launch must serve (for a CUDA graph: the model's limit); short sequences simply leave
    the trailing splits empty, which costs one tiny program each.
    """
    programs = max(1, num_seqs * kv_heads)
    wanted = -(-2 * num_sms // programs)
    min_tokens = max(2 * block_size, 128)
    by_length = max(1, max_seq_len // min_tokens)
    return max(1, min(wanted, by_length, MAX_SPLITS))
