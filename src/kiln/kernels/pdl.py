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

`pdl_args(device)` is what a launch site passes: {"USE_PDL": 1, "launch_pdl": True} where it is on,
{"USE_PDL": 0} elsewhere (the CPU interpreter included). It is on by default where the GPU can (compute
capability 9.0+) and Triton knows the launch option; KILN_PDL=0 turns it off. Measured on an H100
(BENCHMARKS.md): decode +1 to +3% (fp8 +2.9%, int4 group 128 +1.7 to +3.2%, bf16 +0.9%).

When the next kernel may start is a choice. With KILN_PDL=1 (the default) each kernel lets it start as
soon as its own wait is over, so the next kernel's programs can become resident, prefetch and wait
while this one still runs; they also hold SM slots this kernel's later programs could use. With
KILN_PDL=late, the launch sites that pass `late=True` (the GEMVs and the decode attention, kernels with
more programs than fit at once) give USE_PDL 2: their programs signal only after their main loop
(`launch_dependents`), so the next kernel overlaps only their epilogue and exit.
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


MODES = {"0": 0, "1": 1, "late": 2}


def mode() -> int:
    """KILN_PDL: 1 (the default) PDL where the GPU and Triton can, each kernel letting the next start
    once its own wait is over; late: the same, but the kernels launched with late=True let it start only
    after their main loop; 0: never."""
    value = os.environ.get("KILN_PDL", "1")
    if value not in MODES:
        raise KilnError(f"KILN_PDL={value!r} is not 1 (the default: programmatic dependent launch on GPUs of "
                        "compute capability 9.0+), late (the same, the long kernels letting the next one start "
                        "only after their main loop) or 0 (each kernel starts after the one before has ended)")
    return MODES[value]


def requested() -> bool:
    return mode() > 0


@functools.cache
def _enabled(device_index: int) -> int:
    """The KILN_PDL mode on this device: 0 where PDL cannot be used."""
    value = mode()
    if not value or gdc_wait is None or not _triton_can_launch_pdl():
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 0
    if _cuda_version() < (12, 4):  # a conservative floor for PDL inside captured graphs (run with 13.0)
        return 0
    return value if torch.cuda.get_device_capability(device_index)[0] >= 9 else 0


def _on(device: torch.device) -> int:
    """_enabled for a device of any type (0 off the GPU)."""
    if device.type != "cuda":
        return 0
    return _enabled(device.index if device.index is not None else torch.cuda.current_device())


def _cuda_version() -> tuple[int, ...]:
    version = torch.version.cuda or "0"
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def state(device: torch.device | str) -> str:
    """What the launches on `device` use, for reports: "on", "late" or "off"."""
    return ("off", "on", "late")[_on(torch.device(device))]


def pdl_args(device: torch.device, late: bool = False) -> dict[str, int | bool]:
    """Keyword arguments of a Triton launch on `device`: the kernel's USE_PDL (0 off; 1 on; 2 on, the
    kernel calling `launch_dependents` after its main loop) and, when on, the launch option that lets
    it overlap the kernel before it. late: this kernel has such a call (used under KILN_PDL=late)."""
    on = _on(device)
    if not on:
        return {"USE_PDL": 0}
    return {"USE_PDL": 2 if late and on == 2 else 1, "launch_pdl": True}


@triton.jit
def grid_dependency_sync(USE_PDL: tl.constexpr):
    """Wait until the kernel before has completed (its writes visible), then let the next one start."""
    if USE_PDL:
        gdc_wait()
        if USE_PDL == 1:
            gdc_launch_dependents()


@triton.jit
def launch_dependents(USE_PDL: tl.constexpr):
    """Under USE_PDL 2, let the next kernel start now: called by a kernel launched with late=True once
    its main loop is done (before that, grid_dependency_sync did not)."""
    if USE_PDL == 2:
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask for the 128-byte lines holding `ptrs` to be brought into L2 (no registers, no wait). For
    constant data only (read before grid_dependency_sync). One pointer per line is enough."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs.to(tl.int64), mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def warm_rows(row_ptrs, start, end, mask, stride, LINE: tl.constexpr, WARM: tl.constexpr):
    """Prefetch elements start..end-1 of each row into L2 before the wait (the weights are constant):
    row_ptrs [BLOCK_N] point at each row's element 0, `stride` apart along the row, LINE elements per
    128-byte line. WARM 1: all of them (a weight bigger than L2 then evicts its own first lines); 2:
    the first two lines, what the program's first steps wait for; 0: nothing."""
    if WARM == 1:
        for k in range(start, end, LINE):
            prefetch_l2(row_ptrs + k * stride, mask)
        prefetch_l2(row_ptrs + (end - 1) * stride, mask)
    elif WARM == 2:
        prefetch_l2(row_ptrs + start * stride, mask)
        prefetch_l2(row_ptrs + tl.minimum(start + LINE, end - 1) * stride, mask)
