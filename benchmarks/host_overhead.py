"""The host's share of a decode step: everything the engine does besides running the model.

    python3 benchmarks/host_overhead.py [--seqs 512] [--input_len 128] [--output_len 128]

On a GPU, a step's model work is queued and runs while Python waits; the host work around it
(scheduling, packing the inputs, sampling's bookkeeping, appending tokens, naming full KV blocks
for the prefix cache, the stream's events) runs while the GPU waits. This measures that host work
alone, on the CPU: the model's forward is replaced by random logits of a small vocabulary (argmax
over a real vocabulary runs on the GPU), so every other line of the engine runs as it does in
`kiln bench throughput`. Figures are per decode step of `--seqs` running sequences. (With overlapped
steps, the default, most of this runs while the GPU computes the step already launched; KILN_OVERLAP=0
gives the plain order. Either way it is work the host must get through once per step.)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch

from kiln.bench.synthetic import SHAPES
from kiln.builder.engine_file import EngineConfig, current_versions
from kiln.config import BuildConfig, SamplingParams
from kiln.models.registry import create_model
from kiln.runtime import engine as engine_mod
from kiln.runtime.engine import LLM
from kiln.runtime.model_runner import graph_buckets

VOCAB = 512


def make_llm(seqs: int, input_len: int, output_len: int, block: int) -> LLM:
    cfg = dataclasses.replace(SHAPES["smollm2-135m"], num_layers=1, vocab_size=VOCAB)
    build = BuildConfig(max_batch_size=seqs, max_input_len=input_len, max_seq_len=input_len + output_len,
                        max_num_tokens=max(8192, seqs), tokens_per_block=block)
    model = create_model(cfg, build.max_seq_len, "cpu", dtype=torch.float32)
    engine = EngineConfig(model=cfg, build=build, dtype="float32", tp_size=1, device={"name": "cpu"},
                          quantization={}, flags={}, versions=current_versions())
    blocks = seqs * -(-(input_len + output_len) // block) + 16
    return LLM.from_model(model.eval(), engine, "cpu", num_kv_blocks=blocks)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, default=512)
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--output_len", type=int, default=128)
    p.add_argument("--tokens_per_block", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top_p", type=float, default=1.0)
    args = p.parse_args()
    torch.manual_seed(0)
    llm = make_llm(args.seqs, args.input_len, args.output_len, args.tokens_per_block)
    runner, sched = llm.runner, llm.scheduler
    times: dict[str, float] = defaultdict(float)
    state = {"decode": False}

    logits = torch.randn(max(8192, args.seqs), VOCAB)  # made once: drawing them each step would be timed

    def forward(host, tokens, seqs, width, rows, ids=None):  # noqa: ANN001, ANN202 - the runner's signature
        return logits[: len(rows) if rows is not None else tokens]

    def timed(name, fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **k):  # noqa: ANN202
            t = time.perf_counter()
            r = fn(*a, **k)
            if state["decode"]:
                times[name] += time.perf_counter() - t
            return r
        return wrapper

    orig_schedule = sched.schedule

    def schedule():  # noqa: ANN202
        t = time.perf_counter()
        batch = orig_schedule()
        state["decode"] = all(n == 1 for _, n in batch)
        if state["decode"]:
            times["schedule"] += time.perf_counter() - t
        return batch

    orig_update = sched.update

    def update(batch, sampled):  # noqa: ANN001, ANN202
        if state["decode"]:
            times["steps"] += 1
        return orig_update(batch, sampled)

    if hasattr(runner, "_forward"):
        runner._forward = forward
    else:  # an older tree
        runner._execute = forward
    # Decode steps take the CUDA-graph path as on a GPU: pack, then "replay" (here: random logits).
    runner.graphs = {size: None for size in graph_buckets(args.seqs)}
    runner._replay = lambda size, host, ids=None: logits[:size]
    sched.schedule = schedule
    runner.run = timed("run (pack)", runner.run)
    if hasattr(sched, "schedule_ahead"):  # (so that older trees can be measured with this script too)
        orig_ahead = sched.schedule_ahead

        def schedule_ahead(pending, sampled):  # noqa: ANN001, ANN202
            t = time.perf_counter()
            plan = orig_ahead(pending, sampled)
            state["decode"] = bool(plan) and all(n == 1 for _, n in plan[0])
            if state["decode"]:
                times["schedule"] += time.perf_counter() - t
            return plan

        sched.schedule_ahead = schedule_ahead
    if hasattr(runner, "run_ahead"):
        runner.run_ahead = timed("run (pack)", runner.run_ahead)
        llm._choose_on_device = timed("sample", llm._choose_on_device)
    engine_mod.sample = timed("sample", engine_mod.sample)
    sched.update = timed("update", update)
    llm._event = timed("events", llm._event)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (args.input_len,), generator=gen).tolist() for _ in range(args.seqs)]
    params = SamplingParams(max_tokens=args.output_len, temperature=args.temperature, top_p=args.top_p,
                            ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    times.clear()
    start = time.perf_counter()
    for _ in llm.stream(prompts, params):
        pass
    wall = time.perf_counter() - start
    steps = times.pop("steps")
    total = sum(times.values())
    print(f"{args.seqs} sequences, {args.input_len} + {args.output_len} tokens, {int(steps)} decode steps, "
          f"wall {wall:.2f} s (prefill included)")
    for name, v in times.items():
        print(f"  {name:12s} {v / steps * 1e3:7.3f} ms/step  {v / steps / args.seqs * 1e6:6.2f} us/sequence")
    print(f"  {'total':12s} {total / steps * 1e3:7.3f} ms/step  {total / steps / args.seqs * 1e6:6.2f} us/sequence")


if __name__ == "__main__":
    main()
