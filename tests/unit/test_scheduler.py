"""Scheduler and BlockManager: admission, chunked prefill, decode priority, stop reasons, freeing blocks,
prefix caching, preemption and resume."""

import pytest
import torch

from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.kv_cache import BlockManager, allocate_kv_cache
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence, Status


def make(num_blocks=64, block_size=4, prefix_caching=True, **build):
    b = dict(max_batch_size=8, max_input_len=64, max_seq_len=128, max_num_tokens=64, tokens_per_block=block_size)
    b.update(build)
    pool = BlockManager(num_blocks, block_size, prefix_caching)
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

def test_block_manager_basics():
    pool = BlockManager(5, 4)
    assert pool.num_free == 5
    assert [pool.blocks_for(n) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    a, b = new_seq(3), new_seq(3)
    assert pool.grow(a, 9)
    assert len(a.block_table) == 3 and pool.num_free == 2
    assert pool.grow(a, 12)  # already enough
    assert len(a.block_table) == 3
    assert not pool.can_allocate(9) and pool.can_allocate(8)
    assert not pool.grow(b, 12)  # too few free: nothing taken
    assert b.block_table == [] and pool.num_free == 2
    assert pool.grow(b, 8)
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
    sched, pool = make(num_blocks=4, block_size=4, prefix_caching=False)  # 16 token slots
    a = new_seq(10, max_tokens=4)  # 3 blocks for its prompt
    b = new_seq(6, max_tokens=4)  # 2 blocks: do not fit next to a's prompt
    sched.add(a)
    sched.add(b)
    batch = step(sched)
    assert batch == [(a.seq_id, 10)]
    assert len(a.block_table) == 3 and pool.num_free == 1
    assert b.status is Status.WAITING and b.block_table == [] and list(sched.waiting) == [b]
    while not a.finished:
        assert b.seq_id not in [sid for sid, _ in step(sched)]
    assert a.finish_reason == "length" and len(a.output_ids) == 4
    assert pool.num_free == 4
    batch = step(sched)
    assert batch == [(b.seq_id, 6)]
    run_to_end(sched)
    assert b.finished and pool.num_free == 4


def test_blocks_are_taken_as_the_sequence_grows():
    sched, pool = make(num_blocks=10, block_size=4)
    s = new_seq(5, max_tokens=11)  # 16 tokens at most -> 4 blocks at the end
    sched.add(s)
    step(sched)
    assert len(s.block_table) == 2 and pool.num_free == 8  # the prompt's 5 tokens
    step(sched)  # token 6 computed: still in block 2
    assert len(s.block_table) == 2
    for _ in range(3):
        step(sched)
    assert len(s.block_table) == 3  # tokens 9.. need a third block
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
    assert len(flat) == len(set(flat)) == sum(pool.blocks_for(len(s.prompt_ids)) for s in seqs)
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
    assert len(set(pool._free) | set(pool._evictable)) == 16  # no block handed back twice


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
        in_use = len({b for s in seqs for b in s.block_table})  # shared prefix blocks count once
        assert in_use + pool.num_free == 12
    assert all(s.finished and len(s.output_ids) == s.params.max_tokens for s in seqs)
    assert pool.num_free == 12


# ---- prefix caching --------------------------------------------------------------------------------------

def fake_token(seq):
    """A deterministic stand-in for a model: the next token depends on every token so far."""
    return (sum(i * t for i, t in enumerate(seq.all_ids, 1)) * 31) % 997 + 3


def model_step(sched):
    batch = sched.schedule()
    sampled = {s.seq_id: fake_token(s) for s, n in batch if s.num_computed + n == len(s)}
    sched.update(batch, sampled)
    return batch


def test_same_prefix_shares_blocks_while_both_run():
    sched, pool = make(num_blocks=20, block_size=4)
    a = Sequence(list(range(10, 20)), SamplingParams(max_tokens=8))  # 10 tokens: 2 full blocks + 2
    sched.add(a)
    model_step(sched)
    b = Sequence(list(range(10, 20)) + [99, 98, 97], SamplingParams(max_tokens=8))
    sched.add(b)
    batch = model_step(sched)
    assert (b, 13 - 8) in batch  # its first 8 tokens came from the cache
    assert b.cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert pool._ref[a.block_table[0]] == 2
    distinct = {x for s in (a, b) for x in s.block_table}
    assert pool.num_free == 20 - len(distinct)
    while sched.has_work():
        model_step(sched)
    assert pool.num_free == 20 and pool.num_cached > 0
    assert pool.hit_tokens == 8 and pool.hit_rate == pytest.approx(8 / 23)


def test_cached_prefix_survives_its_sequence_and_gives_the_same_output():
    outputs = []
    sched, pool = make(num_blocks=20, block_size=4)
    for _ in range(2):
        s = Sequence(list(range(1, 14)), SamplingParams(max_tokens=6))
        sched.add(s)
        steps = 0
        while sched.has_work():
            model_step(sched)
            steps += 1
        outputs.append((s.output_ids, s.cached_tokens, steps))
    (out1, cached1, _), (out2, cached2, _) = outputs
    assert cached1 == 0 and cached2 == 12  # 13 prompt tokens: 3 full blocks, the last token recomputed
    assert out1 == out2


def test_whole_prompt_cached_still_computes_its_last_token():
    sched, pool = make(num_blocks=20, block_size=4)
    for expect in (0, 4):
        s = Sequence(list(range(1, 9)), SamplingParams(max_tokens=1))  # exactly 2 blocks
        sched.add(s)
        batch = model_step(sched)
        assert s.cached_tokens == expect and batch == [(s, 8 - expect)]
        assert s.finished and len(s.output_ids) == 1


def test_least_recently_used_cached_blocks_are_evicted_first():
    sched, pool = make(num_blocks=6, block_size=4)
    old = Sequence(list(range(100, 109)), SamplingParams(max_tokens=1))  # 9 tokens: 3 blocks
    sched.add(old)
    model_step(sched)
    assert old.finished and pool.num_cached == 2  # its 2 full blocks stay, named
    big = Sequence(list(range(200, 217)), SamplingParams(max_tokens=1))  # 17 tokens: 5 blocks
    sched.add(big)
    model_step(sched)  # the 4 never-named blocks first, then the least recently used cached one
    again = Sequence(list(range(100, 109)), SamplingParams(max_tokens=1))
    sched.add(again)
    model_step(sched)
    # old's blocks were let go last block first, so its second block went and its first stayed
    assert again.cached_tokens == 4
    assert pool.num_free == 6


def test_prefix_caching_off_shares_nothing():
    sched, pool = make(num_blocks=20, block_size=4, prefix_caching=False)
    for _ in range(2):
        s = Sequence(list(range(1, 14)), SamplingParams(max_tokens=2))
        sched.add(s)
        while sched.has_work():
            model_step(sched)
        assert s.cached_tokens == 0
    assert pool.num_cached == 0 and pool.hit_rate == 0.0


# ---- preemption ------------------------------------------------------------------------------------------

def run_workload(num_blocks, prefix_caching=True):
    sched, pool = make(num_blocks=num_blocks, block_size=4, max_batch_size=6, max_num_tokens=16,
                       prefix_caching=prefix_caching)
    seqs = [Sequence([5 + i] * (3 + 2 * i), SamplingParams(max_tokens=12 + i)) for i in range(6)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        model_step(sched)
        steps += 1
        assert steps < 500
        in_use = len({b for s in seqs for b in s.block_table})
        assert in_use + pool.num_free == num_blocks
    return seqs, sched, pool


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preempted_sequences_resume_with_identical_output(prefix_caching):
    roomy, sched_r, _ = run_workload(200, prefix_caching)
    tight, sched_t, pool = run_workload(12, prefix_caching)  # 48 tokens for up to 6 x ~26
    assert sched_r.num_preemptions == 0 and sched_t.num_preemptions > 0
    assert any(s.num_preemptions for s in tight)
    assert [s.output_ids for s in tight] == [s.output_ids for s in roomy]
    assert all(s.finish_reason == "length" for s in tight)
    assert pool.num_free == 12


def test_preemption_takes_the_latest_admitted_and_requeues_it_first():
    sched, pool = make(num_blocks=4, block_size=4, max_num_tokens=64, prefix_caching=False)
    a = Sequence([1] * 7, SamplingParams(max_tokens=8))  # 2 blocks, a third at token 9
    b = Sequence([2] * 7, SamplingParams(max_tokens=8))
    sched.add(a)
    sched.add(b)
    model_step(sched)  # both prefilled: 4 blocks used
    assert pool.num_free == 0
    model_step(sched)  # token 8 computed by both: still 2 blocks each
    model_step(sched)  # a needs a third block: b is preempted
    assert b.status is Status.WAITING and b.num_preemptions == 1 and b.block_table == []
    assert b.num_computed == 0 and len(b.output_ids) == 2 and list(sched.waiting) == [b]
    assert a.status is Status.RUNNING and len(a.block_table) == 3
