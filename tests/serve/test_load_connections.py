"""`kiln bench serve` keeps one connection per closed-loop worker, as a user's client does.

A request that paid a new TCP connection each time (the load generator used to stop reading an
OpenAI stream at `[DONE]`, which made httpx close the connection), or that waited in the client's own
pool behind other workers (httpcore can hand one idle connection to several queued requests), would
have its time to first token measured longer than the server made it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kiln.bench.serve_load import make_prompts, run_load_sync

from .conftest import MODEL, Server, run_server


class Connections:
    """ASGI wrapper: the client port of every POST (one port per TCP connection)."""

    def __init__(self, app: Any):
        self.app, self.ports = app, []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            self.ports.append(scope["client"][1])
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def counted(server: Server) -> Iterator[tuple[str, Connections]]:
    """The test server's app again, on a port of its own, counting connections."""
    app = Connections(server.app)
    for url in run_server(app):
        yield url, app


@pytest.mark.parametrize("protocol", ["openai", "kserve"])
def test_each_worker_keeps_its_connection(counted: tuple[str, Connections], protocol: str) -> None:
    url, app = counted
    app.ports.clear()
    r, _ = run_load_sync(url, protocol, make_prompts(6, 4), 3, model=MODEL, concurrency=2)
    assert (r.completed, r.failures) == (6, {})
    assert len(app.ports) == 6 and len(set(app.ports)) == 2  # not a connection per request
    if protocol == "openai":
        assert r.output_tokens == 18  # the usage report before [DONE] is still read


class Waves:
    """A server whose streams end together, as a batch of equal requests does: each request gets one
    event, then waits until `width` requests are open at once (at most `patience_s`), then ends."""

    def __init__(self, width: int, patience_s: float):
        self.width, self.patience_s = width, patience_s
        self.open, self.late = 0, 0
        self.full = asyncio.Event()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "more_body": True,
                    "body": f"data: {json.dumps({'text_output': ' a'})}\n\n".encode()})
        await self._wait_for_wave()
        await send({"type": "http.response.body", "body": b""})

    async def _wait_for_wave(self) -> None:
        self.open += 1
        if self.open == self.width:
            self.full.set()
        try:
            await asyncio.wait_for(self.full.wait(), self.patience_s)
        except asyncio.TimeoutError:
            self.late += 1
        self.open -= 1
        if not self.open:
            self.full = asyncio.Event()


def test_workers_do_not_wait_for_each_others_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 streams end at once, three times over. In one shared httpcore pool the 16 next requests were
    all handed the same idle connection: all but one found it taken (ConnectionNotAvailable) and went
    round again, one winner per round (measured: 37 such retries for 24 requests at 8 workers, and
    requests waiting 1.4 s for a connection at 64)."""
    import httpcore._async.connection_pool as pool

    retries: list[int] = []
    clear = pool.AsyncPoolRequest.clear_connection
    monkeypatch.setattr(pool.AsyncPoolRequest, "clear_connection",
                        lambda self: (retries.append(1), clear(self))[1])
    width, waves = 16, 3
    app = Waves(width, patience_s=5.0)
    for url in run_server(app):
        r, _ = run_load_sync(url, "kserve", make_prompts(width * waves, 4), 1, model="m", concurrency=width)
    assert (r.completed, r.failures) == (width * waves, {})
    assert app.late == 0  # every wave's requests were all open at once
    assert not retries, f"{len(retries)} requests found their connection taken by another worker's"
