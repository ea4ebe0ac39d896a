"""Where a step's time goes: per-step host and GPU timestamps of the model runner (KILN_STEP_TRACE=DIR).

Off unless the variable names a folder. Each rank then writes DIR/rank{r}.jsonl when it stops, one
line per step:
    kind      "graph" (a decode step replayed from a CUDA graph) or "eager"
    tokens    tokens in the step (the graph's bucket size for a graph step)
    t_start   host clock when the step began on this rank (rank 0: the runner was called; other
              ranks: rank 0's step message was in hand)
    t_launch  host clock just before this rank queued the step's GPU work
    t_queued  host clock once it was queued (for a graph, replay() returned)
    t_done    rank 0: host clock once the step's tokens were on the host (with overlapped steps, the
              next step may have been launched before this)
    gpu_ms    GPU time from the step's first to its last queued operation on this rank, waits for
              the other ranks' collectives included
All ranks of a host read the same monotonic clock (time.perf_counter), so steps can be lined up across
ranks: every rank runs every step, in the same order. benchmarks/step_trace.py summarizes a folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch


class StepTrace:
    def __init__(self, folder: str, rank: int, device: str):
        self.path = Path(folder) / f"rank{rank}.jsonl"
        self.cuda = device.startswith("cuda")
        self.steps: list[dict[str, Any]] = []
        self.events: list[tuple[Any, Any]] = []
        self._start = 0.0
        self._collected = 0

    def start(self) -> None:
        self._start = time.perf_counter()

    def launch(self, kind: str, tokens: int) -> None:
        step = {"kind": kind, "tokens": tokens, "t_start": self._start or time.perf_counter(),
                "t_launch": time.perf_counter()}
        self._start = 0.0
        self.steps.append(step)
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            self.events.append((begin, end))

    def queued(self) -> None:
        if self.cuda:
            self.events[-1][1].record()
        self.steps[-1]["t_queued"] = time.perf_counter()

    def done(self) -> None:
        """The oldest step not yet collected has its tokens on the host (steps are collected in the
        order they were launched; with overlapped steps one more may have been launched already)."""
        if self._collected < len(self.steps):
            self.steps[self._collected]["t_done"] = time.perf_counter()
            self._collected += 1

    def dump(self) -> None:
        if not self.steps:
            return
        if self.cuda:
            torch.cuda.synchronize()
            for step, (begin, end) in zip(self.steps, self.events):
                step["gpu_ms"] = begin.elapsed_time(end)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in self.steps))
        os.replace(tmp, self.path)
        self.steps, self.events, self._collected = [], [], 0


def from_environment(rank: int, device: str) -> StepTrace | None:
    folder = os.environ.get("KILN_STEP_TRACE")
    return StepTrace(folder, rank, device) if folder else None
