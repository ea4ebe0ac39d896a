"""A faster all-reduce for the small messages of decode: one-shot, through symmetric memory.

At batch 1 a decode step all-reduces a few kilobytes twice per layer; NCCL takes about 19 us for each
on two NVLink-connected H200s (benchmarks/allreduce.py), 1.5 ms of a 5.6 ms Mistral-Nemo step. With
symmetric memory (PyTorch's `torch.distributed._symmetric_memory`: one buffer per rank, mapped into
every other rank's address space over NVLink), each rank copies its partial sum into its buffer, waits
at a barrier, and reads and adds every rank's buffer itself: one kernel, no protocol rounds.

It is used for messages up to `LIMIT_BYTES` (`KILN_TP_SYMM_MAX_BYTES`, 8 MiB) on CUDA tensors, after a
start-up check that it gives the sum NCCL gives; anything else (bigger prefill activations, a torch or
a machine without it, a failed check) goes through NCCL, as does everything with
`KILN_TP_ALLREDUCE=nccl`. Measured on two H200s (BENCHMARKS.md, "Tensor parallelism"): a batch-1
all-reduce takes 7.4 us instead of 18.9; with steps launched ahead of the host, the Mistral-Nemo
batch-1 decode step goes from 4.74 to 4.59 ms and throughput at 256 in flight rises 5%.
NVLink multicast is not used.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from kiln.errors import KilnError

LIMIT_BYTES = 8 << 20  # bigger messages go through NCCL (KILN_TP_SYMM_MAX_BYTES changes it)


class SymmAllReduce:
    def __init__(self, group: Any, device: str, limit: int = LIMIT_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(self.group_name)
        self.limit = limit
        self.buf = symm_mem.empty(limit, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buf, self.group_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sum over ranks of `x`, or None where this path does not apply."""
        nbytes = x.numel() * x.element_size()
        if not x.is_cuda or nbytes > self.limit or nbytes % 16:
            return None
        staged = self.buf[:nbytes].view(x.dtype)
        staged.copy_(x.reshape(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name).view_as(x)


def make(group: Any, device: str, rank: int) -> SymmAllReduce | None:
    """The fast path for this group, or None (with the reason traced) where it cannot be used."""
    from kiln.distributed.group import trace

    choice = os.environ.get("KILN_TP_ALLREDUCE", "auto")
    if choice not in ("auto", "symm", "nccl"):
        raise KilnError(f"KILN_TP_ALLREDUCE={choice!r} is not one of auto (the default: symmetric memory for "
                        "small messages where it works), symm (the same) or nccl (NCCL for every message)")
    value = os.environ.get("KILN_TP_SYMM_MAX_BYTES", str(LIMIT_BYTES))
    if not value.isdigit() or int(value) < 16:
        raise KilnError(f"KILN_TP_SYMM_MAX_BYTES={value!r} must be a whole number of bytes, at least 16 "
                        f"(default {LIMIT_BYTES}): the largest all-reduce sent through symmetric memory")
    if choice == "nccl" or not device.startswith("cuda"):
        return None
    try:
        fast = SymmAllReduce(group, device, int(value))
        numel = min(3 * 4096, fast.limit // 2 // 8 * 8)  # bf16, a multiple of 16 bytes, within the limit
        x = torch.randn(numel, device=device, dtype=torch.bfloat16, generator=torch.Generator(device).manual_seed(rank))
        want = x.float().clone()
        dist.all_reduce(want, group=group)
        got = fast(x)
        ok = got is not None and torch.allclose(got.float(), want, atol=0.05, rtol=0.02)
        flags = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)  # every rank decides the same
        if not int(flags.item()):
            trace("symmetric-memory all-reduce gave a different sum than NCCL: using NCCL")
            return None
    except Exception as e:  # noqa: BLE001 - any failure here means: use NCCL
        trace(f"symmetric-memory all-reduce unavailable ({type(e).__name__}: {e}): using NCCL")
        return None
    trace("small all-reduces go through symmetric memory (one-shot)")
    return fast
