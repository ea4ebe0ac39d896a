"""What device an engine is built for, and whether it can run on this one."""

from __future__ import annotations

import platform
from typing import Any

import torch

from kiln.errors import KilnError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: str) -> dict[str, Any]:
    """A JSON-able description of `device` ("cpu" or "cuda[:i]") as recorded in engine.json."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KilnError(f"--device {device}: no CUDA GPU is visible to PyTorch on this machine; use --device cpu")
        props = torch.cuda.get_device_properties(torch.device(device))
        return {
            "type": "cuda",
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "total_memory_gib": round(props.total_memory / 2**30, 1),
        }
    if device != "cpu":
        raise KilnError(f"--device {device!r} is invalid: use cpu or cuda")
    return {"type": "cpu", "name": platform.processor() or platform.machine()}


def check_runnable(built_for: dict[str, Any], device: str, engine_dir: str) -> None:
    """Refuse, with what to do, an engine built for another kind of device than `device`."""
    here = describe_device(device)
    if built_for.get("type") != here["type"]:
        raise KilnError(
            f"engine {engine_dir} was built for {_name(built_for)} but this run uses {_name(here)}: "
            f"rebuild it here with `kiln build --checkpoint_dir CKPT --output_dir DIR` "
            f"(or pass --device {built_for.get('type')} where that is available)"
        )
    if here["type"] == "cuda" and built_for.get("name") != here["name"]:
        # The weights do not depend on the GPU; the kernel choices do, and are measured again at load.
        print(f"note: engine {engine_dir} was built for {_name(built_for)}; this GPU is {_name(here)}: its "
              "kernels are re-tuned for this GPU at load (rebuild with `kiln build` here to store that)")


def _name(d: dict[str, Any]) -> str:
    if d.get("type") == "cuda":
        return f"{d.get('name')} (compute capability {d.get('compute_capability')})"
    return f"the CPU ({d.get('name') or 'unknown'})"
