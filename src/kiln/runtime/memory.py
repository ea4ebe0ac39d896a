"""How many KV-cache blocks an engine gets.

As TensorRT-LLM does it: an explicit token count (`max_tokens_in_paged_kv_cache`), or a fraction of
the GPU memory that is free once the weights are loaded and room is kept for one step's activations
(`kv_cache_free_gpu_memory_fraction`, default 0.9). On a CPU, without either, enough blocks for
`max_batch_size` sequences of `max_seq_len` tokens.
"""

from __future__ import annotations

import torch

from kiln.builder.engine_file import EngineConfig
from kiln.checkpoint.format import torch_dtype
from kiln.errors import KilnError

DEFAULT_GPU_FRACTION = 0.9
_WORKSPACE_BYTES = 2 << 30  # cuBLAS workspaces, CUDA graph pools, allocator slack


def block_bytes(cfg: EngineConfig) -> int:
    """Bytes of one KV block on one rank (KV heads split over ranks, at least one each)."""
    m = cfg.model
    elem = torch.empty((), dtype=torch_dtype(cfg.dtype)).element_size()
    kv_heads = max(1, m.num_kv_heads // cfg.tp_size)
    return 2 * m.num_layers * cfg.build.tokens_per_block * kv_heads * m.head_dim * elem


def activation_bytes(cfg: EngineConfig) -> int:
    """A generous bound on one step's activations on one rank: max_num_tokens tokens through the widest
    layers, twice over for temporaries; and eight times the float32 logits of every sequence: the decode
    graphs' shared output, a step's own, and the sampler's temporaries when every row draws with top-p
    (a sort of each row: its values, int64 order, probabilities, their running sum)."""
    m, b, n = cfg.model, cfg.build, cfg.tp_size
    elem = torch.empty((), dtype=torch_dtype(cfg.dtype)).element_size()
    per_token = ((m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 3 * m.intermediate_size) // n + 4 * m.hidden_size
    return 2 * b.max_num_tokens * per_token * elem + 8 * b.max_batch_size * m.vocab_size * 4


def num_kv_blocks(
    cfg: EngineConfig, device: str, free_gpu_memory_fraction: float | None = None,
    max_tokens: int | None = None,
) -> int:
    b = cfg.build
    per_seq = -(-b.max_seq_len // b.tokens_per_block)
    if max_tokens is not None:
        if max_tokens < b.tokens_per_block:
            raise KilnError(f"--max_tokens_in_paged_kv_cache {max_tokens} is less than one block "
                            f"({b.tokens_per_block} tokens)")
        blocks = max_tokens // b.tokens_per_block
    elif device.startswith("cuda") or free_gpu_memory_fraction is not None:
        fraction = DEFAULT_GPU_FRACTION if free_gpu_memory_fraction is None else free_gpu_memory_fraction
        if not 0 < fraction <= 1:
            raise KilnError(f"--kv_cache_free_gpu_memory_fraction {fraction} must be in (0, 1]")
        if not device.startswith("cuda"):
            raise KilnError("--kv_cache_free_gpu_memory_fraction sizes the cache from GPU memory; on the "
                            "CPU give --max_tokens_in_paged_kv_cache instead")
        blocks = int((free_gpu_bytes(device) - activation_bytes(cfg) - _WORKSPACE_BYTES) * fraction
                     // block_bytes(cfg))
    else:
        return b.max_batch_size * per_seq
    if blocks < per_seq:
        raise KilnError(
            f"the KV cache holds {max(blocks, 0)} blocks of {b.tokens_per_block} tokens, fewer than one "
            f"sequence of max_seq_len {b.max_seq_len} needs ({per_seq}): give it more memory "
            "(--kv_cache_free_gpu_memory_fraction, --max_tokens_in_paged_kv_cache) or rebuild with a "
            "smaller --max_seq_len"
        )
    return blocks


def free_gpu_bytes(device: str) -> int:
    """Free device memory, counting what torch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
