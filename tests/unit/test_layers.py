"""Tensor-parallel sharding rules (`shard`) and fused weight placement (`weight_loader`), for tp 1 and 2."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kiln.distributed.comm import SINGLE, TPGroup
from kiln.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

META = torch.device("meta")


def ranks(cls, *args, tp=2, **kwargs):
    """One layer per rank, parameters on the meta device (shard only needs the sharding rule)."""
    with META:
        return [cls(*args, tp=TPGroup(r, tp), **kwargs) for r in range(tp)]


@dataclass(frozen=True)
class LocalTP(TPGroup):
    """A rank of a pretend group whose collectives do nothing: lets a test combine the ranks itself."""

    def all_reduce(self, x):
        return x

    def all_gather_last_dim(self, x):
        return x


# ---- column / row -----------------------------------------------------------------------------------

def test_column_parallel_shard_weight_and_bias():
    full_w, full_b = torch.randn(8, 6), torch.randn(8)
    layers = ranks(ColumnParallelLinear, 6, 8, bias=True)
    for layer in layers:
        assert layer.weight.shape == (4, 6) and layer.bias.shape == (4,)
    ws = [layer.shard("weight", full_w) for layer in layers]
    bs = [layer.shard("bias", full_b) for layer in layers]
    assert all(w.shape == (4, 6) for w in ws)
    assert not torch.equal(ws[0], ws[1])
    assert torch.equal(torch.cat(ws, 0), full_w)
    assert torch.equal(torch.cat(bs, 0), full_b)


def test_column_parallel_outputs_concatenate_to_full():
    x, full_w, full_b = torch.randn(3, 6), torch.randn(8, 6), torch.randn(8)
    outs = []
    for r in range(2):
        layer = ColumnParallelLinear(6, 8, bias=True, tp=TPGroup(r, 2))
        layer.weight_loader("weight", layer.shard("weight", full_w))
        layer.weight_loader("bias", layer.shard("bias", full_b))
        outs.append(layer(x))
    assert torch.allclose(torch.cat(outs, -1), F.linear(x, full_w, full_b), atol=1e-6)


def test_row_parallel_shard_splits_input_dim():
    full = torch.randn(5, 8)
    layers = ranks(RowParallelLinear, 8, 5)
    for layer in layers:
        assert layer.weight.shape == (5, 4) and layer.bias is None
    ws = [layer.shard("weight", full) for layer in layers]
    assert all(w.shape == (5, 4) for w in ws)
    assert torch.equal(torch.cat(ws, 1), full)


def test_row_parallel_partial_sums_give_full_output():
    x, full = torch.randn(3, 8), torch.randn(5, 8)
    parts = []
    for r in range(2):
        layer = RowParallelLinear(8, 5, tp=LocalTP(r, 2))
        layer.weight_loader("weight", layer.shard("weight", full))
        parts.append(layer(x.chunk(2, -1)[r]))  # each rank sees its slice of the input features
    assert torch.allclose(parts[0] + parts[1], F.linear(x, full), atol=1e-5)


def test_single_rank_shard_is_identity():
    full = torch.randn(8, 6)
    with META:
        col, row = ColumnParallelLinear(6, 8, tp=SINGLE), RowParallelLinear(6, 8, tp=SINGLE)
    assert torch.equal(col.shard("weight", full), full)
    assert torch.equal(row.shard("weight", full.T.contiguous()), full.T)


def test_uneven_split_is_refused():
    with META:
        layer = ColumnParallelLinear(6, 8, tp=TPGroup(0, 2))
    with pytest.raises(ValueError):
        layer.shard("weight", torch.randn(7, 6))


# ---- merged gate/up -----------------------------------------------------------------------------------

def test_merged_column_shard_and_weight_loader_tp2():
    hidden, inter = 6, 10
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    fused_per_rank = []
    for r in range(2):
        layer = MergedColumnParallelLinear(hidden, [inter, inter], tp=TPGroup(r, 2))
        assert layer.weight.shape == (inter, hidden)  # 2 * inter / 2 ranks
        layer.weight.data.fill_(float("nan"))
        g, u = layer.shard("weight", gate, 0), layer.shard("weight", up, 1)
        layer.weight_loader("weight", g, 0)
        layer.weight_loader("weight", u, 1)
        assert torch.equal(layer.weight, torch.cat([g, u], 0))  # gate then up, every row written
        assert torch.equal(g, gate.chunk(2, 0)[r]) and torch.equal(u, up.chunk(2, 0)[r])
        fused_per_rank.append(layer.weight.clone())
    # rank outputs: [gate_r, up_r]; together they hold all of gate and up
    assert torch.equal(torch.cat([w[: inter // 2] for w in fused_per_rank]), gate)
    assert torch.equal(torch.cat([w[inter // 2 :] for w in fused_per_rank]), up)


def test_merged_column_unequal_sizes_single_rank():
    gate, up = torch.randn(4, 3), torch.randn(6, 3)
    layer = MergedColumnParallelLinear(3, [4, 6])
    layer.weight_loader("weight", up, 1)  # order of loading does not matter
    layer.weight_loader("weight", gate, 0)
    assert torch.equal(layer.weight, torch.cat([gate, up]))


def test_merged_column_wrong_shape_refused():
    layer = MergedColumnParallelLinear(3, [4, 4])
    with pytest.raises(ValueError):
        layer.weight_loader("weight", torch.randn(5, 3), 0)


# ---- fused q/k/v ----------------------------------------------------------------------------------------

def qkv_full(hidden, head_dim, heads, kv_heads, bias=False):
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    if bias:
        return q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    return q, k, v


def load_qkv(layer, name, q, k, v):
    getattr(layer, name).data.fill_(float("nan"))
    parts = []
    for sid, full in zip("qkv", (q, k, v)):
        local = layer.shard(name, full, sid)
        layer.weight_loader(name, local, sid)
        parts.append(local)
    return parts


def test_qkv_single_rank_fused_equals_cat():
    hidden, hd, heads, kvh = 16, 4, 4, 2
    q, k, v = qkv_full(hidden, hd, heads, kvh)
    qb, kb, vb = qkv_full(hidden, hd, heads, kvh, bias=True)
    layer = QKVParallelLinear(hidden, hd, heads, kvh, bias=True)
    assert layer.weight.shape == ((heads + 2 * kvh) * hd, hidden)
    load_qkv(layer, "weight", q, k, v)
    load_qkv(layer, "bias", qb, kb, vb)
    assert torch.equal(layer.weight, torch.cat([q, k, v]))
    assert torch.equal(layer.bias, torch.cat([qb, kb, vb]))
    x = torch.randn(2, hidden)
    want = torch.cat([F.linear(x, q, qb), F.linear(x, k, kb), F.linear(x, v, vb)], -1)
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_qkv_tp2_kv_heads_split():
    hidden, hd, heads, kvh = 16, 4, 4, 2
    q, k, v = qkv_full(hidden, hd, heads, kvh)
    qs, ks, vs = [], [], []
    for r in range(2):
        layer = QKVParallelLinear(hidden, hd, heads, kvh, bias=False, tp=TPGroup(r, 2))
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
        assert layer.weight.shape == ((2 + 2 * 1) * hd, hidden)
        lq, lk, lv = load_qkv(layer, "weight", q, k, v)
        assert torch.equal(layer.weight, torch.cat([lq, lk, lv]))
        qs.append(lq), ks.append(lk), vs.append(lv)
    assert torch.equal(torch.cat(qs), q)
    assert torch.equal(torch.cat(ks), k)
    assert torch.equal(torch.cat(vs), v)
    # rank 1 holds query heads 2, 3 and KV head 1 (GQA group of those heads)
    assert torch.equal(qs[1], q[2 * hd : 4 * hd]) and torch.equal(ks[1], k[hd : 2 * hd])


def test_qkv_tp2_single_kv_head_is_replicated():
    hidden, hd, heads, kvh = 12, 3, 4, 1
    q, k, v = qkv_full(hidden, hd, heads, kvh)
    qb, kb, vb = qkv_full(hidden, hd, heads, kvh, bias=True)
    qs = []
    for r in range(2):
        layer = QKVParallelLinear(hidden, hd, heads, kvh, bias=True, tp=TPGroup(r, 2))
        assert (layer.num_heads, layer.num_kv_heads) == (2, 1)
        assert layer.weight.shape == ((2 + 2) * hd, hidden)
        lq, lk, lv = load_qkv(layer, "weight", q, k, v)
        assert torch.equal(lk, k) and torch.equal(lv, v)  # whole KV head on both ranks
        assert torch.equal(layer.weight, torch.cat([lq, k, v]))
        _, bk, bv = load_qkv(layer, "bias", qb, kb, vb)
        assert torch.equal(bk, kb) and torch.equal(bv, vb)
        assert torch.equal(layer.bias, torch.cat([qb.chunk(2)[r], kb, vb]))
        qs.append(lq)
    assert torch.equal(torch.cat(qs), q)


def test_qkv_tp4_two_kv_heads_replicated_per_pair_of_ranks():
    hidden, hd, heads, kvh = 8, 2, 8, 2
    q, k, v = qkv_full(hidden, hd, heads, kvh)
    with META:
        layers = [QKVParallelLinear(hidden, hd, heads, kvh, bias=False, tp=TPGroup(r, 4)) for r in range(4)]
    ks = [layer.shard("weight", k, "k") for layer in layers]
    vs = [layer.shard("weight", v, "v") for layer in layers]
    qs = [layer.shard("weight", q, "q") for layer in layers]
    # query heads 2r, 2r+1 on rank r belong to KV head (2r) // 4 = r // 2
    for r in range(4):
        assert torch.equal(ks[r], k[(r // 2) * hd : (r // 2 + 1) * hd])
        assert torch.equal(vs[r], v[(r // 2) * hd : (r // 2 + 1) * hd])
    assert torch.equal(torch.cat(qs), q)


def test_qkv_tp2_matches_full_gqa_projection():
    """Per rank: its q heads and the KV head those q heads read, in the layout attention expects."""
    hidden, hd, heads, kvh = 16, 4, 8, 2
    q, k, v = qkv_full(hidden, hd, heads, kvh)
    x = torch.randn(3, hidden)
    full_q, full_k, full_v = F.linear(x, q), F.linear(x, k), F.linear(x, v)
    group = heads // kvh
    for r in range(2):
        layer = QKVParallelLinear(hidden, hd, heads, kvh, bias=False, tp=TPGroup(r, 2))
        load_qkv(layer, "weight", q, k, v)
        out = layer(x)
        nq, nkv = layer.num_heads * hd, layer.num_kv_heads * hd
        lq, lk, lv = out[:, :nq], out[:, nq : nq + nkv], out[:, nq + nkv :]
        assert torch.allclose(lq, full_q[:, r * nq : (r + 1) * nq], atol=1e-5)
        for local_h in range(layer.num_heads):
            global_h = r * layer.num_heads + local_h
            kv_local = local_h // (layer.num_heads // layer.num_kv_heads)
            kv_global = global_h // group
            assert torch.allclose(
                lk[:, kv_local * hd : (kv_local + 1) * hd], full_k[:, kv_global * hd : (kv_global + 1) * hd], atol=1e-5
            )
            assert torch.allclose(
                lv[:, kv_local * hd : (kv_local + 1) * hd], full_v[:, kv_global * hd : (kv_global + 1) * hd], atol=1e-5
            )


def test_qkv_invalid_head_counts():
    with pytest.raises(ValueError):
        QKVParallelLinear(12, 4, 3, 1, bias=False, tp=TPGroup(0, 2))
    with pytest.raises(ValueError):
        QKVParallelLinear(24, 4, 6, 3, bias=False, tp=TPGroup(0, 2))


def test_qkv_wrong_shape_refused():
    layer = QKVParallelLinear(8, 2, 4, 2, bias=False)
    with pytest.raises(ValueError):
        layer.weight_loader("weight", torch.randn(3 * 2, 8), "k")


# ---- vocab-parallel embedding ---------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [10, 11])
def test_vocab_embedding_shards_concat_to_full(vocab):
    full = torch.randn(vocab, 4)
    layers = ranks(VocabParallelEmbedding, vocab, 4)
    rows = -(-vocab // 2)
    shards = [layer.shard("weight", full) for layer in layers]
    assert all(s.shape == (rows, 4) for s in shards)
    assert [layer.start for layer in layers] == [0, rows]
    cat = torch.cat(shards, 0)
    assert torch.equal(cat[:vocab], full)
    assert torch.all(cat[vocab:] == 0)  # padding rows


def test_vocab_embedding_single_rank():
    full = torch.randn(7, 3)
    emb = VocabParallelEmbedding(7, 3)
    emb.weight_loader("weight", emb.shard("weight", full))
    ids = torch.tensor([0, 6, 3, 3])
    assert torch.equal(emb(ids), full[ids])
    h = torch.randn(2, 3)
    assert torch.allclose(emb.logits(h), h @ full.T, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_written_into_rows_of_a_shared_buffer(dtype):
    """CUDA graphs of every batch size write their logits into the first rows of one float32 buffer."""
    full = torch.randn(7, 3)
    emb = VocabParallelEmbedding(7, 3).to(dtype)
    emb.weight_loader("weight", emb.shard("weight", full).to(dtype))
    shared = torch.full((5, emb.logits_columns), float("nan"))
    h = torch.randn(2, 3, dtype=dtype)
    got = emb.logits(h, shared[:2])
    assert got.data_ptr() == shared.data_ptr() and got.dtype == torch.float32
    assert torch.equal(got, emb.logits(h))
    assert torch.isnan(shared[2:]).all()  # the rows past the batch are untouched


@dataclass(frozen=True)
class EchoTP(TPGroup):
    """Two ranks whose gather returns this rank's logits twice (both ranks hold the same rows)."""

    def all_gather_last_dim(self, x):
        return torch.cat([x, x], -1)


