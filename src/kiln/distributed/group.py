"""Joining a tensor-parallel group: ranks started by kiln itself, by torchrun, or by mpirun.

An engine of N ranks runs as N processes, one per GPU (on the CPU, N processes over gloo). Rank 0 owns
everything a user talks to: the scheduler, the KV block manager, the sampler, the HTTP server. The
other ranks hold their share of the weights and of the KV cache and run the same forward pass in
lockstep, driven by rank 0 step by step (distributed/worker.py).

Who starts the processes:
- nobody (`kiln run --engine_dir E` on a 2-rank engine): rank 0 starts the N-1 others itself
  (`python -m kiln.distributed.worker`) and watches them; if one dies, the whole group stops at once
  with a message saying which rank and how;
- torchrun (`torchrun --nproc-per-node N $(which kiln) run ...`): RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT come from its environment;
- mpirun (`mpirun -n N kiln run ...`, as the seeds run TensorRT-LLM): OMPI_COMM_WORLD_RANK/SIZE/
  LOCAL_RANK (OpenMPI) or PMI_RANK/PMI_SIZE (MPICH); MASTER_ADDR defaults to this host and
  MASTER_PORT to a port derived from the MPI job, so one host needs nothing set.

Two process groups: the default one carries the model's all-reduces and all-gathers (NCCL for CUDA
tensors, gloo for CPU ones) with a bounded timeout (`KILN_TP_TIMEOUT_S`, 120 s), so a rank that hangs
brings the group down instead of hanging it; a gloo group carries rank 0's step messages, without
that bound, because a server may wait for requests for hours. A rank that dies closes its sockets,
so the others see it at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln.distributed.comm import TPGroup
from kiln.distributed.launch import Placement, from_environment
from kiln.errors import KilnError

log = logging.getLogger("kiln.distributed")

DEFAULT_TIMEOUT_S = 120.0
IDLE_TIMEOUT = timedelta(days=365)  # the step-message group: waiting for work is not a failure


def trace(message: str) -> None:
    """Start-up stages of each rank, on stderr, when KILN_TP_DEBUG is set (for a group that will not start)."""
    if os.environ.get("KILN_TP_DEBUG"):
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("KILN_TP_RANK", "?")
        print(f"[kiln tp rank {rank} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timeout_s() -> float:
    value = os.environ.get("KILN_TP_TIMEOUT_S", "")
    try:
        t = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise KilnError(f"KILN_TP_TIMEOUT_S={value!r} is not a number of seconds") from None
    if t <= 0:
        raise KilnError(f"KILN_TP_TIMEOUT_S={value!r} must be positive")
    return t


def rank_device(kind: str, local_rank: int) -> str:
    """`cuda:<local rank>` on GPUs (one GPU per rank), `cpu` otherwise."""
    if kind != "cuda":
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise KilnError(
            f"local rank {local_rank} needs GPU {local_rank}, but this host shows {count} GPU(s): start at most "
            f"{count} ranks per host, or run on the CPU with --device cpu (slowly)"
        )
    return f"cuda:{local_rank}"


# ---- step messages ------------------------------------------------------------------------------
OP_STOP, OP_FORWARD, OP_GRAPH, OP_ALL_LOGITS = 0, 1, 2, 3
# A step launched before the previous one's tokens reached rank 0 (runtime/engine.py, overlapped steps):
# the token ids rank 0 does not have yet come from the argmax of each rank's own previous logits (the LM
# head gathers them, so every rank holds the same); the rows carry the sampled rows and, per fed token,
# (its index in the step, its row of that argmax) (model_runner._ahead_rows).
OP_GRAPH_AHEAD, OP_FORWARD_AHEAD = 4, 5
_HEADER = 6  # op, tokens, seqs, width, number of sampled rows (-1: all), data length


class StepChannel:
    """Rank 0 -> every rank: one step's packed host inputs (see runtime/model_runner.py).

    One broadcast of a fixed-size buffer carries the header and, for every decode step and most
    prefill steps, all of the data; only a larger step sends the rest in a second broadcast. (Each
    broadcast is a round of messages the other ranks wait for before they can launch their step.)
    """

    INLINE = 4096  # int64 values carried with the header: a decode step of ~800 sequences at width 1

    def __init__(self, group: Any):
        self.group = group
        self.buf = torch.zeros(_HEADER + self.INLINE, dtype=torch.int64)

    def send(self, op: int, tokens: int, seqs: int, width: int, host: torch.Tensor | None,
             rows: list[int] | None) -> None:
        data = host if host is not None else torch.empty(0, dtype=torch.int64)
        if rows:
            data = torch.cat([data, torch.tensor(rows, dtype=torch.int64)])
        n_rows = -1 if rows is None else len(rows)
        n = data.numel()
        self.buf[:_HEADER] = torch.tensor([op, tokens, seqs, width, n_rows, n])
        inline = min(n, self.INLINE)
        self.buf[_HEADER : _HEADER + inline] = data[:inline]
        dist.broadcast(self.buf, src=0, group=self.group)
        if n > inline:
            dist.broadcast(data[inline:].contiguous(), src=0, group=self.group)

    def recv(self) -> tuple[int, int, int, int, torch.Tensor, list[int] | None]:
        dist.broadcast(self.buf, src=0, group=self.group)
        op, tokens, seqs, width, n_rows, n = self.buf[:_HEADER].tolist()
        inline = min(n, self.INLINE)
        data = torch.empty(n, dtype=torch.int64)
        data[:inline] = self.buf[_HEADER : _HEADER + inline]
        if n > inline:
            rest = torch.empty(n - inline, dtype=torch.int64)
            dist.broadcast(rest, src=0, group=self.group)
            data[inline:] = rest
        if n_rows <= 0:
            return op, tokens, seqs, width, data, (None if n_rows < 0 else [])
        return op, tokens, seqs, width, data[:-n_rows], data[-n_rows:].tolist()


# ---- the group ----------------------------------------------------------------------------------
@dataclass
class Group:
    """A joined group, seen from one rank."""

    place: Placement
    tp: TPGroup
    control: Any  # the gloo group of step messages
    channel: StepChannel
    workers: list[subprocess.Popen] = field(default_factory=list)  # rank 0 of a kiln-started group
    nccl: bool = False  # the model's collectives run on GPUs
    closed: bool = False

    @property
    def rank(self) -> int:
        return self.place.rank

    def broadcast_object(self, obj: Any = None) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def close(self) -> None:
        """Rank 0: tell the others to stop, wait for the ones kiln started, leave the group."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0:
            try:
                self.channel.send(OP_STOP, 0, 0, 0, None, None)
            except Exception:  # noqa: BLE001 - the others may be gone already; nothing left to tell
                pass
            deadline = time.monotonic() + 30
            for p in self.workers:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
        if self.nccl:
            # Tearing down NCCL communicators that CUDA graphs captured can block for good (seen with
            # torch 2.11): the process keeps its group until it ends, and holds one group at most.
            return
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving a broken group: the process ends next anyway
            pass


