"""Scheduler and BlockPool: admission, chunked prefill, decode priority, stop reasons, freeing blocks."""

import pytest
import torch

from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.kv_cache import BlockPool, allocate_kv_cache
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence, Status


def make(num_blocks=64, block_size=4, **build):
    b = dict(max_batch_size=8, max_input_len=64, max_seq_len=128, max_num_tokens=64, tokens_per_block=block_size)
    b.update(build)
    pool = BlockPool(num_blocks, block_size)
    return Scheduler(BuildConfig(**b), pool), pool


def new_seq(prompt_len, max_tokens=4, **params):
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **params))


def step(sched, token=7, tokens=None):
    """One engine step without a model: sample `token` for each sequence whose last token was computed."""
    batch = sched.schedule()
    sampled = {}
    for seq, n in batch:
        if seq.num_computed + n == len(seq):
            sampled[seq.seq_id] = tokens.pop(0) if tokens else token
    sched.update(batch, sampled)
    return [(s.seq_id, n) for s, n in batch]


def run_to_end(sched, limit=1000):
    steps = 0
    while sched.has_work():
        step(sched)
        steps += 1
        assert steps < limit
    return steps


# ---- BlockPool -------------------------------------------------------------------------------------------

def test_block_pool_basics():
    pool = BlockPool(5, 4)
    assert pool.num_free == 5
    assert [pool.blocks_for(n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    a, b = new_seq(3), new_seq(3)
    pool.grow(a, 9)
    assert len(a.block_table) == 3 and pool.num_free == 2
    pool.grow(a, 12)  # already enough
    assert len(a.block_table) == 3
    assert not pool.can_allocate(9) and pool.can_allocate(8)
    with pytest.raises(RuntimeError):
        pool.grow(b, 12)
    pool.grow(b, 8)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert sorted(a.block_table + b.block_table) == list(range(5))
    pool.free(a)
    assert a.block_table == [] and pool.num_free == 3
    pool.free(b)
    assert pool.num_free == 5


def test_allocate_kv_cache_shapes():
    cache = allocate_kv_cache(3, 5, 4, 2, 8, torch.float32, "cpu")
    assert len(cache) == 3
    for k, v in cache:
        assert k.shape == v.shape == (5, 4, 2, 8)
        assert k.data_ptr() != v.data_ptr()


# ---- admission -------------------------------------------------------------------------------------------

def test_max_batch_size_limits_running():
    sched, pool = make(max_batch_size=2)
    seqs = [new_seq(3, max_tokens=2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    batch = step(sched)
    assert [sid for sid, _ in batch] == [seqs[0].seq_id, seqs[1].seq_id]
    assert seqs[2].status is Status.WAITING and seqs[2].block_table == []
    batch = step(sched)  # the first two finish (max_tokens 2) at the end of this step
    assert seqs[0].finished and seqs[1].finished
    assert seqs[2].seq_id not in [sid for sid, _ in batch]
    batch = step(sched)
    assert batch == [(seqs[2].seq_id, 3)]
    assert len(sched.running) == 1


def test_waits_for_blocks_then_runs_after_another_frees():
    sched, pool = make(num_blocks=4, block_size=4)  # 16 token slots
    a = new_seq(6, max_tokens=4)  # 10 tokens -> 3 blocks
    b = new_seq(6, max_tokens=4)  # 3 blocks: does not fit next to a
    sched.add(a)
    sched.add(b)
    batch = step(sched)
    assert batch == [(a.seq_id, 6)]
    assert len(a.block_table) == 3 and pool.num_free == 1
    assert b.status is Status.WAITING and list(sched.waiting) == [b]
    while not a.finished:
        assert b.seq_id not in [sid for sid, _ in step(sched)]
    assert a.finish_reason == "length" and len(a.output_ids) == 4
    assert pool.num_free == 4
    batch = step(sched)
    assert batch == [(b.seq_id, 6)]
    assert len(b.block_table) == 3
    run_to_end(sched)
    assert b.finished and pool.num_free == 4


def test_admission_reserves_prompt_plus_max_tokens():
    sched, pool = make(num_blocks=10, block_size=4)
    s = new_seq(5, max_tokens=11)  # 16 tokens -> 4 blocks
    sched.add(s)
    step(sched)
    assert len(s.block_table) == 4 and pool.num_free == 6
    run_to_end(sched)
    assert len(s.output_ids) == 11
    assert pool.num_free == 10


def test_concurrent_sequences_own_disjoint_blocks():
    sched, pool = make(num_blocks=20, block_size=2)
    seqs = [new_seq(n, max_tokens=3) for n in (3, 5, 1, 4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    tables = [s.block_table for s in seqs]
    flat = [b for t in tables for b in t]
    assert len(flat) == len(set(flat)) == sum(pool.blocks_for(s.max_len) for s in seqs)
    assert pool.num_free == 20 - len(flat)


# ---- token budget ----------------------------------------------------------------------------------------

def test_long_prompt_is_chunked_by_max_num_tokens():
    sched, pool = make(max_num_tokens=8)
    s = new_seq(20, max_tokens=2)
    sched.add(s)
    assert step(sched) == [(s.seq_id, 8)]
    assert s.num_computed == 8 and s.output_ids == []
    assert step(sched) == [(s.seq_id, 8)]
    assert s.num_computed == 16 and s.output_ids == []
    assert step(sched) == [(s.seq_id, 4)]
    assert s.num_computed == 20 and s.output_ids == [7]  # first token only after the whole prompt
    assert step(sched) == [(s.seq_id, 1)]
    assert s.finished and s.output_ids == [7, 7]


def test_budget_never_exceeded_and_decodes_first():
    sched, pool = make(max_num_tokens=8)
    a = new_seq(3, max_tokens=10)
    sched.add(a)
    assert step(sched) == [(a.seq_id, 3)]  # a now decodes
    b = new_seq(20, max_tokens=2)
    c = new_seq(2, max_tokens=2)
    sched.add(b)
    sched.add(c)
    batch = step(sched)
    assert batch == [(a.seq_id, 1), (b.seq_id, 7)]  # a's decode first, b gets the rest of the budget
    batch = step(sched)
    assert batch == [(a.seq_id, 1), (b.seq_id, 7)]
    batch = step(sched)
    # b's last 6 prompt tokens leave 1 token of budget: c is admitted with one chunk of its prompt.
    assert batch == [(a.seq_id, 1), (b.seq_id, 6), (c.seq_id, 1)]
    batch = step(sched)
    assert batch == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 1)]
    while sched.has_work():
        total = sum(n for _, n in step(sched))
        assert total <= 8


def test_decodes_keep_running_while_prompt_chunks():
    sched, pool = make(max_num_tokens=4, max_batch_size=4)
    decoders = [new_seq(1, max_tokens=50) for _ in range(3)]
    for s in decoders:
        sched.add(s)
    step(sched)
    long = new_seq(30, max_tokens=1)
    sched.add(long)
    for _ in range(30):
        batch = step(sched)
        ids = [sid for sid, _ in batch]
        assert ids[:3] == [s.seq_id for s in decoders]  # every decode is in every step, first
        assert sum(n for _, n in batch) <= 4
        if long.finished:
            break
    assert long.finished and long.num_computed == 30


# ---- stop reasons ----------------------------------------------------------------------------------------

def test_end_id_stops():
    sched, pool = make()
    s = new_seq(3, max_tokens=10, end_id=2)
    sched.add(s)
    step(sched, tokens=[5])
    step(sched, tokens=[2])
    assert s.finished and s.finish_reason == "stop" and s.output_ids == [5, 2]
    assert pool.num_free == pool.num_blocks and not sched.has_work()


def test_ignore_eos_runs_to_max_tokens():
    sched, pool = make()
    s = new_seq(3, max_tokens=4, end_id=2, ignore_eos=True)
    sched.add(s)
    for _ in range(3):
        step(sched, token=2)
        assert not s.finished
    step(sched, token=2)
    assert s.finished and s.finish_reason == "length" and s.output_ids == [2, 2, 2, 2]


def test_end_id_in_prompt_does_not_stop():
    sched, pool = make()
    s = Sequence([2, 2, 2], SamplingParams(max_tokens=3, end_id=2))
    sched.add(s)
    step(sched, token=5)
    assert not s.finished


def test_stop_token_ids_sequence():
    sched, pool = make()
    s = new_seq(3, max_tokens=20, stop_token_ids=((8, 9), (4,)))
    sched.add(s)
    for t in [8, 5, 9, 8]:
        step(sched, token=t)
        assert not s.finished
    step(sched, token=9)
    assert s.finished and s.finish_reason == "stop" and s.output_ids == [8, 5, 9, 8, 9]
    s2 = new_seq(3, max_tokens=20, stop_token_ids=((8, 9), (4,)))
    sched.add(s2)
    step(sched, token=4)
    assert s2.finished and s2.finish_reason == "stop"


def test_stop_token_ids_not_matched_across_prompt():
    sched, pool = make()
    s = Sequence([1, 8], SamplingParams(max_tokens=5, stop_token_ids=((8, 9),)))
    sched.add(s)
    step(sched, token=9)
    assert not s.finished


def test_max_tokens_gives_length():
    sched, pool = make()
    s = new_seq(3, max_tokens=3)
    sched.add(s)
    run_to_end(sched)
    assert s.finish_reason == "length" and len(s.output_ids) == 3


def test_max_seq_len_gives_length():
    sched, pool = make(max_seq_len=8, max_input_len=8)
    s = new_seq(6, max_tokens=10)
    sched.add(s)
    run_to_end(sched)
    assert s.finish_reason == "length" and len(s) == 8


# ---- finish ----------------------------------------------------------------------------------------------

def test_finish_frees_blocks_and_is_idempotent():
    sched, pool = make(num_blocks=16)
    a, b = new_seq(5, max_tokens=8), new_seq(5, max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)
    used = len(a.block_table) + len(b.block_table)
    assert pool.num_free == 16 - used
    sched.finish(a, "cancelled")
    assert a.finished and a.finish_reason == "cancelled" and a.block_table == []
    assert a not in sched.running and pool.num_free == 16 - len(b.block_table)
    sched.finish(a, "stop")  # second finish changes nothing, frees nothing twice
    assert a.finish_reason == "cancelled" and pool.num_free == 16 - len(b.block_table)
    run_to_end(sched)
    assert pool.num_free == 16
    assert len(set(pool._free)) == 16  # no block handed back twice


def test_finish_waiting_sequence():
    sched, pool = make(max_batch_size=1)
    a, b = new_seq(2), new_seq(2)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(b, "cancelled")
    assert b.finished and b not in sched.waiting
    run_to_end(sched)
    assert pool.num_free == pool.num_blocks


def test_many_sequences_all_finish_and_pool_is_full_again():
    sched, pool = make(num_blocks=12, block_size=4, max_batch_size=3, max_num_tokens=10)
    seqs = [new_seq(1 + (i * 7) % 13, max_tokens=1 + i % 5) for i in range(12)]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        step(sched)
        assert len(sched.running) <= 3
        in_use = sum(len(s.block_table) for s in seqs)
        assert in_use + pool.num_free == 12
    assert all(s.finished and len(s.output_ids) == s.params.max_tokens for s in seqs)
    assert pool.num_free == 12
