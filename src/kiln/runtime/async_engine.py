"""The LLM in a background thread, for servers: requests arrive and leave at any time, from asyncio.

    engine = AsyncLLM(LLM("engines/smollm2", "models/hf/smollm2"))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(out.delta, end="")

One thread owns the scheduler, the model and the KV cache and runs the step loop while there is work;
everything else talks to it through a command queue (add, abort) and receives, once per step, the new
tokens of its requests on the asyncio loop it came from. Text is made on the caller's side (one
TextStream per request), so detokenizing never holds up a step. A request whose consumer goes away
(a client disconnects, a task is cancelled) is aborted and its KV blocks are freed before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kiln.config import SamplingParams
from kiln.runtime.engine import LLM, Prompt
from kiln.runtime.sequence import Sequence
from kiln.runtime.tokenizer import TextStream

log = logging.getLogger("kiln.engine")

# How long a thread may hold the GIL while another waits for it. Python's default, 5 ms, is most of a
# decode step: the engine thread would wait behind the event loop's HTTP work after every step
# (measured on an H100 at 64 streams: 3,530 output tokens/s at 5 ms, 5,078 at 0.2 ms).
GIL_SWITCH_INTERVAL_S = 0.0002


@dataclass
class TokenEvent:
    """What one step gave one request."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finished: bool
    finish_reason: str | None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache held at admission


@dataclass
class Output:
    """The state of one request after an event: new text and tokens, and everything so far."""

    request_id: int
    prompt_ids: list[int]
    delta: str = ""
    delta_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[float] = field(default_factory=list)
    delta_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    cached_tokens: int = 0


@dataclass
class EngineStats:
    """Counters the engine thread keeps (read by /metrics)."""

    steps: int = 0
    computed_tokens: int = 0  # tokens through the model (prompt chunks and decodes; cache hits excluded)
    generation_tokens: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) of recent steps

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.perf_counter()
        tokens = sum(n for t, n in self.recent if now - t <= window_s)
        return tokens / window_s


class EngineDead(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, llm: LLM):
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.llm = llm
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, _Stream] = {}  # engine thread only
        self._stop = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    # ---- caller side -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, prompt: Prompt, params: SamplingParams) -> _Stream:
        """Check a request (KilnError / LimitError for a bad one) and queue it; call from the event loop."""
        if not self.alive:
            raise EngineDead(f"the engine has stopped: {self.error or 'shut down'}")
        seq = self.llm.make_sequence(prompt, params)
        stream = _Stream(seq, asyncio.get_running_loop())
        self._send(("add", seq, stream))
        return stream

    def abort(self, stream: _Stream) -> None:
        if not stream.done:
            self._send(("abort", stream.seq, None))

    async def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Output]:
        """Stream one request: an Output per step that gave it tokens, the last one finished.
        Stop strings end the request and cut its text before them. Leaving the loop early aborts it."""
        stream = self.submit(prompt, params)
        seq = stream.seq
        text = TextStream(self.llm.tokenizer, params.stop) if self.llm.tokenizer is not None else None
        out = Output(seq.seq_id, list(seq.prompt_ids))
        try:
            while True:
                event = await stream.queue.get()
                if event.error is not None:
                    raise EngineDead(event.error)
                self._apply(out, event, text, seq)
                if text is not None and text.stop_hit and not event.finished:
                    self.abort(stream)
                    out.finished, out.finish_reason = True, "stop"
                out.cached_tokens = event.cached_tokens
                yield out
                if out.finished:
                    stream.done = True
                    return
        finally:
            if not stream.done:
                stream.done = True
                self._send(("abort", seq, None))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _apply(self, out: Output, event: TokenEvent, text: TextStream | None, seq: Sequence) -> None:
        out.delta_ids = event.token_ids
        out.delta_logprobs, out.delta_top_logprobs = event.logprobs, event.top_logprobs
        out.output_ids = out.output_ids + event.token_ids
        out.finished, out.finish_reason = event.finished, event.finish_reason
        if text is None:
            return
        visible = out.output_ids
        end_id = seq.params.end_id
        if event.finish_reason == "stop" and end_id is not None and visible[-1:] == [end_id]:
            visible = visible[:-1]
        out.delta = text.update(visible, final=event.finished)
        out.text = text.text

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain()
                if not self.llm.scheduler.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as e:  # a bug or a device failure: fail every request instead of hanging them
            log.exception("the engine step loop failed")
            self.error = f"{type(e).__name__}: {e}"
            self._fail_all(self.error)

    def _drain(self) -> None:
        while True:
            try:
                kind, seq, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._streams[seq.seq_id] = stream
                self.llm.scheduler.add(seq)
            else:
                self.llm.scheduler.finish(seq, "cancelled")
                self._streams.pop(seq.seq_id, None)

    def _step(self) -> None:
        results = self.llm.step()
        now = time.perf_counter()
        self.stats.steps += 1
        deliveries = []
        for seq, new_ids in results:
            stream = self._streams.get(seq.seq_id)
            if stream is None:
                continue
            deliveries.append((stream, token_event(seq, new_ids)))
            if seq.finished:
                del self._streams[seq.seq_id]
        self.stats.generation_tokens += len(results)
        self.stats.computed_tokens += self.llm.last_step_tokens
        self.stats.recent = [(t, k) for t, k in self.stats.recent if now - t <= 60] + [(now, len(results))]
        _deliver(deliveries)

    def _fail_all(self, message: str) -> None:
        deliveries = [(stream, TokenEvent([], [], [], True, "error", message)) for stream in self._streams.values()]
        self._streams.clear()
        _deliver(deliveries)


def token_event(seq: Sequence, new_ids: list[int]) -> TokenEvent:
    """What a step gave `seq`: its new tokens, their log probabilities, and whether it ended."""
    n = len(new_ids)
    return TokenEvent(list(new_ids), seq.logprobs[-n:] if seq.logprobs else [],
                      seq.top_logprobs[-n:] if seq.top_logprobs else [], seq.finished, seq.finish_reason,
                      cached_tokens=seq.cached_tokens)


class _Stream:
    """The caller's end of one request: an asyncio queue fed by the engine thread."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop):
        self.seq = seq
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.done = False


def _deliver(deliveries: list[tuple[_Stream, TokenEvent]]) -> None:
    """Hand each event to its request's loop, one wake-up per loop per step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, TokenEvent]]] = {}
    for stream, event in deliveries:
        by_loop.setdefault(stream.loop, []).append((stream, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop is closed: nobody is listening
            pass


def _put_all(items: list[tuple[_Stream, TokenEvent]]) -> None:
    for stream, event in items:
        stream.queue.put_nowait(event)
