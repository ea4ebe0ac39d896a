"""The paged KV cache: per-layer block tensors and the pool that hands blocks to sequences."""

from __future__ import annotations

import torch

from kiln.runtime.sequence import Sequence


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


class BlockPool:
    """Free list of block ids; a sequence owns the blocks in its block table until it is freed."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make `seq` own enough blocks for `num_tokens` tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise RuntimeError(f"KV cache exhausted: need {need} blocks, {self.num_free} free")
        for _ in range(max(0, need)):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
