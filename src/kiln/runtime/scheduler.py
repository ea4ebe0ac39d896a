"""Which sequences run in the next step, and how many of their tokens.

Every step first continues the running sequences (a decode is one token, an unfinished prompt the
next chunk of it), then admits waiting ones while there is room: at most `max_batch_size` running
sequences and `max_num_tokens` tokens per step, so long prompts are prefilled in chunks alongside the
decodes. Blocks are taken as sequences grow. A new sequence first takes the cached blocks of its
longest known prefix (those tokens are not computed again). When a running sequence needs a block
and none is free, the most recently admitted sequence is preempted: its blocks go back (its full
blocks stay in the prefix cache), it returns to the front of the queue, and later resumes by
recomputing prompt and output so far, so nothing is dropped and greedy output is unchanged.
"""

from __future__ import annotations

from collections import deque

from kiln.config import BuildConfig
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.sequence import Sequence, Status

Batch = list[tuple[Sequence, int]]  # (sequence, number of its tokens computed in this step)


class Scheduler:
    def __init__(self, build: BuildConfig, blocks: BlockManager):
        self.build = build
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.build.max_num_tokens
        batch: Batch = []
        preempted = False
        for seq in list(self.running):
            if budget == 0 or seq.status is not Status.RUNNING:  # out of budget, or preempted just now
                break
            n = min(len(seq) - seq.num_computed, budget)
            while not self.blocks.grow(seq, seq.num_computed + n):
                self._preempt(self.running[-1])
                preempted = True
                if seq.status is not Status.RUNNING:
                    break
            else:
                batch.append((seq, n))
                budget -= n
        if not preempted:
            batch += self._admit(budget)
        return batch

    def schedule_ahead(self, pending: dict[int, int], sampled: set[int]) -> tuple[Batch, list[int]] | None:
        """The next step while one is still in flight (runtime/engine.py, overlapped steps): the batch,
        and where each sequence starts. `pending`: seq_id -> tokens the step in flight computes;
        `sampled`: the seq_ids it samples (each will be one token longer, its token on the device).

        Like `schedule`, but a sequence starts past its pending tokens, and one that gets its last token
        (by length) from the step in flight is left out. Never preempts: None when a running sequence
        needs a block and none is free (the step is then scheduled the plain way, after the collect).
        """
        budget = self.build.max_num_tokens
        batch: Batch = []
        starts: list[int] = []
        for seq in self.running:
            if budget == 0:
                break
            start = seq.num_computed + pending.get(seq.seq_id, 0)
            length = len(seq)
            if seq.seq_id in sampled:
                if reaches_length(seq, self.build.max_seq_len, extra=1):
                    continue  # the step in flight gives it its last token
                length += 1
            n = min(length - start, budget)
            if n <= 0:
                continue
            if not self.blocks.grow(seq, start + n):
                return None
            batch.append((seq, n))
            starts.append(start)
            budget -= n
        for seq, n in self._admit(budget):
            batch.append((seq, n))
            starts.append(seq.num_computed)
        return batch, starts

    def _admit(self, budget: int) -> Batch:
        """Admit waiting sequences while the budget, max_batch_size and the free blocks allow."""
        batch: Batch = []
        while self.waiting and budget > 0 and len(self.running) < self.build.max_batch_size:
            seq = self.waiting[0]
            seq.cached_tokens = self.blocks.match_prefix(seq)
            n = min(len(seq) - seq.num_computed, budget)
            if not self.blocks.grow(seq, seq.num_computed + n):
                self._release(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
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
            if seq.finished:  # cancelled while its step ran
                continue
            seq.num_computed += n
            self.blocks.commit(seq)
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
        self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        """Give the blocks back; the sequence will be computed again from its first uncached token."""
        self.blocks.free(seq)
        seq.num_computed = 0


def stop_reason(seq: Sequence, max_seq_len: int) -> str | None:
    p = seq.params
    last = seq.output_ids[-1]
    if not p.ignore_eos and p.end_id is not None and last == p.end_id:
        return "stop"
    for stop in p.stop_token_ids:
        if stop and seq.output_ids[-len(stop) :] == list(stop):
            return "stop"
    if reaches_length(seq, max_seq_len):
        return "length"
    return None


def reaches_length(seq: Sequence, max_seq_len: int, extra: int = 0) -> bool:
    """Whether `seq`, with `extra` more tokens, has its max_tokens or the engine's max_seq_len."""
    return len(seq.output_ids) + extra >= seq.params.max_tokens or len(seq) + extra >= max_seq_len
