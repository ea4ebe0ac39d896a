"""reference.paged_attention against dense causal attention on contiguous keys and values."""

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.reference import paged_attention, sequence_slots, silu_and_mul, write_kv_cache


def dense_attention(q, k, v, scale, window=0):
    """q: [q_len, H, D] (the last q_len positions), k, v: [seq_len, KVH, D] -> [q_len, H, D]."""
    q_len, heads, _ = q.shape
    seq_len, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    qt, kt, vt = (t.transpose(0, 1).float() for t in (q, k, v))  # [H, len, D]
    if q_len == seq_len and window == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        mask = k_pos <= q_pos
        if window > 0:
            mask &= (q_pos - k_pos) < window
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def build_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, gen, dtype=torch.float32):
    """Random contiguous K/V per sequence scattered into a paged cache through random block tables."""
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    max_blocks = max(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)  # garbage
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    ks, vs, qs = [], [], []
    used = 0
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        blocks = perm[used : used + need[i]]
        used += need[i]
        tables[i, : need[i]] = blocks.int()
        tables[i, need[i] :] = perm[-1]  # padding points at some other block; must not be read
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(n):
            b, off = int(blocks[pos // block_size]), pos % block_size
            k_cache[b, off], v_cache[b, off] = k[pos], v[pos]
        ks.append(k), vs.append(v)
        qs.append(torch.randn(ql, heads, head_dim, generator=gen).to(dtype))
    return torch.cat(qs), k_cache, v_cache, tables, ks, vs


def check(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, window=0, seed=0, dtype=torch.float32, atol=1e-5):
    gen = torch.Generator().manual_seed(seed)
    q, k_cache, v_cache, tables, ks, vs = build_case(
        seq_lens, query_lens, heads, kv_heads, head_dim, block_size, gen, dtype
    )
    scale = 1 / math.sqrt(head_dim)
    out = paged_attention(q, k_cache, v_cache, tables, seq_lens, query_lens, scale, sliding_window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    start = 0
    for ql, k, v in zip(query_lens, ks, vs):
        want = dense_attention(q[start : start + ql], k, v, scale, window)
        torch.testing.assert_close(out[start : start + ql].float(), want, atol=atol, rtol=atol)
        start += ql


SEQS = [
    # (seq_lens, query_lens): prefill from 0, prefill after a cached prefix, decode, single token
    ([7], [7]),
    ([13, 5, 9, 1], [13, 2, 1, 1]),
    ([20, 3, 17], [6, 3, 1]),
    ([33, 16, 8], [1, 16, 5]),
]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seqs", SEQS, ids=["prefill", "mixed", "chunked", "decode"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_dense_causal(block_size, seqs, heads, kv_heads):
    seq_lens, query_lens = seqs
    check(seq_lens, query_lens, heads, kv_heads, 8, block_size, seed=block_size * 7 + heads + kv_heads)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_sliding_window(block_size, window):
    check([21, 12, 6, 30], [21, 5, 1, 9], 4, 2, 8, block_size, window=window, seed=window + block_size)


def test_window_one_attends_to_self_only():
    gen = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, tables, ks, vs = build_case([6], [6], 2, 2, 4, 4, gen)
    out = paged_attention(q, k_cache, v_cache, tables, [6], [6], 0.5, sliding_window=1)
    torch.testing.assert_close(out, vs[0])


def test_window_actually_changes_result():
    gen = torch.Generator().manual_seed(4)
    q, k_cache, v_cache, tables, _, _ = build_case([12], [4], 2, 1, 8, 4, gen)
    full = paged_attention(q, k_cache, v_cache, tables, [12], [4], 0.3)
    windowed = paged_attention(q, k_cache, v_cache, tables, [12], [4], 0.3, sliding_window=4)
    assert not torch.allclose(full, windowed)


def test_bfloat16_inputs():
    check([10, 5], [3, 5], 4, 2, 16, 4, seed=11, dtype=torch.bfloat16, atol=2e-2)


def test_write_kv_cache_and_sequence_slots_round_trip():
    gen = torch.Generator().manual_seed(5)
    block_size, kv_heads, hd = 4, 2, 8
    k_cache = torch.zeros(10, block_size, kv_heads, hd)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([7, 2, 9, 0], dtype=torch.int32)
    slots = sequence_slots(table, 11, block_size)
    assert slots.tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 36, 37, 38]
    k = torch.randn(11, kv_heads, hd, generator=gen)
    v = torch.randn(11, kv_heads, hd, generator=gen)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[7], k[:4]) and torch.equal(k_cache[2], k[4:8]) and torch.equal(v_cache[9, :3], v[8:])
    assert torch.all(k_cache[[1, 3, 4, 5, 6, 8]] == 0)
    # prefix written first, then two more tokens: attention over the cache equals dense attention
    q = torch.randn(2, 4, hd, generator=gen)
    k2, v2 = torch.randn(2, kv_heads, hd, generator=gen), torch.randn(2, kv_heads, hd, generator=gen)
    write_kv_cache(k2, v2, k_cache, v_cache, sequence_slots(table, 13, block_size)[11:])
    out = paged_attention(q, k_cache, v_cache, table[None], [13], [2], 0.25)
    want = dense_attention(q, torch.cat([k, k2]), torch.cat([v, v2]), 0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])