def _backend(device_kind: str) -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def join(place: Placement, device_kind: str, workers: list[subprocess.Popen] | None = None) -> tuple[Group, str]:
    """Meet the other ranks; returns the group and this rank's device."""
    device = rank_device(device_kind, place.local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:  # the ranks share this host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // place.world_size))
    if dist.is_initialized():
        raise KilnError(
            "this process already belongs to a tensor-parallel group (a multi-GPU engine was loaded before): "
            "load one multi-rank engine per process, or close the earlier one first (LLM.close()) on the CPU"
        )
    url = f"tcp://{place.master_addr}:{place.master_port}"
    trace(f"joining {url} as rank {place.rank} of {place.world_size} on {device}")
    try:
        dist.init_process_group(_backend(device_kind), init_method=url, rank=place.rank,
                                world_size=place.world_size, timeout=timedelta(seconds=timeout_s()))
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise KilnError(
            f"rank {place.rank} of {place.world_size} could not join the group at {url} ({e}); check that every "
            f"rank was started and that MASTER_ADDR/MASTER_PORT are the same for all"
        ) from None
    trace("joined")
    fast = None
    if device.startswith("cuda"):
        from kiln.distributed.symm import make

        fast = make(dist.group.WORLD, device, place.rank)
    tp = TPGroup(place.rank, place.world_size, dist.group.WORLD, fast)
    return Group(place, tp, control, StepChannel(control), workers or [], device.startswith("cuda")), device


def start(world_size: int, device_kind: str) -> tuple[Group, str]:
    """Rank 0's side: join the group a launcher started, or start the other ranks here."""
    place = from_environment()
    workers: list[subprocess.Popen] = []
    if place is None:
        if device_kind == "cuda" and torch.cuda.device_count() < world_size:
            raise KilnError(
                f"the engine has {world_size} ranks, one per GPU, but this machine shows "
                f"{torch.cuda.device_count()} GPU(s): run it where {world_size} GPUs are visible, or on the CPU "
                "with --device cpu (slowly), or rebuild with a smaller --tp_size"
            )
        place = Placement(0, world_size, 0, "127.0.0.1", _free_port(), "kiln")
        workers = [_spawn(place, r, device_kind) for r in range(1, world_size)]
    elif place.world_size != world_size:
        raise KilnError(
            f"the engine has {world_size} rank{'s' * (world_size != 1)} but {place.launcher} started "
            f"{place.world_size} processes: start "
            f"{world_size} (e.g. `{_example(place.launcher, world_size)}`)"
        )
    elif place.rank != 0:
        raise KilnError(f"rank {place.rank} reached rank 0's start; only rank 0 loads the scheduler")
    try:
        group, device = join(place, device_kind, workers)
    except BaseException:
        for p in workers:
            p.kill()
        raise
    if workers:
        threading.Thread(target=_watch_workers, args=(group,), name="kiln-tp-watch", daemon=True).start()
    atexit.register(group.close)
    return group, device


def _example(launcher: str, n: int) -> str:
    return f"mpirun -n {n} kiln ..." if launcher == "mpirun" else f"torchrun --nproc-per-node {n} $(which kiln) ..."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(place: Placement, rank: int, device_kind: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        KILN_TP_RANK=str(rank), KILN_TP_WORLD_SIZE=str(place.world_size), KILN_TP_LOCAL_RANK=str(rank),
        MASTER_ADDR=place.master_addr, MASTER_PORT=str(place.master_port), KILN_TP_DEVICE=device_kind,
        KILN_TP_PARENT_PID=str(os.getpid()),
    )
    return subprocess.Popen([sys.executable, "-m", "kiln.distributed.worker"], env=env, stdin=subprocess.DEVNULL)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _watch_workers(group: Group) -> None:
    """Rank 0 of a kiln-started group: if any other rank ends before the group closes, end them all."""
    while not group.closed:
        for rank, p in enumerate(group.workers, start=1):
            code = p.poll()
            if code is not None and not group.closed:
                print(f"kiln: error: tensor-parallel rank {rank} (pid {p.pid}) {describe_exit(code)}; "
                      "stopping every rank", file=sys.stderr, flush=True)
                for other in group.workers:
                    if other.poll() is None:
                        other.kill()
                os._exit(1)
        time.sleep(0.2)
