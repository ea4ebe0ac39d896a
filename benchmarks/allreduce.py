"""All-reduce time per decode step under tensor parallelism, as the model issues them.

Run one process per GPU: `torchrun --nproc-per-node 2 benchmarks/allreduce.py --hidden 5120 --layers 40`.
A Llama-family decoder layer all-reduces its attention output and its MLP output ([tokens, hidden] in
bf16), so a step makes 2 * layers of them. They are timed inside a CUDA graph, as decode replays them,
for several token counts; rank 0 prints microseconds per all-reduce and per step, and the bus bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--tokens", default="1,8,64,256,512")
    p.add_argument("--impl", default="nccl,symm", help="nccl and/or symm (kiln's one-shot symmetric-memory path)")
    p.add_argument("--output_json")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    device = f"cuda:{torch.cuda.current_device()}"
    rows = []
    fast = None
    if "symm" in args.impl:
        from kiln.distributed.symm import SymmAllReduce

        fast = SymmAllReduce(dist.group.WORLD, device)
    impls = args.impl.split(",")
    for impl, n in [(i, int(t)) for i in impls for t in args.tokens.split(",")]:
        x = torch.randn(n, args.hidden, device="cuda", dtype=torch.bfloat16)

        def op(t: torch.Tensor, impl: str = impl) -> torch.Tensor:
            if impl == "symm":
                out = fast(t)
                assert out is not None
                return out
            dist.all_reduce(t)
            return t

        want = x.float().clone()
        dist.all_reduce(want)
        got = op(x.clone())
        err = (got.float() - want).abs().max().item()
        for _ in range(3):
            op(x)
        torch.cuda.synchronize()
        count = 2 * args.layers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(count):
                op(x)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 20
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        step_us = start.elapsed_time(end) / reps * 1e3
        each = step_us / count
        nbytes = x.numel() * x.element_size()
        busbw = 2 * (world - 1) / world * nbytes / (each * 1e-6) / 1e9
        rows.append(dict(impl=impl, max_abs_err=err, tokens=n, bytes=nbytes, us_per_allreduce=each, us_per_step=step_us, busbw_gbps=busbw))
        if rank == 0:
            print(f"{impl:5s} tokens {n:4d} (err {err:.3g}): {nbytes / 1024:8.1f} KiB  {each:7.2f} us per all-reduce  "
                  f"{step_us / 1e3:7.3f} ms per step ({count} all-reduces)  bus {busbw:7.1f} GB/s", flush=True)
    if rank == 0 and args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(world=world, hidden=args.hidden, layers=args.layers, rows=rows), f, indent=2)
    dist.barrier()
    os._exit(0)  # NCCL teardown after graph capture can block; the process is done


if __name__ == "__main__":
    main()
