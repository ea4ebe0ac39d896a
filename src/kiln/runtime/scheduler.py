"""Which sequences run in the next step, and how many of their tokens.

Every step first continues the running sequences (a decode is one token, an unfinished prompt the
next chunk of it), then admits waiting ones while there is room: at most `max_batch_size` running
sequences and `max_num_tokens` tokens per step, so long prompts are prefilled in chunks. A sequence
is admitted only when the pool can hold its prompt plus max_tokens, so it never runs out of blocks.
"""

from __future__ import annotations

from collections import deque

from kiln.config import BuildConfig
from kiln.runtime.kv_cache import BlockPool
from kiln.runtime.sequence import Sequence, Status

Batch = list[tuple[Sequence, int]]  # (sequence, number of its tokens computed in this step)


class Scheduler:
    def __init__(self, build: BuildConfig, pool: BlockPool):
        self.build = build
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.build.max_num_tokens
        batch: Batch = []
        for seq in self.running:
            if budget == 0:
                break
            n = min(len(seq) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.build.max_batch_size:
            seq = self.waiting[0]
            if not self.pool.can_allocate(seq.max_len):
                break
            self.waiting.popleft()
            self.pool.grow(seq, seq.max_len)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def update(self, batch: Batch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance each sequence by its computed tokens and append its sampled token, if any.

        sampled: seq_id -> token for the sequences whose last token was computed this step.
        Returns the sequences that received a token.
        """
        advanced = []
        for seq, n in batch:
            seq.num_computed += n
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            seq.output_ids.append(token)
            advanced.append(seq)
            reason = stop_reason(seq, self.build.max_seq_len)
            if reason:
                self.finish(seq, reason)
        return advanced

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (also used for stop strings found after detokenizing, and cancels)."""
        if seq.finished:
            return
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq)


def stop_reason(seq: Sequence, max_seq_len: int) -> str | None:
    p = seq.params
    last = seq.output_ids[-1]
    if not p.ignore_eos and p.end_id is not None and last == p.end_id:
        return "stop"
    for stop in p.stop_token_ids:
        if stop and seq.output_ids[-len(stop) :] == list(stop):
            return "stop"
    if len(seq.output_ids) >= p.max_tokens or len(seq) >= max_seq_len:
        return "length"
    return None
