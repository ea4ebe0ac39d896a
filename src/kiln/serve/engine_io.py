"""The server's side of the engine, shared by both protocols: its state, the checks of a prompt against
the engine's limits, and the two ways a request runs (to its end, or streamed).

A request runs only as long as its client is there. A streamed answer is cancelled by Starlette when
the client goes; one that answers at its end watches for the disconnect. Either way the request's
output stream is closed, which makes AsyncLLM abort it, so its KV blocks are free before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kiln.config import SamplingParams
from kiln.errors import KilnError
from kiln.runtime.async_engine import AsyncLLM, EngineDead, Output
from kiln.serve.metrics import Metrics
from kiln.serve.protocol import ApiError

log = logging.getLogger("kiln.serve")


@dataclass
class ServerState:
    """What every route of one app reaches through `request.app.state.kiln`."""

    engine: AsyncLLM
    model_name: str
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    max_queue_size: int | None = None  # requests waiting beyond the engine's max_batch_size; None: no bound
    open_requests: int = 0  # requests the engine is running or holding (event-loop side)
    _eos_ids: frozenset[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        settle_process()

    @property
    def llm(self) -> Any:
        return self.engine.llm

    def check_alive(self) -> None:
        if not self.engine.alive:
            raise EngineDead(f"the engine has stopped: {self.engine.error or 'shut down'}")

    def eos_ids(self) -> frozenset[int]:
        """The tokens that end a request by default (not part of its text); found once (a tokenizer's
        eos_token_id is a lookup of some cost)."""
        if self._eos_ids is None:
            ids = set(self.llm.config.model.eos_token_ids)
            if self.llm.default_end_id is not None:
                ids.add(self.llm.default_end_id)
            self._eos_ids = frozenset(ids)
        return self._eos_ids

    def admit(self, count: int) -> None:
        """Refuse (429) `count` more requests when the engine's batch and its waiting room are full, so that
        an overloaded server answers at once instead of queueing without bound."""
        if self.max_queue_size is None:
            return
        room = self.llm.config.build.max_batch_size + self.max_queue_size
        if self.open_requests + count > room:
            raise ApiError(
                429, f"the server is at capacity: {self.open_requests} requests are running or waiting, the most "
                f"it holds is max_batch_size {self.llm.config.build.max_batch_size} + max_queue_size "
                f"{self.max_queue_size}: retry shortly (or start the server with a larger --max_queue_size)",
                None, "server_overloaded")

    def generate(self, ids: list[int], params: SamplingParams, arrival: float) -> AsyncIterator[Output]:
        """One request's outputs, counted in the metrics and in `open_requests` while it runs."""
        return self._counted(self.metrics.track(self.engine.generate(ids, params), len(ids), arrival))

    async def _counted(self, outputs: AsyncIterator[Output]) -> AsyncIterator[Output]:
        self.open_requests += 1  # when it starts: a request refused before it runs is never counted
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    yield out
        finally:
            self.open_requests -= 1


def get_state(request: Request) -> ServerState:
    return request.app.state.kiln


_settled = False


def settle_process() -> None:
    """Move everything alive when the app is made (torch, transformers, the tokenizer, the app: a few
    hundred thousand objects) out of the garbage collector's sight, once per process: its full passes
    over them stopped the event loop for about 140 ms every few seconds of streaming (measured on 2 CPU
    cores at 64 streams), holding up every stream and every new request. What the server makes later is
    collected as before."""
    global _settled
    if not _settled:
        _settled = True
        gc.collect()
        gc.freeze()


# ---- checks ---------------------------------------------------------------------------------------
def checked_prompt(state: ServerState, ids: list[int], name: str) -> list[int]:
    """The prompt's token ids, if the engine can take them; else a 400 naming `name` and the limit."""
    build, vocab = state.llm.config.build, state.llm.config.model.vocab_size
    if not ids:
        raise ApiError(400, f"{name} is empty: give at least one token", name)
    if len(ids) > build.max_input_len:
        raise ApiError(400, f"{name} has {len(ids)} tokens, more than the engine's max_input_len "
                       f"{build.max_input_len}: shorten it (or rebuild the engine with a larger "
                       "--max_input_len)", name, "context_length_exceeded")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{name}: token id {bad} is outside the vocabulary (0..{vocab - 1})", name)
    return ids


def room(state: ServerState, ids: list[int]) -> tuple[int, str]:
    """How many tokens may follow this prompt, and the limit that says so (in words)."""
    build, blocks = state.llm.config.build, state.llm.blocks
    cache = blocks.num_blocks * build.tokens_per_block
    if cache < build.max_seq_len:
        return cache - len(ids), f"the KV cache holds {cache} tokens"
    return build.max_seq_len - len(ids), f"the engine's max_seq_len is {build.max_seq_len}"


