"""A request in flight: its tokens, how many are in the KV cache, its blocks, and why it ended."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from kiln.config import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # new, or preempted: its blocks were taken back and it will be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # names of the leading full computed blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" (end id / stop sequence) or "length"
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at (last) admission
    # per output token: its log probability and the top alternatives (only when params.logprobs is set)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        """Prompt and output as one new list (a copy: for the hot path, see `ids`)."""
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output, without copying the rest."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Tokens this sequence may reach: its prompt plus max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
