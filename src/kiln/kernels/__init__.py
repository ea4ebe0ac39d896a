"""GPU kernels written in Triton, and the plain PyTorch references they are tested against.

Which path a layer takes is decided by where its input lives: CUDA tensors go through the Triton
kernels, CPU tensors through `reference`. Setting KILN_KERNELS=triton before kiln is imported (or
`force_triton(True)`) sends CPU tensors through the Triton kernels too; with TRITON_INTERPRET=1 they then
run in Triton's interpreter. That is slow, and only meant for testing the fast path without a GPU.

The kernel modules import triton, so they are imported only when a fast path is taken: a CPU-only
install of kiln needs no triton.
"""

from __future__ import annotations

import functools
import os

import torch

_force = os.environ.get("KILN_KERNELS", "") == "triton"


def use_triton(x: torch.Tensor) -> bool:
    """True when an op on `x` should run its Triton kernel."""
    return x.is_cuda or _force


def force_triton(flag: bool) -> bool:
    """Route CPU tensors through the Triton kernels (True) or the references (False); returns the old value."""
    global _force
    old, _force = _force, flag
    return old


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d], gate then up -> silu(gate) * up [..., d], by the path `use_triton` picks."""
    if use_triton(x):
        from kiln.kernels.activation import silu_and_mul as kernel

        return kernel(x)
    from kiln.kernels.reference import silu_and_mul as plain

    return plain(x)


@functools.cache
def num_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100) elsewhere, so that launch heuristics run
    the same shapes in Triton's interpreter as on the GPU they are written for."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device | str, n: int) -> torch.Tensor:
    """int32 zeros, at least n of them, for kernels that split their work over programs and let the last
    program to finish an output element combine the parts (acq_rel atomic counters, one per element).
    Each such kernel puts the counters it used back to zero, so one buffer per device serves them all;
    kernels that use it must not run concurrently (kiln runs its GPU work on one stream)."""
    device = torch.device(device)
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        have = torch.zeros(max(n, 1 << 15), dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have