def test_tp_logits_gathered_into_the_shared_buffer():
    full = torch.randn(5, 4)
    emb = ParallelLMHead(9, 4, tp=EchoTP(0, 2))  # 5 rows per rank, 10 columns, 9 of them vocabulary
    emb.weight_loader("weight", full)
    shared = torch.zeros(3, emb.logits_columns)
    h = torch.randn(3, 4)
    got = emb.logits(h, shared)
    assert emb.logits_columns == 10 and got.shape == (3, 9) and got.data_ptr() == shared.data_ptr()
    assert torch.allclose(shared, torch.cat([h @ full.T] * 2, -1), atol=1e-6)


@pytest.mark.parametrize("vocab", [10, 11])
def test_vocab_embedding_tp2_forward_and_logits_combine(vocab):
    full = torch.randn(vocab, 4)
    ids = torch.tensor([0, vocab - 1, vocab // 2, 3, vocab // 2 - 1, 5])
    h = torch.randn(2, 4)
    outs, logits = [], []
    for r in range(2):
        emb = ParallelLMHead(vocab, 4, tp=LocalTP(r, 2))
        emb.weight_loader("weight", emb.shard("weight", full))
        outs.append(emb(ids))
        logits.append(emb.logits(h))
    assert torch.equal(outs[0] + outs[1], full[ids])  # each token found on exactly one rank
    assert torch.allclose(torch.cat(logits, -1)[:, :vocab], h @ full.T, atol=1e-6)
