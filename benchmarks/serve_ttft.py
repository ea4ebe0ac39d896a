"""Where a streamed request's time to first token goes, per protocol, under a closed loop of streams.

    python3 benchmarks/serve_ttft.py [--streams 64] [--step_ms 7] [--num_requests 1000] [--repeat 3]
    PYTHONPATH=<older tree>/src python3 benchmarks/serve_ttft.py ...   # that tree's server and client

The server is benchmarks/serve_overhead.py's (the real app behind uvicorn, `ProcessAsyncLLM`, a fake
engine process giving every running request a token each `--step_ms`), with timestamps added around
it; the client is the load generator of `kiln bench serve` (its `send_one` and its clients), keeping
`--streams` requests in flight and sending the next one as soon as one ends. Every request carries an
id header, so that the client's and the server's times of one request can be put side by side
(time.perf_counter is one monotonic clock for every process):

    sent (the worker starts it) -> request (httpcore writes it: a connection was found or made)
         -> asgi (the app is called) -> handler (the route runs) -> submit (to the engine)
         -> event (the engine's first output) -> chunk (the first event handed to uvicorn)
         -> received (the client parsed it)

For each protocol it prints the client's TTFT and each stage's p50 / p90 / p99 / max, for all
requests and for those over `--slow_ms`, and how many TCP connections the server saw (a closed loop
that keeps its connections needs `--streams`). `--dump` writes every request's times as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import signal
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_overhead as so  # noqa: E402  (the fake engine, the server and its helpers)

HEADER = "x-bench-id"
_TRACED = {"connection.connect_tcp.started": "connect", "http11.send_request_headers.started": "request"}
STAGES = (("sent", "request"), ("request", "asgi"), ("asgi", "handler"), ("handler", "submit"),
          ("submit", "event"), ("event", "chunk"), ("chunk", "received"))


# ---- the server's timestamps (in the server process) --------------------------------------------------
_CURRENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("bench", default=None)


class Timestamps:
    """ASGI middleware: a record per request with an id header (entered, client port, first body
    written), and GET /bench/trace answering the records so far (and forgetting them)."""

    def __init__(self, app: Any):
        self.app, self.records = app, {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/bench/trace":
            return await self._trace(send)
        rid = dict(scope["headers"]).get(HEADER.encode())
        if rid is None:
            return await self.app(scope, receive, send)
        rec = self.records[rid.decode()] = {"asgi": time.perf_counter(), "port": scope["client"][1]}
        _CURRENT.set(rec)

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body") and "chunk" not in rec:
                rec["chunk"] = time.perf_counter()
            await send(message)

        await self.app(scope, receive, timed_send)

    async def _trace(self, send: Any) -> None:
        body, self.records = json.dumps(self.records).encode(), {}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def time_generate() -> None:
    """ServerState.generate, timed: the handler's arrival, the submission, the first engine event."""
    from kiln.serve.engine_io import ServerState

    plain = ServerState.generate

    def generate(self: Any, ids: list[int], params: Any, arrival: float) -> Any:
        rec = _CURRENT.get()
        outputs = plain(self, ids, params, arrival)
        if rec is None:
            return outputs
        rec["handler"] = arrival

        async def timed() -> Any:
            rec["submit"] = time.perf_counter()
            async with aclosing(outputs):
                async for out in outputs:
                    rec.setdefault("event", time.perf_counter())
                    yield out

        return timed()

    ServerState.generate = generate  # type: ignore[method-assign]


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from kiln.bench.serve_load import WORDS
    from kiln.bench.synthetic import synthetic_tokenizer
    from kiln.runtime.engine_process import ProcessAsyncLLM
    from kiln.serve.app import create_app

    time_generate()
    words = tuple(dict.fromkeys(WORDS))
    tokenizer = synthetic_tokenizer(len(words) + so.WORDS_OFFSET, words)
    spec = so.FakeSpec(so.engine_config(args.streams), args.step_ms / 1000, len(words))
    engine = ProcessAsyncLLM(spec, tokenizer=tokenizer)  # type: ignore[arg-type]
    app = Timestamps(create_app(engine, so.MODEL))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.shutdown()


# ---- the client ------------------------------------------------------------------------------------------
async def closed_loop(port: int, protocol: str, prompts: list[str], streams: int,
                      output_len: int) -> dict[str, dict[str, float]]:
    """Every prompt through `kiln bench serve`'s send_one, `streams` in flight, each worker on a client of
    its own as the load generator has it (a tree without `new_client` on PYTHONPATH: one shared pool, as
    it had before); the client's times per request id."""
    import httpx

    from kiln.bench import serve_load

    url, times = f"http://127.0.0.1:{port}", {}
    rid: contextvars.ContextVar[str] = contextvars.ContextVar("rid")

    async def tag(request: httpx.Request) -> None:
        request.headers[HEADER] = key = rid.get()
        times[key] = {}

        async def trace(name: str, info: dict) -> None:  # httpcore's steps of the request
            step = _TRACED.get(name)
            if step:
                times[key].setdefault(step, time.perf_counter())

        request.extensions["trace"] = trace

    async def worker(client: httpx.AsyncClient) -> None:
        for i in jobs:
            rid.set(f"{protocol}-{i}")
            sent = time.perf_counter()
            record, problem = await serve_load.send_one(client, url, protocol, so.MODEL, prompts[i], output_len)
            if not record.ok:
                raise RuntimeError(f"request {i} failed: {record.failure}: {problem}")
            times[rid.get()].update(sent=sent, received=sent + record.ttft_s, ttft=record.ttft_s)

    jobs = iter(range(len(prompts)))
    own = hasattr(serve_load, "new_client")
    clients = [serve_load.new_client(None, 300.0, 1) for _ in range(streams)] if own else \
        [httpx.AsyncClient(timeout=300.0, limits=httpx.Limits(max_connections=streams,
                                                               max_keepalive_connections=streams))]
    for c in clients:
        c.event_hooks = {"request": [tag]}
    await asyncio.gather(*(worker(clients[k % len(clients)]) for k in range(streams)))
    for c in clients:
        await c.aclose()
    return times


def fetch_trace(port: int) -> dict[str, dict[str, float]]:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/bench/trace", timeout=30).json()


def quantiles(values: list[float]) -> str:
    from kiln.bench.lengths import percentile

    return " / ".join(f"{percentile(values, q) * 1e3:7.1f}" for q in (50, 90, 99, 100))


def report(protocol: str, client: dict[str, dict[str, float]], server: dict[str, dict[str, float]],
           slow_s: float, wall_s: float) -> list[str]:
    recs = [{**server.get(k, {}), **v} for k, v in client.items()]
    slow = [r for r in recs if r["ttft"] > slow_s]
    lines = [f"{protocol}: {len(recs)} requests in {wall_s:.1f} s, {len({r['port'] for r in recs})} TCP "
             f"connections; TTFT over {slow_s * 1e3:.0f} ms: {len(slow)}",
             f"  {'ms, p50 / p90 / p99 / max':<28} {'all':>34}   {'the slow ones':>30}",
             f"  {'TTFT (client)':<28} {quantiles([r['ttft'] for r in recs])}   "
             f"{quantiles([r['ttft'] for r in slow]) if slow else '-'}"]
    for a, b in STAGES:
        part = [r[b] - r[a] for r in recs if a in r and b in r]
        part_slow = [r[b] - r[a] for r in slow if a in r and b in r]
        lines.append(f"  {a + ' -> ' + b:<28} {quantiles(part) if part else '-'}   "
                     f"{quantiles(part_slow) if part_slow else '-'}")
    return lines


def measure(args: argparse.Namespace, protocol: str) -> list[str]:
    from kiln.bench.serve_load import make_prompts

    asyncio.run(closed_loop(args.port, protocol, make_prompts(args.streams, args.input_len, 1),
                            args.streams, 8))  # warm-up
    fetch_trace(args.port)
    prompts = make_prompts(args.num_requests, args.input_len)
    start, cpu = time.perf_counter(), (time.process_time(), so.cpu_seconds(args.server_pid))
    client = asyncio.run(closed_loop(args.port, protocol, prompts, args.streams, args.output_len))
    wall = time.perf_counter() - start
    print(f"{protocol}: client CPU {(time.process_time() - cpu[0]) / wall:.0%} of a core, server "
          f"{(so.cpu_seconds(args.server_pid) - cpu[1]) / wall:.0%}")
    server = fetch_trace(args.port)
    if args.dump:
        with open(f"{args.dump}.{protocol}.json", "w") as f:
            json.dump({"start": start, "client": client, "server": server}, f)
    return report(protocol, client, server, args.slow_ms / 1000, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--step_ms", type=float, default=7.0)
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--output_len", type=int, default=128)
    ap.add_argument("--num_requests", type=int, default=1000)
    ap.add_argument("--protocols", default="openai,kserve")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each protocol, interleaved")
    ap.add_argument("--slow_ms", type=float, default=500.0, help="a TTFT over this counts as slow")
    ap.add_argument("--dump", help="write each run's times to DUMP.PROTOCOL.json")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return
    args.port = so.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(args.port), "--streams",
                             str(args.streams), "--step_ms", str(args.step_ms)])
    try:
        so.wait_ready(args.port, proc)
        args.server_pid = proc.pid
        for _ in range(args.repeat):
            for protocol in args.protocols.split(","):
                print("\n".join(measure(args, protocol)), flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


if __name__ == "__main__":
    main()
