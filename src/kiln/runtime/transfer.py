"""Host-to-device copies of small per-step tensors that do not make the host wait for the device.

A copy from ordinary (pageable) host memory may wait until the device has finished the work queued
before it. While a step runs ahead of the host (runtime/engine.py, overlapped steps) that wait would
undo the overlap, so on a GPU these copies go through pinned memory and are queued like kernels
(PyTorch's caching host allocator keeps each pinned buffer until its copy has run).
"""

from __future__ import annotations

import torch


def to_device(values: list[int] | list[float] | torch.Tensor, device: str | torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`values` (a list, or a host tensor) on `device`, the copy queued without waiting on a GPU."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A pinned copy of a host tensor (the source of a `copy_(..., non_blocking=True)` into the GPU)."""
    return t.pin_memory() if torch.cuda.is_available() else t
