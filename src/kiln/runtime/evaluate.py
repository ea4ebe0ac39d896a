"""Perplexity of an engine on token windows: exp(mean negative log-likelihood of each next token)."""

from __future__ import annotations

import math

import torch

from kiln.config import SamplingParams
from kiln.errors import LimitError
from kiln.runtime.engine import LLM
from kiln.runtime.sequence import Sequence


def window_nll(llm: LLM, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | prefix) over the window's tokens 1..n-1, and how many there are."""
    limit = llm.config.build.max_seq_len
    if len(ids) > limit:
        raise LimitError(f"an evaluation window of {len(ids)} tokens is longer than the engine's "
                         f"max_seq_len {limit}: use shorter windows or rebuild with a larger --max_seq_len")
    seq = Sequence(list(ids), SamplingParams(max_tokens=1))
    if not llm.blocks.grow(seq, len(ids)):
        raise LimitError(f"an evaluation window of {len(ids)} tokens does not fit the KV cache "
                         f"({llm.blocks.num_free} free blocks of {llm.blocks.block_size} tokens)")
    total = 0.0
    try:
        while seq.num_computed < len(ids) - 1:
            start = seq.num_computed
            n = min(len(ids) - 1 - start, llm.config.build.max_num_tokens)
            logits = llm.runner.run_all_logits([(seq, n)])  # [n, vocab]
            targets = torch.tensor(ids[start + 1 : start + n + 1], device=logits.device)
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            seq.num_computed += n
    finally:
        llm.blocks.free(seq)
    return total, len(ids) - 1


def perplexity(llm: LLM, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        s, c = window_nll(llm, w.tolist())
        nll, count = nll + s, count + c
    return math.exp(nll / count)
