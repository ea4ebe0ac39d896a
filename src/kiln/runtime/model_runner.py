"""One step on the device: pack the scheduled tokens (no padding), run the model, return logits.

Prefill and decode share this path: a sequence contributes the tokens it has not computed yet, at
their positions, written to their cache slots; logits are computed only for sequences whose last
token was computed in this step.
"""

from __future__ import annotations

import torch

from kiln.builder.engine_file import EngineConfig
from kiln.checkpoint.format import torch_dtype
from kiln.layers.attention import AttentionMetadata
from kiln.models.llama import LlamaForCausalLM
from kiln.runtime.kv_cache import allocate_kv_cache
from kiln.runtime.scheduler import Batch
from kiln.runtime.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cfg: EngineConfig, device: str, num_blocks: int):
        self.model = model
        self.device = device
        self.block_size = cfg.build.tokens_per_block
        attn = model.model.layers[0].self_attn
        self.kv_caches = allocate_kv_cache(
            cfg.model.num_layers, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim,
            torch_dtype(cfg.dtype), device,
        )

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list[Sequence], torch.Tensor]:
        """Returns the sequences to sample for and their logits [num_sampled, vocab] float32."""
        hidden, last, to_sample = self._forward(batch)
        if not last:
            return [], hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        return to_sample, self.model.compute_logits(hidden[self._tensor(last, torch.int64)])

    @torch.inference_mode()
    def run_all_logits(self, batch: Batch) -> torch.Tensor:
        """Logits of every scheduled token, [num_tokens, vocab] float32 (perplexity, prompt logits)."""
        hidden, _, _ = self._forward(batch)
        return self.model.compute_logits(hidden)

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, list[int], list[Sequence]]:
        """Pack, run the model; returns hidden states [num_tokens, hidden], the index of each finished
        sequence's last token, and those sequences."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        to_sample: list[Sequence] = []
        bs = self.block_size
        for seq, n in batch:
            start = seq.num_computed
            ids += seq.all_ids[start : start + n]
            span = range(start, start + n)
            positions += span
            slots += [seq.block_table[p // bs] * bs + p % bs for p in span]
            if start + n == len(seq):
                last.append(len(ids) - 1)
                to_sample.append(seq)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            seq_lens=[seq.num_computed + n for seq, n in batch],
            query_lens=[n for _, n in batch],
            kv_caches=self.kv_caches,
        )
        hidden = self.model(self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), meta)
        return hidden, last, to_sample

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
