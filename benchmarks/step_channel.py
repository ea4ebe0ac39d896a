"""How long rank 0's step message takes to reach rank 1 (one host, gloo over loopback).

    python3 benchmarks/step_channel.py [--seqs 1,256] [--steps 2000]

Two processes; rank 0 sends decode-step messages of `seqs` sequences as the model runner packs them
(ids, positions, slots, lengths, block tables, query starts); rank 1 receives them. Both read the same
monotonic clock, so rank 1 reports the time from rank 0's send call to the message in its hands.
Every rank but 0 waits for this before it can launch its part of a step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.distributed.group import OP_GRAPH, StepChannel


def _run(rank: int, port: int, seqs_list: list[int], steps: int, width: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    channel = StepChannel(dist.new_group(backend="gloo"))
    stamp = torch.zeros(1, dtype=torch.float64)
    for seqs in seqs_list:
        n = 3 * seqs + seqs + seqs * width + seqs + 1
        host = torch.arange(n, dtype=torch.int64)
        lat = []
        for _ in range(steps):
            dist.barrier()
            if rank == 0:
                stamp[0] = time.perf_counter()
                channel.send(OP_GRAPH, seqs, seqs, width, host, [])
                dist.broadcast(stamp, src=0)
            else:
                channel.recv()
                got = time.perf_counter()
                dist.broadcast(stamp, src=0)
                lat.append((got - stamp.item()) * 1e6)
        if rank == 1:
            out[seqs] = (statistics.median(lat), sorted(lat)[int(0.9 * len(lat))])
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", default="1,256")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--width", type=int, default=4, help="block-table width (max_seq_len / tokens_per_block)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manager = mp.Manager()
    out = manager.dict()
    seqs = [int(x) for x in args.seqs.split(",")]
    mp.spawn(_run, args=(port, seqs, args.steps, args.width, out), nprocs=2)
    for n in seqs:
        med, p90 = out[n]
        print(f"{n:4d} sequences: rank 0 send -> rank 1 has it: median {med:7.1f} us, p90 {p90:7.1f} us")


if __name__ == "__main__":
    main()
