"""Programmatic dependent launch (PDL): a kernel starts while the one before it is still finishing.

A decode step at batch 1 is ~330 short kernels in a CUDA graph. Without PDL each one is launched only
when the previous one has fully ended, so every kernel pays its launch, its programs' start and the
latency of its first loads (~1-2 us) in series with the others. On compute capability 9.0+ a kernel
launched with the programmatic-stream-serialization attribute may start as soon as every program of
the kernel before it has signalled (`griddepcontrol.launch_dependents`); it must then wait
(`griddepcontrol.wait`, which returns once that kernel has completed and its writes are visible) before
it reads anything the kernel before it may write, and before it writes anything at all.

The rule every kiln kernel follows: `grid_dependency_sync(USE_PDL)` first (wait, then signal our own
dependents), so no kernel touches memory a predecessor may still be using. Work that reads only
constant data (the weights) may come before it: `prefetch_l2` lets a GEMV pull its first weight lines
into L2 while the previous kernel ends. Because each kernel completes only after its own wait returned,
the order is transitive along the stream: kernel C, waiting for B, also sees everything A wrote.

`pdl_args(device)` is what a launch site passes: {"USE_PDL": True, "launch_pdl": True} where it is on,
{"USE_PDL": False} elsewhere (the CPU interpreter included). It is off unless KILN_PDL=1: it turns on
only where the GPU can (compute capability 9.0+) and Triton knows the launch option, and it becomes the
default once measured on the GPU (tests/kernels/test_pdl.py, `kiln bench latency` with KILN_PDL=0/1).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kiln.errors import KilnError

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: pdl_args never turns it on
    gdc_wait = gdc_launch_dependents = None


def _triton_can_launch_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def requested() -> bool:
    """KILN_PDL: 1 asks for PDL where the GPU and Triton can; 0 (the default) never."""
    value = os.environ.get("KILN_PDL", "0")
    if value not in ("0", "1"):
        raise KilnError(f"KILN_PDL={value!r} is not 0 (the default: each kernel starts after the one before "
                        "has ended) or 1 (programmatic dependent launch on GPUs of compute capability 9.0+)")
    return value == "1"


@functools.cache
def _enabled(device_index: int) -> bool:
    if not requested() or gdc_wait is None or not _triton_can_launch_pdl():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_args(device: torch.device) -> dict[str, bool]:
    """Keyword arguments of a Triton launch on `device`: the kernel's USE_PDL and, when on, the launch
    option that lets it overlap the kernel before it."""
    if device.type != "cuda":
        return {"USE_PDL": False}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _enabled(index):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


@triton.jit
def grid_dependency_sync(USE_PDL: tl.constexpr):
    """Wait until the kernel before has completed (its writes visible), then let the next one start."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask for the 128-byte lines holding `ptrs` to be brought into L2 (no registers, no wait). For
    constant data only (read before grid_dependency_sync). One pointer per line is enough."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs.to(tl.int64), mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )
