"""The step loop in a process of its own, for servers that must not slow the GPU down.

In one process the HTTP event loop and the engine thread share one interpreter lock: while the loop
formats a step's worth of server-sent events, the engine cannot launch the next step (measured on an
H100 at 64 streams: 75% of the offline throughput at best). Here the engine runs in a child process
(spawned, so CUDA starts clean there) that owns the model, the scheduler and the KV cache; the
server's process keeps the tokenizer, checks requests against the engine's limits, and talks to the
child through two pipes: requests and aborts down, each step's new tokens and the engine's counters up.

`ProcessAsyncLLM` has AsyncLLM's interface, so the server does not know which one it serves with. A
child that dies fails every open request with a clear error, and the server reports not ready.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runtime.async_engine import (
    AsyncLLM,
    EngineDead,
    EngineStats,
    TokenEvent,
    _deliver,
    _Stream,
    token_event,
)
from kiln.runtime.engine import LLM
from kiln.runtime.loader import ModelSource
from kiln.runtime.sequence import Sequence

log = logging.getLogger("kiln.engine")
START_TIMEOUT_S = 900.0  # loading, tuning and graph capture of a large model


@dataclass(frozen=True)
class EngineSpec:
    """How the child builds its LLM: where the model comes from, the device, and LLM's keyword arguments."""

    device: str
    source: ModelSource
    llm_kwargs: dict[str, Any] = field(default_factory=dict)

    def create(self) -> LLM:
        return LLM.from_source(self.source, self.device, **self.llm_kwargs)


