"""Where the time of an offline throughput run goes, step by step, on the host and on the device.

    python3 benchmarks/profile_steps.py [--synthetic llama-3.1-8b] [--num_requests 1000] [--max_batch_size 256]

Wraps the engine's phases with device synchronization (which itself costs a little) and sums, per kind
of step (graph decode, eager decode, prefill or mixed), the time in scheduling, in the model, in sampling
and in bookkeeping, and the tokens each kind computed.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from kiln.bench.synthetic import synthetic_model
from kiln.config import BuildConfig, SamplingParams
from kiln.runtime import engine as engine_mod
from kiln.runtime.engine import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="llama-3.1-8b")
    ap.add_argument("--num_requests", type=int, default=1000)
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--output_len", type=int, default=128)
    ap.add_argument("--max_batch_size", type=int, default=256)
    ap.add_argument("--max_num_tokens", type=int, default=8192)
    args = ap.parse_args()
    build = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.input_len,
                        max_seq_len=args.input_len + args.output_len, max_num_tokens=args.max_num_tokens)
    model, cfg = synthetic_model(args.synthetic, build, "cuda", "bfloat16")
    llm = LLM.from_model(model, cfg, "cuda")
    times: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    sync = torch.cuda.synchronize

    sched, runner = llm.scheduler, llm.runner
    orig_schedule, orig_run, orig_update = sched.schedule, runner.run, sched.update
    orig_sample = engine_mod.sample
    state = {"kind": "?", "tokens": 0, "seqs": 0}
    slow: list[tuple[float, int, int]] = []  # (ms, tokens, sequences) of each step outside a graph

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            r = fn(*a, **k)
            sync()
            dt = time.perf_counter() - t
            times[state["kind"]][name] += dt
            if name == "model" and state["kind"] != "decode (graph)":
                slow.append((round(dt * 1e3, 1), state["tokens"], state["seqs"]))
            return r
        return wrapper

    def schedule():
        t = time.perf_counter()
        batch = orig_schedule()
        graph = all(n == 1 and s.num_computed + 1 == len(s) for s, n in batch)
        state["kind"] = "decode (graph)" if graph and len(batch) <= max(runner.graphs or [0]) else "prefill/mixed"
        k = times[state["kind"]]
        k["schedule"] += time.perf_counter() - t
        k["steps"] += 1
        k["tokens"] += sum(n for _, n in batch)
        k["seqs"] += len(batch)
        state["tokens"], state["seqs"] = sum(n for _, n in batch), len(batch)
        return batch

    sched.schedule = schedule
    runner.run = timed("model", orig_run)
    engine_mod.sample = timed("sample", orig_sample)
    sched.update = timed("update", orig_update)
    vocab = cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.input_len,), generator=gen).tolist() for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    times.clear()
    slow.clear()
    start = time.perf_counter()
    stream_time = 0.0
    it = llm.stream(prompts, params)
    while True:
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        stream_time += time.perf_counter() - t
    wall = time.perf_counter() - start
    print(f"wall {wall:.3f} s, {args.num_requests * args.output_len / wall:.0f} output tokens/s")
    for kind, k in times.items():
        phases = {n: v for n, v in k.items() if n not in ("steps", "tokens", "seqs")}
        steps = k["steps"] or 1
        print(f"{kind}: {int(k['steps'])} steps, {k['tokens'] / steps:.0f} tokens and {k['seqs'] / steps:.0f} "
              f"sequences per step; " + ", ".join(f"{n} {v:.3f} s ({v / steps * 1e3:.2f} ms/step)"
                                                   for n, v in phases.items()))
    accounted = sum(v for k in times.values() for n, v in k.items() if n not in ("steps", "tokens", "seqs"))
    print("steps outside a graph (ms, tokens, sequences):", slow)
    print(f"accounted {accounted:.3f} s of {wall:.3f} s; the rest is the stream's own bookkeeping")


if __name__ == "__main__":
    main()
