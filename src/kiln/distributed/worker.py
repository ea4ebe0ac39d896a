"""A rank other than 0: load this rank's share of the model, then run the steps rank 0 sends.

Started by rank 0 (`python -m kiln.distributed.worker`), or by torchrun / mpirun running `kiln run`,
`kiln serve`, `kiln eval` or `kiln bench` on every rank (the CLI sends every rank but 0 here). It
needs no arguments: what to load comes from rank 0 (`WorkerSetup`), so the command lines of all
ranks cannot disagree.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from kiln.distributed import group as grp
from kiln.errors import KilnError


@dataclass(frozen=True)
class WorkerSetup:
    """What rank 0 tells the others once the group has met."""

    source: Any  # kiln.runtime.loader.ModelSource
    device_kind: str  # "cuda" or "cpu"
    settings: Any  # kiln.runtime.engine.RunnerSettings


def run_worker(place: grp.Placement) -> int:
    """Serve rank 0 until it says stop; returns the exit status."""
    from kiln.runtime.engine import prepare_runner

    rank = place.rank
    try:
        group, _ = grp.join(place, os.environ.get("KILN_TP_DEVICE") or _guess_kind())
        setup: WorkerSetup | None = group.broadcast_object()
        if setup is None:  # rank 0 failed before it could say what to load; it reports why
            return 1
        device = grp.rank_device(setup.device_kind, place.local_rank)
        grp.trace(f"loading {setup.source}")
        model, config = setup.source.load(device, group.tp)
        grp.trace("loaded; preparing the runner")
        runner, _ = prepare_runner(model, config, device, setup.settings, group)
        grp.trace("ready")
        runner.serve(group.channel)
        if runner.step_trace:
            runner.step_trace.dump()
    except KilnError as e:
        print(f"kiln: rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:  # a collective failed: another rank is gone or stuck
        print(f"kiln: rank {rank}: error: the tensor-parallel group broke ({_first_line(e)}); another rank "
              "ended or stopped answering: see its messages", file=sys.stderr, flush=True)
        return 1
    group.closed = True
    grp.trace("stopped")
    # Leave at once: rank 0 is done with the group, and tearing down NCCL communicators can block.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _guess_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _watch_parent(pid: int) -> None:
    """A rank started by kiln ends when its rank 0 does, however rank 0 ended."""
    while True:
        if os.getppid() != pid:
            os._exit(1)
        time.sleep(0.5)


def main() -> int:
    try:
        place = grp.from_environment()
    except KilnError as e:
        print(f"kiln: worker: error: {e}", file=sys.stderr)
        return 1
    if place is None or place.rank == 0:
        print("kiln: worker: this process is not a rank > 0 of a tensor-parallel group; `kiln run`/`kiln serve` "
              "start the ranks they need", file=sys.stderr)
        return 2
    parent = os.environ.get("KILN_TP_PARENT_PID")
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent),), name="kiln-parent-watch", daemon=True).start()
    return run_worker(place)


if __name__ == "__main__":
    sys.exit(main())
