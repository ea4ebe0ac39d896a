"""Where a decode step's time goes: the GPU kernels of a few eager decode steps, by total time.

    python3 benchmarks/profile_decode.py [--synthetic mistral-7b-v0.3] [--qformat int4_awq] [--group_size 128]

Eager (no CUDA graph) so that every kernel shows; the per-call times are the kernels' own, without the
launch gaps a graph removes. Prints the top kernels with their share of the step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from kiln.bench.synthetic import synthetic_model
from kiln.config import BuildConfig, SamplingParams
from kiln.quant.methods import QuantConfig
from kiln.runtime.engine import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="mistral-7b-v0.3")
    ap.add_argument("--qformat", default="full_prec")
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    build = BuildConfig(max_batch_size=1, max_input_len=args.context, max_seq_len=args.context + 64)
    quant = None if args.qformat == "full_prec" else QuantConfig(args.qformat, 0 if args.qformat == "fp8" else args.group_size)
    model, cfg = synthetic_model(args.synthetic, build, "cuda", "bfloat16", quant)
    llm = LLM.from_model(model, cfg, "cuda", cuda_graphs=False)
    prompt = torch.randint(0, cfg.model.vocab_size, (args.context,)).tolist()
    params = SamplingParams(max_tokens=args.steps + 4, temperature=0, ignore_eos=True)
    llm.generate([prompt], params)  # compile everything
    stream = llm.stream([prompt], params)
    next(stream)  # prefill done
    next(stream)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            next(stream)
        torch.cuda.synchronize()
    for _ in stream:
        pass
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"{args.synthetic} {args.qformat} g{args.group_size}: {total / args.steps / 1e3:.3f} ms of kernels per decode step")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
        print(f"  {e.device_time_total / args.steps / 1e3:7.3f} ms/step {e.count // args.steps:4d} calls/step "
              f"{e.device_time_total / max(e.count, 1):8.1f} us/call  {e.key[:90]}")


if __name__ == "__main__":
    main()
