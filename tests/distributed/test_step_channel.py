"""Rank 0's step messages arrive whole on rank 1: small ones inline with the header, large ones in two parts."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.distributed.group import OP_ALL_LOGITS, OP_FORWARD, OP_GRAPH, OP_STOP, StepChannel

N = StepChannel.INLINE
MESSAGES = [  # op, tokens, seqs, width, host length, rows (None: logits of every token)
    (OP_GRAPH, 4, 4, 3, 10, []),
    (OP_FORWARD, 7, 2, 5, 40, [3, 6]),
    (OP_FORWARD, 9000, 3, 5, 3 * 9000 + 3 + 15 + 4, [8999]),  # beyond the inline part
    (OP_ALL_LOGITS, 5, 1, 2, N - 3, None),  # exactly at the inline limit with its rows... none
    (OP_FORWARD, 5, 1, 2, N - 1, [4]),  # host + rows = INLINE exactly
    (OP_FORWARD, 5, 1, 2, N, [4]),  # one past it
    (OP_STOP, 0, 0, 0, 0, None),
]


def _rank(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    channel = StepChannel(dist.new_group(backend="gloo"))
    for i, (op, tokens, seqs, width, n, rows) in enumerate(MESSAGES):
        host = torch.arange(n, dtype=torch.int64) * 7 + i
        if rank == 0:
            channel.send(op, tokens, seqs, width, host if n else None, rows)
        else:
            got = channel.recv()
            results[i] = (got[:4], got[4].tolist(), got[5])
    dist.destroy_process_group()


def test_messages_arrive_whole():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2)
    for i, (op, tokens, seqs, width, n, rows) in enumerate(MESSAGES):
        head, host, got_rows = results[i]
        assert head == (op, tokens, seqs, width), i
        assert host == (torch.arange(n, dtype=torch.int64) * 7 + i).tolist(), i
        assert got_rows == rows, i
