"""The paged attention kernels (decode with split-KV, varlen prefill) against reference.paged_attention.

Without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) in fp16
and fp32 (the interpreter's bf16 tl.dot is wrong), at small shapes and with small tiles so that one
sequence spans several tiles and the masking edges are exercised. Cache slots nobody wrote hold NaN, and
block-table entries past a sequence's blocks point at a NaN block: a kernel that reads a key or value it
must not (even one it then masks with a zero weight) turns the output into NaN. The GPU tests at the end
run Mistral-7B shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference
from kiln.kernels.decode_attention import DecodeConfig, choose_num_splits, paged_decode_attention
from kiln.kernels.prefill_attention import PrefillConfig, paged_prefill_attention

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    # bf16: the kernel feeds P to the P.V product in bf16 (as flash attention does), so an output
    # of a few keys can move by ~1e-3 of its magnitude per key: 5e-3 absolute, plus the norm check.
    torch.bfloat16: {"rtol": 2e-2, "atol": 5e-3},
}


def make_batch(
    seq_lens: list[int], query_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, seed: int = 0, q_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed queries and a paged cache holding random K/V for every sequence, in shuffled,
    non-contiguous blocks. Returns q [sum(query_lens), heads, D], k_cache, v_cache, block_tables."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(need) + 2
    num_blocks = 2 * sum(need) + 2  # half the blocks belong to nobody
    perm = torch.randperm(num_blocks, generator=g, device=DEVICE)
    nan_block = int(perm[-1])
    tables = torch.full((len(seq_lens), max_blocks), nan_block, dtype=torch.int32, device=DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    used = 0
    for i, n in enumerate(seq_lens):
        tables[i, : need[i]] = perm[used : used + need[i]].int()
        used += need[i]
        slots = reference.sequence_slots(tables[i], n, block_size)
        k = torch.randn(n, kv_heads, head_dim, generator=g, device=DEVICE)
        v = torch.randn(n, kv_heads, head_dim, generator=g, device=DEVICE)
        reference.write_kv_cache(k, v, k_cache, v_cache, slots)
    q = (q_scale * torch.randn(sum(query_lens), heads, head_dim, generator=g, device=DEVICE)).to(dtype)
    return q, k_cache, v_cache, tables


def expected(q, k_cache, v_cache, tables, seq_lens, query_lens, window):
    """reference.paged_attention, with zero output for sequences of length 0 (padding rows)."""
    scale = q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    real = [i for i, n in enumerate(seq_lens) if n > 0]
    starts = [sum(query_lens[:i]) for i in range(len(seq_lens))]
    rows = torch.cat([torch.arange(starts[i], starts[i] + query_lens[i]) for i in real]).to(q.device)
    out[rows] = reference.paged_attention(
        q[rows], k_cache, v_cache, tables[real], [seq_lens[i] for i in real], [query_lens[i] for i in real],
        scale, window,
    )
    return out


def run_decode(seq_lens, heads, kv_heads, head_dim, block_size, dtype, num_splits, window=0, tile_n=16,
               seed=0, index_dtype=torch.int32):
    q, k_cache, v_cache, tables = make_batch(seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim,
                                             block_size, dtype, seed)
    lens = torch.tensor(seq_lens, dtype=index_dtype, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, tables.to(index_dtype), lens, head_dim**-0.5, window,
                                 num_splits, config=DecodeConfig(tile_n=tile_n))
    ref = expected(q, k_cache, v_cache, tables, seq_lens, [1] * len(seq_lens), window)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    return out


# ---- decode --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, block_size, tile_n, num_splits",
    [
        (4, 4, 64, 16, 16, 1),  # G=1, tile = block
        (4, 2, 64, 8, 16, 3),  # G=2, tile spans two blocks
        (8, 2, 48, 16, 32, 1),  # G=4, padded head_dim, tile spans two blocks
        (8, 1, 80, 16, 16, 8),  # G=8 (MQA), padded head_dim, more splits than tiles for short rows
        (16, 2, 64, 32, 16, 3),  # G=8, tile is a sub-tile of a block
    ],
)
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, tile_n, num_splits):
    # Lengths: 1, a multiple of the block, one past it, uneven ones.
    run_decode([1, 2 * block_size, 37, 2 * block_size + 1, 5], heads, kv_heads, head_dim, block_size,
               torch.float16, num_splits, tile_n=tile_n)


def test_decode_fp32_and_int64_indices():
    run_decode([19, 40], 4, 2, 32, 8, torch.float32, 2, index_dtype=torch.int64)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_decode_sliding_window(window, num_splits):
    run_decode([3, 16, 45, 64], 4, 2, 32, 16, torch.float16, num_splits, window=window)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_zero_length_rows_read_nothing(num_splits):
    # Padding rows of a CUDA-graph bucket: length 0, a block-table row of NaN blocks. Output zeros.
    out = run_decode([0, 21, 0], 4, 2, 32, 8, torch.float16, num_splits)
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)


def test_decode_writes_into_strided_out_and_reads_strided_q():
    seq_lens = [9, 30]
    q, k_cache, v_cache, tables = make_batch(seq_lens, [1, 1], 4, 2, 32, 8, torch.float16, seed=3)
    qkv = torch.zeros(2, 4 + 2 * 2, 32, dtype=q.dtype, device=DEVICE)  # q as a view into a fused qkv
    qkv[:, :4] = q
    out_buf = torch.full((2, 6, 32), 7.0, dtype=q.dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        res = paged_decode_attention(qkv[:, :4], k_cache, v_cache, tables, lens, 32**-0.5, 0, splits,
                                     out=out_buf[:, 1:5], config=DecodeConfig(tile_n=16))
        assert res.data_ptr() == out_buf[:, 1:5].data_ptr()
        torch.testing.assert_close(res, expected(q, k_cache, v_cache, tables, seq_lens, [1, 1], 0),
                                   **TOL[torch.float16])
        assert torch.all(out_buf[:, 0] == 7) and torch.all(out_buf[:, 5] == 7)


def test_decode_wrong_window_fails():
    """The tolerances are tight enough to see a one-key difference in the window."""
    seq_lens = [24]
    q, k_cache, v_cache, tables = make_batch(seq_lens, [1], 2, 1, 32, 8, torch.float16, seed=5, q_scale=3.0)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 32**-0.5, 9, 1,
                                 config=DecodeConfig(tile_n=16))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, expected(q, k_cache, v_cache, tables, seq_lens, [1], 8),
                                   **TOL[torch.float16])


def test_choose_num_splits():
    # Batch 1 on Mistral-7B (8 KV heads), 132 SMs: ~2 programs per SM.
    assert choose_num_splits(1, 8, 32768, 64, 132) == 32
    assert choose_num_splits(1, 8, 4096, 64, 132) == 32
    # Short contexts: every split keeps >= 128 tokens (and >= 2 blocks).
    assert choose_num_splits(1, 8, 512, 64, 132) == 4
    assert choose_num_splits(1, 8, 1024, 256, 132) == 2
    assert choose_num_splits(1, 8, 100, 16, 132) == 1
    # Big batches fill the GPU without splitting.
    assert choose_num_splits(64, 8, 4096, 64, 132) == 1
    assert choose_num_splits(8, 8, 4096, 64, 132) == 5
    for args in [(0, 8, 4096, 64, 132), (1, 1, 1, 8, 1), (1000, 32, 10**6, 128, 200)]:
        assert 1 <= choose_num_splits(*args) <= 32


# ---- prefill -------------------------------------------------------------------------------------

def run_prefill(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, config, window=0,
                seed=0, max_query_len=None, index_dtype=torch.int32):
    q, k_cache, v_cache, tables = make_batch(seq_lens, query_lens, heads, kv_heads, head_dim, block_size,
                                             dtype, seed)
    lens = torch.tensor(seq_lens, dtype=index_dtype, device=DEVICE)
    qsl = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(index_dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, tables.to(index_dtype), lens, qsl,
                                  max_query_len or max(query_lens), head_dim**-0.5, window, config=config)
    torch.testing.assert_close(out, expected(q, k_cache, v_cache, tables, seq_lens, query_lens, window),
                               **TOL[dtype])
    return out


# (seq_len, q_len): pure prefill, cached prefix + new tokens, decode rows, a block multiple, and a
# prefix followed by queries spanning several M tiles.
MIXED = [(37, 37), (50, 13), (20, 1), (32, 32), (9, 4), (1, 1), (60, 35)]


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, block_size, config",
    [
        (2, 2, 64, 16, PrefillConfig(16, 16)),  # tile = block
        (4, 2, 48, 8, PrefillConfig(16, 16)),  # tiles span two blocks, padded head_dim
        (8, 2, 80, 16, PrefillConfig(32, 16)),  # G=4, padded head_dim, several rows per diagonal tile
        (4, 1, 32, 8, PrefillConfig(16, 32)),  # MQA, tiles span four blocks, BLOCK_N > BLOCK_M
        (2, 1, 64, 16, None),  # the GPU defaults (one M tile per sequence here)
    ],
)
def test_prefill_mixed_batch(heads, kv_heads, head_dim, block_size, config):
    seq_lens, query_lens = zip(*MIXED)
    run_prefill(list(seq_lens), list(query_lens), heads, kv_heads, head_dim, block_size, torch.float16, config)


@pytest.mark.parametrize("window", [1, 5, 16, 23, 64])
def test_prefill_sliding_window(window):
    seq_lens, query_lens = zip(*MIXED)
    run_prefill(list(seq_lens), list(query_lens), 4, 2, 32, 8, torch.float16, PrefillConfig(16, 16), window)


def test_prefill_window_edges_with_wide_tiles():
    # BLOCK_M > window: rows of one tile have windows starting in different key tiles.
    run_prefill([70, 45], [70, 30], 2, 1, 32, 16, torch.float16, PrefillConfig(32, 16), window=12)


def test_prefill_fp32_int64_padding_rows_and_large_grid():
    # A padding sequence (q_len 0, length 0) and a max_query_len beyond every sequence's: extra
    # programs must exit without writing.
    seq_lens, query_lens = [25, 0, 7], [18, 0, 7]
    out = run_prefill(seq_lens, query_lens, 4, 2, 32, 8, torch.float32, PrefillConfig(16, 16),
                      max_query_len=64, index_dtype=torch.int64)
    assert torch.isfinite(out).all()


def test_prefill_decode_rows_match_decode_kernel():
    seq_lens = [1, 17, 40]
    q, k_cache, v_cache, tables = make_batch(seq_lens, [1, 1, 1], 4, 2, 32, 8, torch.float16, seed=7)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(4, dtype=torch.int32, device=DEVICE)
    a = paged_prefill_attention(q, k_cache, v_cache, tables, lens, qsl, 1, 32**-0.5, 0,
                                config=PrefillConfig(16, 16))
    b = paged_decode_attention(q, k_cache, v_cache, tables, lens, 32**-0.5, 0, 2, config=DecodeConfig(16))
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_rejects_bad_inputs():
    q, k_cache, v_cache, tables = make_batch([8], [1], 4, 2, 32, 8, torch.float16)
    lens = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k_cache, v_cache, tables, lens.float(), 1.0)
    with pytest.raises(ValueError):
        paged_decode_attention(q[:, :3], k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError):
        paged_decode_attention(q.float(), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError):
        paged_prefill_attention(q, k_cache, v_cache, tables, lens, lens, 1, 1.0)


# ---- GPU, Mistral-7B shapes, bf16 ------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64
gpu = pytest.mark.gpu


def assert_close_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Elementwise within bf16 rounding, and the relative error of the whole tensor well under 1%: over
    thousands of keys the outputs are small, so the norm check is what sees a missing or extra key."""
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 1e-2, f"relative error {rel:.3g}"


@gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("window", [0, 1024])
def test_gpu_decode_mistral(batch, window):
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 4097, (batch,), generator=g).tolist()
    seq_lens[0] = 4096
    if batch > 2:
        seq_lens[1], seq_lens[2] = 1, BLOCK
    q, k_cache, v_cache, tables = make_batch(seq_lens, [1] * batch, HEADS, KV_HEADS, HEAD_DIM, BLOCK,
                                             torch.bfloat16, seed=batch)
    ref = expected(q, k_cache, v_cache, tables, seq_lens, [1] * batch, window)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = choose_num_splits(batch, KV_HEADS, 4096, BLOCK, sms)
    for num_splits in sorted({1, 4, 16, 32, chosen}):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, window, num_splits)
        assert_close_bf16(out, ref)


@gpu
def test_gpu_decode_cuda_graph_replay():
    """Captured once, replayed after the sequences grew and a padding row appeared: the split ranges
    come from seq_lens in the kernel, so the replay must match a fresh reference."""
    seq_lens = [100, 3000, 4000, 1]
    q, k_cache, v_cache, tables = make_batch([4096] * 4, [1] * 4, HEADS, KV_HEADS, HEAD_DIM, BLOCK,
                                             torch.bfloat16, seed=11)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    args = (q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, 0, 16, out)
    paged_decode_attention(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args)
    for new_lens in ([101, 3001, 4001, 2], [2000, 4096, 0, 64]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_bf16(out, expected(q, k_cache, v_cache, tables, new_lens, [1] * 4, 0))


@gpu
@pytest.mark.parametrize("seq_lens, query_lens, window", [
    ([2048], [2048], 0),  # a prompt from scratch
    ([2048], [1024], 0),  # chunked prefill: 1024 cached + 1024 new
    ([2048], [2048], 512),
    ([1500, 2048, 700, 4096], [1500, 1024, 1, 1], 0),  # mixed batch with decode rows
])
def test_gpu_prefill_mistral(seq_lens, query_lens, window):
    q, k_cache, v_cache, tables = make_batch(seq_lens, query_lens, HEADS, KV_HEADS, HEAD_DIM, BLOCK,
                                             torch.bfloat16, seed=len(seq_lens))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, lens, qsl, max(query_lens), HEAD_DIM**-0.5,
                                  window)
    assert_close_bf16(out, expected(q, k_cache, v_cache, tables, seq_lens, query_lens, window))
