"""Offline throughput, as trtllm-bench measures it: many requests submitted at once, batched in flight.

Prompts are random token ids and end-of-sequence is ignored, so every request produces exactly the
output length asked for and the figures depend only on the lengths, never on what the model says.
A short warm-up runs first, so kernel compilation and first-call allocations are not counted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from kiln.bench.lengths import Stats, ms_line, stats_json
from kiln.config import BuildConfig, SamplingParams
from kiln.errors import LimitError
from kiln.runtime.engine import LLM, RequestOutput

WARMUP_REQUESTS = 4
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class RequestTiming:
    """What one request took: its lengths, time to first token, end-to-end latency and gaps between tokens."""

    input_len: int
    output_len: int  # tokens actually produced
    ttft_s: float
    latency_s: float
    gaps_s: tuple[float, ...] = ()  # between successive stream events of this request

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a request of one output token."""
        if self.output_len < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)


@dataclass(frozen=True)
class ThroughputResult:
    num_requests: int
    input_tokens: int
    output_tokens: int
    wall_s: float
    ttft: Stats | None
    tpot: Stats | None  # per request: (latency - ttft) / (output tokens - 1)
    itl: Stats | None  # gaps between successive tokens of a request, all requests pooled
    latency: Stats | None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    def lines(self) -> list[str]:
        n = self.num_requests
        return [
            f"{n} requests: {self.input_tokens} prompt tokens (mean {self.input_tokens / n:.1f}), "
            f"{self.output_tokens} output tokens (mean {self.output_tokens / n:.1f})",
            f"{'wall time':<22} {self.wall_s:9.3f} s",
            f"{'throughput':<22} {self.output_tokens_per_s:9.1f} output tokens/s, "
            f"{self.total_tokens_per_s:.1f} total tokens/s, {self.requests_per_s:.2f} requests/s",
            ms_line("time to first token", self.ttft),
            ms_line("time per output token", self.tpot),
            ms_line("inter-token latency", self.itl),
            ms_line("request latency", self.latency),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "wall_s": self.wall_s,
            "output_tokens_per_s": self.output_tokens_per_s, "total_tokens_per_s": self.total_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_s": stats_json(self.ttft), "tpot_s": stats_json(self.tpot), "itl_s": stats_json(self.itl),
            "latency_s": stats_json(self.latency),
        }

    def to_json(self, **extra: Any) -> str:
        """The figures (times in seconds) and any `extra` fields (what was measured, the settings)."""
        return json.dumps({**extra, **self.to_dict()}, indent=2) + "\n"


def summarize(timings: list[RequestTiming], wall_s: float) -> ThroughputResult:
    """The throughput figures of a finished run."""
    if not timings or wall_s <= 0:
        raise ValueError("a throughput run needs at least one request and a positive wall time")
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    return ThroughputResult(
        num_requests=len(timings),
        input_tokens=sum(t.input_len for t in timings),
        output_tokens=sum(t.output_len for t in timings),
        wall_s=wall_s,
        ttft=Stats.of([t.ttft_s for t in timings]),
        tpot=Stats.of(tpots),
        itl=Stats.of([g for t in timings for g in t.gaps_s]),
        latency=Stats.of([t.latency_s for t in timings]),
    )


def gaps(times: list[float]) -> tuple[float, ...]:
    """The gaps between successive times."""
    return tuple(b - a for a, b in zip(times, times[1:]))


def random_prompts(input_lens: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One prompt of random token ids in [0, vocab_size) per length, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, vocab_size, (sum(input_lens),), generator=gen).tolist()
    prompts, start = [], 0
    for n in input_lens:
        prompts.append(flat[start:start + n])
        start += n
    return prompts


def build_for(input_lens: list[int], output_lens: list[int], max_batch_size: int = 256,
              max_num_tokens: int = 8192) -> BuildConfig:
    """Limits of a synthetic engine that holds the longest prompt and the longest request drawn."""
    return BuildConfig(max_batch_size=max_batch_size, max_input_len=max(input_lens),
                       max_seq_len=max(i + o for i, o in zip(input_lens, output_lens)),
                       max_num_tokens=max_num_tokens)


def check_fits(build: BuildConfig, input_lens: list[int], output_lens: list[int]) -> None:
    """Refuse drawn lengths that an engine built with `build` would reject, before anything runs."""
    longest_in = max(input_lens)
    if longest_in > build.max_input_len:
        raise LimitError(
            f"the drawn prompts reach {longest_in} tokens, more than the engine's max_input_len "
            f"{build.max_input_len}: lower --input_len (or --len_range), or rebuild the engine with "
            f"--max_input_len {longest_in} or more"
        )
    longest = max(i + o for i, o in zip(input_lens, output_lens))
    if longest > build.max_seq_len:
        raise LimitError(
            f"the longest drawn request is {longest} tokens (prompt + output), more than the engine's "
            f"max_seq_len {build.max_seq_len}: lower --input_len/--output_len (or --len_range), or "
            f"rebuild the engine with --max_seq_len {longest} or more"
        )


def measure_throughput(
    llm: LLM, prompts: list[list[int]], output_lens: list[int], sampling: SamplingParams | None = None,
) -> ThroughputResult:
    """Warm up, then submit every request at once and time each token as the stream yields it.
    `sampling` sets how tokens are chosen (greedy by default); its max_tokens is each request's own."""
    if len(prompts) != len(output_lens):
        raise ValueError("one output length per prompt")
    base = sampling or SamplingParams(temperature=0)
    params = [dataclasses.replace(base, max_tokens=o, ignore_eos=True) for o in output_lens]
    warm = dataclasses.replace(base, max_tokens=min(WARMUP_TOKENS, *output_lens), ignore_eos=True)
    vocab = llm.config.model.vocab_size
    # other ids than the measured prompts', so that the prefix cache has nothing of theirs
    # A full batch of the measured prompt lengths: its prefill is chunked and mixed with decodes, so every
    # kernel variant the run meets is compiled here (a first compile takes seconds).
    count = min(len(prompts), max(WARMUP_REQUESTS, llm.config.build.max_batch_size))
    llm.generate([[(t + 1) % vocab for t in p] for p in prompts[:count]], warm)
    _sync(llm.device)
    times: list[list[float]] = [[] for _ in prompts]
    outputs: dict[int, RequestOutput] = {}
    start = time.perf_counter()
    for event in llm.stream(prompts, params):
        times[event.index].append(time.perf_counter())
        if event.finished:
            outputs[event.index] = event.output
    wall = time.perf_counter() - start
    timings = []
    for i, prompt in enumerate(prompts):
        out = outputs[i]
        timings.append(RequestTiming(len(prompt), len(out.output_ids), out.ttft_s, out.latency_s,
                                     gaps(times[i])))
    return summarize(timings, wall)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
