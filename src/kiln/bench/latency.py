"""Latency of one batch: time to first token, time per output token, and how close decode is to the
memory-bandwidth floor (every decode step must read all weights plus the batch's KV cache).
With tensor parallelism each GPU reads its rank's share, so bytes and bandwidth are per GPU (rank 0's,
all ranks hold equal shares) while tokens/s are the group's.

The copy bandwidth is measured in the same run, on the same device, so the floor is this machine's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.config import SamplingParams
from kiln.runtime.engine import LLM


@dataclass(frozen=True)
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float  # decode time per step (per output token of one sequence)
    total_s: float
    weight_bytes: int
    kv_bytes_mean: float  # KV cache bytes a decode step reads, averaged over the decode
    copy_gbps: float  # measured device copy bandwidth (read + write)
    ranks: int = 1  # tensor-parallel GPUs; bytes and bandwidth are per GPU

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size / self.tpot_s

    @property
    def achieved_gbps(self) -> float:
        return (self.weight_bytes + self.kv_bytes_mean) / self.tpot_s / 1e9

    @property
    def floor_tpot_s(self) -> float:
        return (self.weight_bytes + self.kv_bytes_mean) / (self.copy_gbps * 1e9)

    def lines(self) -> list[str]:
        gpu = " per GPU" if self.ranks > 1 else ""
        return [
            f"batch {self.batch_size}, {self.input_len} prompt tokens, {self.output_len} output tokens",
            f"time to first token   {self.ttft_s * 1e3:9.2f} ms",
            f"time per output token {self.tpot_s * 1e3:9.3f} ms  ({self.decode_tokens_per_s:.1f} tokens/s decode, "
            f"{self.batch_size * self.output_len / self.total_s:.1f} tokens/s end to end)",
            f"bytes per decode step{gpu} {(self.weight_bytes + self.kv_bytes_mean) / 1e9:9.3f} GB  (weights "
            f"{self.weight_bytes / 1e9:.3f} + KV {self.kv_bytes_mean / 1e9:.3f})",
            f"achieved bandwidth{gpu}    {self.achieved_gbps:9.1f} GB/s of {self.copy_gbps:.1f} GB/s measured copy "
            f"bandwidth = {self.achieved_gbps / self.copy_gbps * 100:.1f}% of the floor "
            f"({self.floor_tpot_s * 1e3:.3f} ms/token, {self.batch_size / self.floor_tpot_s:.0f} tokens/s)",
        ]


def copy_bandwidth_gbps(device: str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device memory copy bandwidth, counting read + write, in GB/s."""
    nbytes = nbytes or (2 << 30 if device.startswith("cuda") else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start) / 1e9


def measure_latency(llm: LLM, batch_size: int, input_len: int, output_len: int, seed: int = 0) -> LatencyResult:
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.config.model.vocab_size
    prompts = [torch.randint(0, vocab, (input_len,), generator=gen).tolist() for _ in range(batch_size)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    warmup = SamplingParams(max_tokens=min(4, output_len), temperature=0, ignore_eos=True)
    # the same shapes as measured (kernels compiled, cuBLAS warmed), other tokens: a prompt already
    # seen would be found in the prefix cache and the measured first step would skip most of its work
    llm.generate([[(t + 1) % vocab for t in p] for p in prompts], warmup)
    _sync(llm.device)
    start = time.perf_counter()
    first = None
    for _ in llm.stream(prompts, params):
        if first is None:
            first = time.perf_counter()
    _sync(llm.device)
    end = time.perf_counter()
    assert first is not None
    tpot = (end - first) / max(output_len - 1, 1)
    return LatencyResult(batch_size, input_len, output_len, first - start, tpot, end - start,
                         _weight_bytes(llm), _kv_bytes(llm, batch_size, input_len + output_len / 2),
                         copy_bandwidth_gbps(llm.device), llm.config.tp_size)


def _weight_bytes(llm: LLM) -> int:
    """Bytes a decode step reads: every weight, except an untied embedding table (only a row per token)."""
    embed = llm.model.model.embed_tokens.weight
    skip = embed if llm.model.lm_head is not None else None
    return sum(p.numel() * p.element_size() for p in llm.model.parameters() if p is not skip)


def _kv_bytes(llm: LLM, batch_size: int, mean_context: float) -> float:
    k_cache = llm.runner.kv_caches[0][0]
    per_token = 2 * len(llm.runner.kv_caches) * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    return batch_size * mean_context * per_token


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
