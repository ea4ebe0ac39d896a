"""A faster all-reduce for the small messages of decode: one-shot, through symmetric memory.

At batch 1 a decode step all-reduces a few kilobytes twice per layer; NCCL takes about 19 us for each
on two NVLink-connected H200s (benchmarks/allreduce.py), 1.5 ms of a 5.6 ms Mistral-Nemo step. With
symmetric memory (PyTorch's `torch.distributed._symmetric_memory`: one buffer per rank, mapped into
every other rank's address space over NVLink), each rank copies its partial sum into its buffer, waits
at a barrier, and reads and adds every rank's buffer itself: one kernel, no protocol rounds.

With `KILN_TP_ALLREDUCE=symm` it is used for messages up to `LIMIT_BYTES` on CUDA tensors, after a
start-up check that it gives the sum NCCL gives; anything else (bigger prefill activations, a torch or
a machine without it, a failed check) goes through NCCL. It is not the default: measured on two H200s
it takes a batch-1 all-reduce from 18.9 to 7.4 us, yet the Mistral-Nemo decode step did not get faster
(BENCHMARKS.md, "Tensor parallelism"). NVLink multicast is not used.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

LIMIT_BYTES = 8 << 20


class SymmAllReduce:
    def __init__(self, group: Any, device: str):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(self.group_name)
        self.buf = symm_mem.empty(LIMIT_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buf, self.group_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sum over ranks of `x`, or None where this path does not apply."""
        nbytes = x.numel() * x.element_size()
        if not x.is_cuda or nbytes > LIMIT_BYTES or nbytes % 16:
            return None
        staged = self.buf[:nbytes].view(x.dtype)
        staged.copy_(x.reshape(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name).view_as(x)


def make(group: Any, device: str, rank: int) -> SymmAllReduce | None:
    """The fast path for this group, or None (with the reason traced) where it cannot be used."""
    from kiln.distributed.group import trace

    if os.environ.get("KILN_TP_ALLREDUCE", "nccl") != "symm" or not device.startswith("cuda"):
        return None
    try:
        fast = SymmAllReduce(group, device)
        x = torch.randn(3, 4096, device=device, dtype=torch.bfloat16, generator=torch.Generator(device).manual_seed(rank))
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
