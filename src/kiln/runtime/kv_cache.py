"""The paged KV cache: per-layer block tensors, and the block manager that hands blocks to sequences.

Blocks are reference-counted so that sequences with the same token prefix share them (prefix
caching). A block that is full and computed is named by a hash chain: the hash of its tokens and of
its parent's name, so a name stands for the whole prefix up to and including the block. When the last
sequence holding a named block lets it go, the block keeps its contents and its name and waits in a
least-recently-used list: a later request with the same prefix takes it back instead of recomputing,
and allocation reuses it only when no never-named block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

from kiln.runtime.sequence import Sequence

_ROOT = hash("kiln-prefix-root")


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


def chain_hash(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    """Block ids for sequences: a free list, reference counts, and the prefix cache.

    A sequence's `block_table` lists the blocks holding its tokens in order; `block_hashes` the names
    of its leading full, computed blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks {num_blocks} must be at least 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # never named, or name dropped
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named, unreferenced; oldest first
        self._ref = [0] * num_blocks
        self._name: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._by_name: dict[int, int] = {}
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found

    # ---- counts ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (unreferenced, cached ones included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks that still hold a reusable prefix."""
        return len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free

    # ---- sequences -------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the cached blocks of its longest known prefix; returns how
        many tokens they hold (now computed). At least one token is always left to compute, so that
        the step that follows has logits to sample from and writes only to a block of its own."""
        assert not seq.block_table, "match_prefix is for sequences without blocks"
        if not self.prefix_caching:
            return 0
        ids, bs = seq.all_ids, self.block_size
        parent, hits = _ROOT, 0
        for i in range((len(ids) - 1) // bs):
            tokens = tuple(ids[i * bs : (i + 1) * bs])
            name = chain_hash(parent, tokens)
            block = self._by_name.get(name)
            if block is None or self._tokens[block] != tokens:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(name)
            parent, hits = name, hits + 1
        seq.num_computed = hits * bs
        self.query_tokens += len(ids)
        self.hit_tokens += seq.num_computed
        return seq.num_computed

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make `seq` hold blocks for `num_tokens` tokens; False (and nothing taken) when too few are free."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:  # (most steps)
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._allocate())
        return True

    def commit(self, seq: Sequence) -> None:
        """Name the sequence's blocks that are now full and computed, so later requests can share them."""
        bs = self.block_size
        if not self.prefix_caching or len(seq.block_hashes) >= seq.num_computed // bs:
            return  # (most steps: no block filled up)
        parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tuple(seq.ids(i * bs, (i + 1) * bs))
            name = chain_hash(parent, tokens)
            block = seq.block_table[i]
            if name not in self._by_name:  # else the same prefix was computed twice: keep the first
                self._by_name[name] = block
                self._name[block], self._tokens[block] = name, tokens
            seq.block_hashes.append(name)
            parent = name

    def free(self, seq: Sequence) -> None:
        """Let go of the sequence's blocks (its last block is the first to be evicted)."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            assert self._ref[block] >= 0, f"block {block} freed twice"
            if self._ref[block] == 0:
                if self._name[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        for block in list(self._evictable):
            self._drop_name(block)
            self._free.append(block)
        self._evictable.clear()
        self._by_name.clear()
        self._name = [None] * self.num_blocks
        self._tokens = [None] * self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    # ---- blocks ----------------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]
        self._ref[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently used cached prefix
            self._drop_name(block)
        self._ref[block] = 1
        return block

    def _drop_name(self, block: int) -> None:
        name = self._name[block]
        if name is not None and self._by_name.get(name) == block:
            del self._by_name[name]
        self._name[block], self._tokens[block] = None, None
