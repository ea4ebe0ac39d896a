"""Summarize a step trace (KILN_STEP_TRACE=DIR, see src/kiln/runtime/steptrace.py).

    KILN_STEP_TRACE=/tmp/trace kiln bench latency --synthetic mistral-nemo-12b --tp_size 2 ...
    python3 benchmarks/step_trace.py /tmp/trace [--kind graph] [--skip 8]

For the decode steps (graph steps unless --kind eager), in microseconds, medians and p90:
  step        rank 0: start of one step to the start of the next (the time per output token)
  host        rank 0: the step's end (tokens on the host) to the next step's launch: the GPU's idle gap
              (negative with overlapped steps: the next step was launched before this one ended)
  before      rank 0: the runner's call to the step's launch (packing, sending to the other ranks)
  gpu         each rank: GPU time of the step, waits for the other ranks included
  lag         each rank > 0: its launch minus rank 0's launch of the same step
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path) -> dict[int, list[dict]]:
    ranks = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        ranks[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines()]
    if 0 not in ranks:
        raise SystemExit(f"{folder}: no rank0.jsonl (was KILN_STEP_TRACE set, and did the run end normally?)")
    return ranks


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{statistics.median(ordered):8.1f} (p90 {ordered[int(0.9 * (len(ordered) - 1))]:8.1f})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--kind", default="graph", choices=["graph", "eager"])
    p.add_argument("--skip", type=int, default=8, help="steps of each run of a kind to leave out (warm-up)")
    args = p.parse_args()
    ranks = load(args.folder)
    steps0 = ranks[0]
    n = min(len(s) for s in ranks.values())
    if any(len(s) != len(steps0) for s in ranks.values()):
        print(f"warning: ranks recorded different step counts ({[len(s) for s in ranks.values()]}); lined up {n}")
    kinds = {}
    for s in steps0:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    print(f"{len(ranks)} rank(s), {len(steps0)} steps: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    chosen = [i for i in range(args.skip, n - 1) if steps0[i]["kind"] == args.kind and steps0[i + 1]["kind"] == args.kind]
    if not chosen:
        raise SystemExit(f"no consecutive {args.kind} steps to summarize")
    us = 1e6
    print(f"{len(chosen)} {args.kind} steps (us, median and p90):")
    print(f"  step          {stats([(steps0[i + 1]['t_start'] - steps0[i]['t_start']) * us for i in chosen])}")
    print(f"  host          {stats([(steps0[i + 1]['t_launch'] - steps0[i]['t_done']) * us for i in chosen if 't_done' in steps0[i]])}")
    print(f"  before        {stats([(steps0[i]['t_launch'] - steps0[i]['t_start']) * us for i in chosen])}")
    print(f"  queue         {stats([(steps0[i]['t_queued'] - steps0[i]['t_launch']) * us for i in chosen])}")
    for r, steps in sorted(ranks.items()):
        if "gpu_ms" in steps[0]:
            print(f"  gpu rank {r}    {stats([steps[i]['gpu_ms'] * 1e3 for i in chosen])}")
        if r:
            print(f"  lag rank {r}    {stats([(steps[i]['t_launch'] - steps0[i]['t_launch']) * us for i in chosen])}")
            print(f"  recv rank {r}   {stats([(steps[i]['t_start'] - steps0[i]['t_start']) * us for i in chosen])}")


if __name__ == "__main__":
    main()