def max_tokens_for(state: ServerState, ids: list[int], requested: int | None, default: int | None,
                   field: str, prompt_name: str) -> int:
    """`requested` if it fits after the prompt; without one, `default` (or all the room) capped to fit."""
    left, limit = room(state, ids)
    if requested is None:
        if left < 1:
            raise ApiError(400, f"{prompt_name} has {len(ids)} tokens and {limit}: no room is left to "
                           "generate; shorten it", prompt_name, "context_length_exceeded")
        return min(left, default or left)
    if requested > left:
        raise ApiError(400, f"{field} {requested} is too many: {prompt_name} has {len(ids)} tokens and "
                       f"{limit}, so at most {max(left, 0)} can be generated: lower {field} or shorten "
                       "the prompt", field, "context_length_exceeded")
    return requested


def check_with_engine(state: ServerState, ids: list[int], params: SamplingParams, prompt_name: str,
                      fields: dict[str, str]) -> None:
    """Every limit the engine itself checks, before anything runs. `fields` names the request's field
    for each SamplingParams one (a KilnError's message starts with the latter)."""
    try:
        state.llm.make_sequence(ids, params)
    except KilnError as e:
        word = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), fields.get(word, prompt_name)) from None


def sampling_params(fields: dict[str, str], **kwargs: Any) -> SamplingParams:
    """SamplingParams(**kwargs), its own checks answered 400 with the request's field named."""
    try:
        return SamplingParams(**kwargs)
    except KilnError as e:
        word = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), fields.get(word)) from None


# ---- running requests -----------------------------------------------------------------------------
@dataclass
class Result:
    """A finished request: its last output, and the log probabilities of all its tokens."""

    output: Output
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)


Job = Callable[[], AsyncIterator[Output]]  # starts one request when called


async def collect(outputs: AsyncIterator[Output]) -> Result:
    result: Result | None = None
    async with aclosing(outputs):
        async for out in outputs:
            result = result or Result(out)
            result.output = out
            result.logprobs += out.delta_logprobs
            result.top_logprobs += out.delta_top_logprobs
    if result is None:
        raise RuntimeError("a request ended without any output")
    return result


async def run_to_end(request: Request, jobs: list[Job]) -> list[Result] | None:
    """Run the requests side by side to their end; None if the client went first (all are then
    cancelled, which aborts them in the engine). The first failure is raised."""
    tasks = [asyncio.ensure_future(collect(job())) for job in jobs]
    everything = asyncio.gather(*tasks)
    everything.add_done_callback(_retrieve)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([everything, gone], return_when=asyncio.FIRST_COMPLETED)
        return everything.result() if everything.done() else None
    finally:
        gone.cancel()
        for task in tasks:
            task.cancel()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a failure as seen: it was raised to the route, or the client went and nobody wants it."""
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge(jobs: list[Job]) -> AsyncIterator[list[tuple[int, Output]]]:
    """The outputs of several requests as they come, as lists of (which, a copy of its output): all those
    ready at once (the choices that one engine step advanced) in one list. Closing this cancels those
    still running."""
    if len(jobs) == 1:
        async with aclosing(jobs[0]()) as outputs:
            async for out in outputs:
                yield [(0, out)]
        return
    queue: asyncio.Queue[tuple[int, Output | Exception | None]] = asyncio.Queue()

    async def pump(i: int, outputs: AsyncIterator[Output]) -> None:
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    queue.put_nowait((i, dataclasses.replace(out)))  # the engine reuses its Output
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, job())) for i, job in enumerate(jobs)]
    try:
        running = len(jobs)
        while running:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            ready: list[tuple[int, Output]] = []
            for i, item in items:
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    if ready:  # what came before the failure still goes out first
                        yield ready
                    raise item
                else:
                    ready.append((i, item))
            if ready:
                yield ready
    finally:
        for task in tasks:
            task.cancel()


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return ClosingStreamingResponse(events, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends. Starlette cancels a stream whose client went,
    but when that happens while a chunk is being sent, the generator is left suspended at its `yield`,
    and the engine would go on generating for nobody until it is garbage collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close: Callable[[], Awaitable[None]] | None = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def stream_error_message(e: Exception) -> tuple[int, str]:
    """The status and message of an error after a streamed answer began (its 200 is already sent)."""
    if isinstance(e, EngineDead):
        return 503, f"{e}: restart the server (its log says why it stopped)"
    if isinstance(e, (KilnError, ApiError)):
        return 400, str(e)
    log.error("a streamed request failed", exc_info=e)
    return 500, f"internal error ({type(e).__name__}): a bug in kiln; the server log has the traceback"