class _Counts:
    """The child's block manager and scheduler as the server reads them (updated after every step)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_used = self.num_cached = self.num_preemptions = 0
        self.hit_rate = 0.0
        self.waiting: list[None] = []  # only their lengths are read
        self.running: list[None] = []

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update(self, c: dict[str, Any]) -> None:
        self.num_used, self.num_cached, self.hit_rate = c["used"], c["cached"], c["hit_rate"]
        self.num_preemptions = c["preemptions"]
        self.waiting, self.running = [None] * c["waiting"], [None] * c["running"]


class _Front:
    """What the server needs of an LLM, without the model: config, tokenizer and the request checks."""

    encode = LLM.encode
    default_end_id = LLM.default_end_id
    make_sequence = LLM.make_sequence

    def __init__(self, config: Any, tokenizer: Any, counts: _Counts):
        self.config, self.tokenizer = config, tokenizer
        self.device = "cpu"  # seeded generators are made again in the child, on its device
        self.blocks = self.scheduler = counts


class ProcessAsyncLLM(AsyncLLM):
    def __init__(self, spec: EngineSpec, tokenizer_dir: str | Path | None = None, tokenizer: Any = None):
        from kiln.runtime.tokenizer import load_tokenizer

        ctx = mp.get_context("spawn")
        self._down, child_down = _pipe(ctx)  # requests: the parent writes, the child reads
        child_up, self._up = _pipe(ctx)  # tokens and counters: the child writes, the parent reads
        self._proc = ctx.Process(target=_child_main, args=(spec, child_down, child_up), name="kiln-engine",
                                 daemon=True)
        self._proc.start()
        child_down.close()
        child_up.close()
        if not self._up.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise KilnError(f"the engine process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._up.recv()
        except EOFError:
            raise KilnError("the engine process ended while loading the model (see its error above)") from None
        if kind == "failed":
            raise KilnError(payload)
        config, num_blocks = payload
        tok = tokenizer if tokenizer is not None else (load_tokenizer(tokenizer_dir) if tokenizer_dir else None)
        self.llm = _Front(config, tok, _Counts(num_blocks, config.build.tokens_per_block))  # type: ignore[assignment]
        self.stats = EngineStats()
        self.error: str | None = None
        self._stop = False
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}
        self._thread = threading.Thread(target=self._receive, name="kiln-engine-receiver", daemon=True)
        self._thread.start()

    def _send(self, command: tuple) -> None:
        kind, seq, stream = command
        try:
            self._send_locked(kind, seq, stream)
        except (OSError, ValueError):  # the pipe is closed: the child is gone
            if kind == "add":
                raise EngineDead(f"the engine has stopped: {self.error or 'its process ended'}") from None

    def _send_locked(self, kind: str, seq: Sequence, stream: _Stream | None) -> None:
        with self._lock:
            if kind == "add":
                self._streams[seq.seq_id] = stream
                self._down.send(("add", seq.seq_id, seq.prompt_ids, seq.params))
            else:
                self._streams.pop(seq.seq_id, None)
                self._down.send(("abort", seq.seq_id, None, None))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        try:
            with self._lock:
                self._down.send(("stop", None, None, None))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
        self._thread.join(timeout)

    def _receive(self) -> None:
        try:
            while True:
                events, counts = self._up.recv()
                if events == "error":
                    raise RuntimeError(counts)
                self._counts(counts)
                deliveries = []
                for seq_id, event in events:
                    stream = self._streams.get(seq_id)
                    if stream is not None:
                        deliveries.append((stream, event))
                        if event.finished:
                            self._streams.pop(seq_id, None)
                _deliver(deliveries)
        except (EOFError, OSError):
            code = self._proc.exitcode if not self._proc.is_alive() else None
            self.error = "shut down" if self._stop else f"the engine process ended (exit code {code})"
        except BaseException as e:  # noqa: BLE001 - anything else: every request must still hear of it
            self.error = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        if not self._stop:
            log.error("engine: %s", self.error)
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        _deliver([(s, TokenEvent([], [], [], True, "error", self.error)) for s in streams])

    def _counts(self, counts: dict[str, Any]) -> None:
        self.llm.blocks.update(counts)  # type: ignore[attr-defined]
        s = self.stats
        s.steps, s.computed_tokens, s.generation_tokens = counts["steps"], counts["computed"], counts["generated"]
        s.recent = counts["recent"]


def _pipe(ctx: Any) -> tuple[Any, Any]:
    """(writer, reader) of a one-way pipe."""
    reader, writer = ctx.Pipe(duplex=False)
    return writer, reader


def _child_main(spec: EngineSpec, down: Any, up: Any) -> None:
    try:
        llm = spec.create()
    except BaseException as e:  # noqa: BLE001 - said to the parent, which raises it as a KilnError
        up.send(("failed", f"the engine process could not load the model: {type(e).__name__}: {e}"))
        return
    # the model, torch and the tokenizer (most objects this process will ever hold) out of the garbage
    # collector's full passes, which would otherwise stop the step loop for 100+ ms now and then
    gc.collect()
    gc.freeze()
    up.send(("ready", (llm.config, llm.blocks.num_blocks)))
    try:
        _Loop(llm, down, up).run()
    except (BrokenPipeError, EOFError, KeyboardInterrupt):  # the server went away first: nothing to tell
        return
    except BaseException as e:  # noqa: BLE001 - a bug or a device failure: the parent fails every request
        import traceback

        traceback.print_exc()
        up.send(("error", f"the engine step loop failed: {type(e).__name__}: {e}"))


class _Loop:
    """The child's side: commands in, steps, tokens and counters out."""

    def __init__(self, llm: LLM, down: Any, up: Any):
        self.llm, self.down, self.up = llm, down, up
        self.seqs: dict[int, Sequence] = {}
        self.steps = self.computed = self.generated = 0
        self.recent: list[tuple[float, int]] = []

    def run(self) -> None:
        while True:
            if not self.llm.scheduler.has_work():
                self.send([])  # the counters after aborts, before waiting for the next request
                if not self.command(*self.down.recv()):
                    return
            while self.down.poll(0):
                if not self.command(*self.down.recv()):
                    return
            if self.llm.scheduler.has_work():  # aborts may have emptied it
                self.step()

    def command(self, kind: str, seq_id: int, prompt_ids: list[int] | None, params: Any) -> bool:
        if kind == "stop":
            return False
        if kind == "add":
            import torch

            seq = Sequence(prompt_ids or [], params, seq_id=seq_id)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.llm.device).manual_seed(params.seed)
            self.seqs[seq_id] = seq
            self.llm.scheduler.add(seq)
        elif seq_id in self.seqs:
            self.llm.scheduler.finish(self.seqs.pop(seq_id), "cancelled")
        return True

    def step(self) -> None:
        import time

        results = self.llm.step()
        now = time.perf_counter()
        self.steps, self.computed = self.steps + 1, self.computed + self.llm.last_step_tokens
        self.generated += len(results)
        self.recent = [(t, k) for t, k in self.recent if now - t <= 60] + [(now, len(results))]
        events = []
        for seq, new_ids in results:
            events.append((seq.seq_id, token_event(seq, new_ids)))
            if seq.finished:
                self.seqs.pop(seq.seq_id, None)
        self.send(events)

    def send(self, events: list[tuple[int, TokenEvent]]) -> None:
        b, sc = self.llm.blocks, self.llm.scheduler
        self.up.send((events, dict(
            used=b.num_used, cached=b.num_cached, hit_rate=b.hit_rate, waiting=len(sc.waiting),
            running=len(sc.running), preemptions=sc.num_preemptions, steps=self.steps, computed=self.computed,
            generated=self.generated, recent=self.recent[-200:])))
