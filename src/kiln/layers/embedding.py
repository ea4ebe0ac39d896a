"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous slice of the vocabulary rows, padded so that every rank's slice has the
same size; the embedding all-reduces (each token is found on exactly one rank), the head gathers the
logits of all ranks so the sampler sees the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.distributed.comm import SINGLE, TPGroup
from kiln.layers.base import WeightLoading


class VocabParallelEmbedding(WeightLoading):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden), requires_grad=False)

    def shard(self, name: str, full: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        if self.tp.size == 1:
            return full
        local = full[self.start : self.start + self.rows_per_rank]
        pad = self.rows_per_rank - local.shape[0]
        return F.pad(local, (0, 0, 0, pad)).contiguous() if pad else local.contiguous()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)

    @property
    def logits_columns(self) -> int:
        """Width of the gathered logits before the vocabulary padding is cut off."""
        return self.rows_per_rank * self.tp.size

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Use the rows as an output projection (tied embeddings, or the LM head).

        [num_seqs, hidden] -> [num_seqs, vocab_size] in float32, written into `out` ([num_seqs,
        logits_columns] float32, contiguous) when given: CUDA graphs of every batch size share one.
        """
        if self.tp.size == 1:
            logits = _logits_float32(hidden, self.weight, out)
        else:
            logits = self.tp.all_gather_last_dim(_logits_float32(hidden, self.weight))
            if out is not None:
                logits = out.copy_(logits)
        return logits[:, : self.vocab_size]


def _logits_float32(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """hidden @ weight^T with float32 output (into `out` when given). Logits rounded to bf16 (8 bits of
    mantissa: steps of 0.125 at 20) would tie or swap near-equal top tokens; cuBLAS can write the float32
    accumulator directly."""
    if hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm's out_dtype
            pass
    logits = F.linear(hidden, weight).float()
    return logits if out is None else out.copy_(logits)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection of an untied model; only `logits` is used."""
