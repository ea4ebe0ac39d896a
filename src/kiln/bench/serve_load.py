"""A load generator for a running `kiln serve`: streaming requests at a fixed concurrency or a Poisson
request rate, timed on the client as a user sees them.

The server is measured from outside, over HTTP, through either of its protocols (OpenAI completions
or KServe generate_stream). Prompts are drawn from a list of common English words that are one token
each in the usual BPE vocabularies (with their leading space), so a prompt of N words is close to N
tokens. The server streams text, not token ids: TTFT and the gaps between chunks are exact, while the
token count comes from the server's own usage report where it gives one (OpenAI `include_usage`).
A failed request is counted by its HTTP status (its body shown once), never fatal to the run. Each
closed-loop worker keeps a connection of its own, and every stream is read to its end, so that a
request's TTFT holds no connection set-up that a user's kept-alive client would not pay.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from kiln.bench.lengths import Stats, ms_line, stats_json
from kiln.errors import KilnError

PROTOCOLS = ("openai", "kserve")
PROBE_TIMEOUT_S = 10.0
SHOWN_BODY_CHARS = 500

# One token each (with a leading space) in SmolLM2's / GPT-2's BPE; common enough for Llama and Mistral too.
WORDS = tuple("""
the of and to in is was for that on with as by at from his her they this which have had one are were not
but all their there when been some time would more will what about many then them these so can people
into year two only new over other also after first way well work life back even good day world still
long made great place old years small last under might must never state same house river light water
city school night point high land home ever name number part given music early fire found story young
family ground church field power hand north south east west king road sea food book wind rain stone tree
green white black red blue garden summer winter morning evening table window door paper letter voice
face heart mind friend mother father child woman man boy girl horse bird dog fish town village country
island mountain valley forest bridge market street station train ship army war peace law court money
price trade plan idea question answer reason change form order line side area fact case week month word
game team
""".split())


def make_prompts(n: int, words_per_prompt: int, seed: int = 0) -> list[str]:
    """n different prompts of `words_per_prompt` random words each, reproducible from `seed`."""
    rng = random.Random(f"{seed}:prompts")
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_prompt)) for _ in range(n)]


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of n requests arriving as a Poisson process of `rate` per second:
    the first at 0, then exponential gaps of mean 1/rate."""
    if not rate > 0:
        raise KilnError(f"--request_rate {rate} is invalid: it must be more than 0 requests per second")
    rng = random.Random(f"{seed}:arrivals")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def request_for(protocol: str, model: str, prompt: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of one streaming request in `protocol`."""
    if protocol == "openai":
        return "/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True},
        }
    if protocol == "kserve":
        return f"/v2/models/{quote(model, safe='')}/generate_stream", {
            "text_input": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        }
    raise KilnError(f"--protocol {protocol!r} is unknown: choose one of {', '.join(PROTOCOLS)}")


@dataclass(frozen=True)
class Event:
    """What one server-sent event carried."""

    text: str = ""
    usage_tokens: int | None = None  # completion_tokens of an OpenAI usage report
    done: bool = False  # OpenAI's `data: [DONE]`
    error: str | None = None  # the server reported an error inside the stream, or sent something unreadable


def parse_line(protocol: str, line: str) -> Event | None:
    """One line of a server-sent event stream; None for lines that carry no data (blank, comment, event:)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return Event(done=True)
    try:
        data = json.loads(payload)
    except ValueError:
        return Event(error=f"not JSON: {payload[:SHOWN_BODY_CHARS]}")
    if not isinstance(data, dict):
        return Event(error=f"not a JSON object: {payload[:SHOWN_BODY_CHARS]}")
    if "error" in data:
        return Event(error=json.dumps(data["error"])[:SHOWN_BODY_CHARS])
    if protocol == "kserve":
        return Event(text=str(data.get("text_output") or ""))
    choices = data.get("choices") or []
    text = str(choices[0].get("text") or "") if choices and isinstance(choices[0], dict) else ""
    usage = data.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return Event(text=text, usage_tokens=int(tokens) if isinstance(tokens, int) else None)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it. A failed one has `failure` set (e.g. `HTTP 401`) and no times."""

    failure: str | None = None
    ttft_s: float = 0.0  # send -> first non-empty chunk
    latency_s: float = 0.0  # send -> end of the stream
    gaps_s: tuple[float, ...] = ()  # between successive non-empty chunks
    chunks: int = 0  # non-empty text chunks
    usage_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class ServeResult:
    num_requests: int
    completed: int
    wall_s: float
    output_chunks: int
    output_tokens: int | None  # from the server's usage reports, when every completed request had one
    ttft: Stats | None
    itl: Stats | None  # gaps between successive chunks of a request, all requests pooled
    latency: Stats | None
    failures: dict[str, int] = field(default_factory=dict)  # `HTTP 400`, `ReadTimeout`, ... -> count

    @property
    def failed(self) -> int:
        return self.num_requests - self.completed

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.wall_s

    @property
    def output_chunks_per_s(self) -> float:
        return self.output_chunks / self.wall_s

    @property
    def output_tokens_per_s(self) -> float | None:
        return None if self.output_tokens is None else self.output_tokens / self.wall_s

    def lines(self) -> list[str]:
        speed = f"{self.requests_per_s:9.2f} requests/s, {self.output_chunks_per_s:.1f} output chunks/s"
        if self.output_tokens_per_s is not None:
            speed += f", {self.output_tokens_per_s:.1f} output tokens/s (server usage)"
        lines = [
            f"{self.num_requests} requests: {self.completed} completed, {self.failed} failed",
            f"{'wall time':<22} {self.wall_s:9.3f} s",
            f"{'throughput':<22} {speed}",
            ms_line("time to first token", self.ttft),
            ms_line("inter-chunk latency", self.itl),
            ms_line("request latency", self.latency),
        ]
        if self.completed:
            mean = self.output_chunks / self.completed
            tokens = ""
            if self.output_tokens is not None:
                tokens = f", {self.output_tokens / self.completed:.1f} tokens"
            lines.append(f"{'output per request':<22} {mean:9.1f} chunks{tokens}")
        if self.failures:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items()))
            lines.append(f"{'failures':<22} {counts}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_requests": self.num_requests, "completed": self.completed, "failed": self.failed,
            "failures": dict(self.failures), "wall_s": self.wall_s, "requests_per_s": self.requests_per_s,
            "output_chunks": self.output_chunks, "output_chunks_per_s": self.output_chunks_per_s,
            "output_tokens": self.output_tokens, "output_tokens_per_s": self.output_tokens_per_s,
            "ttft_s": stats_json(self.ttft), "itl_s": stats_json(self.itl),
            "latency_s": stats_json(self.latency),
        }

    def to_json(self, **extra: Any) -> str:
        """The figures (times in seconds) and any `extra` fields (the server, the load, the lengths)."""
        return json.dumps({**extra, **self.to_dict()}, indent=2) + "\n"


def summarize(records: list[RequestRecord], wall_s: float) -> ServeResult:
    """The figures of a finished run; failed requests count only in `failures`."""
    if not records or wall_s <= 0:
        raise ValueError("a load run needs at least one request and a positive wall time")
    done = [r for r in records if r.ok]
    usage = [r.usage_tokens for r in done if r.usage_tokens is not None]
    return ServeResult(
        num_requests=len(records),
        completed=len(done),
        wall_s=wall_s,
        output_chunks=sum(r.chunks for r in done),
        output_tokens=sum(usage) if done and len(usage) == len(done) else None,
        ttft=Stats.of([r.ttft_s for r in done]),
        itl=Stats.of([g for r in done for g in r.gaps_s]),
        latency=Stats.of([r.latency_s for r in done]),
        failures=dict(Counter(r.failure for r in records if r.failure is not None)),
    )


# ---- talking to the server ------------------------------------------------------------------------

Log = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def check_url(url: str) -> str:
    """The base URL without a trailing slash; refuses one that is not http(s)."""
    if not url.startswith(("http://", "https://")):
        raise KilnError(f"--url {url!r} is invalid: give the server's address, e.g. http://127.0.0.1:8000")
    return url.rstrip("/")


def headers_for(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def resolve_model(client: httpx.AsyncClient, url: str, model: str | None) -> str:
    """Check that the server answers (GET /v1/models), and take its first model when none is named."""
    try:
        response = await client.get(f"{url}/v1/models", timeout=PROBE_TIMEOUT_S)
    except httpx.TransportError as e:
        raise KilnError(f"cannot reach {url} ({type(e).__name__}: {e or 'no answer'}): "
                        f"is `kiln serve` running at {url}?") from None
    if model:
        return model  # any answer will do: the server is up
    if response.status_code != 200:
        raise KilnError(f"GET {url}/v1/models answered HTTP {response.status_code} "
                        f"({response.text[:SHOWN_BODY_CHARS]}): check --api_key, or name the model with "
                        "--model")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise KilnError(f"GET {url}/v1/models did not list a model ({response.text[:SHOWN_BODY_CHARS]}): "
                        "name it with --model") from None


async def send_one(client: httpx.AsyncClient, url: str, protocol: str, model: str, prompt: str,
                   max_tokens: int) -> tuple[RequestRecord, str | None]:
    """Send one streaming request and time its chunks; returns the record and, for a failure, what to show.

    The stream is read to its end, also after OpenAI's `[DONE]` (the server ends the body right after
    it): a response left unfinished makes httpx close its connection, and the next request would pay a
    new TCP connection on both sides, which a client that keeps its connection does not."""
    path, body = request_for(protocol, model, prompt, max_tokens)
    times: list[float] = []
    usage: int | None = None
    end: float | None = None
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}{path}", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestRecord(f"HTTP {response.status_code}"), text[:SHOWN_BODY_CHARS]
            async for line in response.aiter_lines():
                event = None if end is not None else parse_line(protocol, line)
                if event is None:
                    continue
                if event.error is not None:
                    return RequestRecord("error in stream"), event.error
                if event.text:
                    times.append(time.perf_counter())
                if event.usage_tokens is not None:
                    usage = event.usage_tokens
                if event.done:
                    end = time.perf_counter()
    except httpx.HTTPError as e:  # connection lost, timeout, malformed answer
        return RequestRecord(type(e).__name__), f"{type(e).__name__}: {e}"
    end = end or time.perf_counter()
    if not times:
        return RequestRecord("no text streamed"), "the stream ended without any text"
    gaps = tuple(b - a for a, b in zip(times, times[1:]))
    return RequestRecord(None, times[0] - start, end - start, gaps, len(times), usage), None


def new_client(api_key: str | None, timeout_s: float, connections: int | None,
               verify: Any = True) -> httpx.AsyncClient:
    """An httpx client of at most `connections` kept-alive connections (None: no limit)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(headers=headers_for(api_key), timeout=httpx.Timeout(timeout_s), limits=limits,
                             verify=verify)


async def run_load(url: str, protocol: str, prompts: list[str], output_len: int, *, model: str | None = None,
                   concurrency: int | None = None, request_rate: float | None = None,
                   api_key: str | None = None, seed: int = 0, timeout_s: float = 300.0,
                   log: Log = _stderr) -> tuple[ServeResult, str]:
    """Send every prompt, at `concurrency` requests in flight or as Poisson arrivals at `request_rate`.

    Returns the figures and the model name used. The first failure of each kind is shown through `log`.
    """
    records, start, end, model = await _run_records(url, protocol, prompts, output_len, model=model,
                                                    concurrency=concurrency, request_rate=request_rate,
                                                    api_key=api_key, seed=seed, timeout_s=timeout_s, log=log)
    return summarize(records, end - start), model


async def _run_records(url: str, protocol: str, prompts: list[str], output_len: int, *, model: str | None,
                       concurrency: int | None, request_rate: float | None, api_key: str | None, seed: int,
                       timeout_s: float, log: Log) -> tuple[list[RequestRecord], float, float, str]:
    """The records of every request, and the run's start and end (time.time(), comparable across processes).
    At a fixed concurrency each worker has a connection of its own, kept from one request to the next;
    Poisson arrivals share one client with no limit on its connections."""
    url = _check_load(url, protocol, prompts, output_len, concurrency, request_rate)
    arrivals = arrival_times(len(prompts), request_rate, seed) if request_rate is not None else None
    shown: set[str] = set()
    records: list[RequestRecord | None] = [None] * len(prompts)
    verify = httpx.create_ssl_context()  # made once: each client would load the CA bundle again

    async def one(client: httpx.AsyncClient, i: int) -> None:
        record, problem = await send_one(client, url, protocol, model, prompts[i], output_len)
        records[i] = record
        if record.failure is not None and record.failure not in shown:
            shown.add(record.failure)
            log(f"  request failed: {record.failure}: {problem} (shown once; later ones are counted)")

    async with new_client(api_key, timeout_s, None, verify) as shared:
        model = await resolve_model(shared, url, model)
        start, wall_start = time.perf_counter(), time.time()
        if arrivals is not None:
            await asyncio.gather(*(_at(start + t, one(shared, i)) for i, t in enumerate(arrivals)))
        else:
            queue = iter(range(len(prompts)))
            await asyncio.gather(*(_worker_loop(new_client(api_key, timeout_s, 1, verify), queue, one)
                                   for _ in range(min(concurrency or 1, len(prompts)))))
        wall_end = wall_start + time.perf_counter() - start
    return [r for r in records if r is not None], wall_start, wall_end, model


def _check_load(url: str, protocol: str, prompts: list[str], output_len: int, concurrency: int | None,
                request_rate: float | None) -> str:
    """The base URL, once the run's settings are known to make sense (before any request)."""
    if (concurrency is None) == (request_rate is None):
        raise KilnError("give exactly one of --concurrency C and --request_rate R")
    if concurrency is not None and concurrency < 1:
        raise KilnError(f"--concurrency {concurrency} is invalid: it must be 1 or more")
    if not prompts:
        raise KilnError("--num_requests must be 1 or more")
    request_for(protocol, "m", "", output_len)  # an unknown protocol fails here
    return check_url(url)


async def _worker_loop(client: httpx.AsyncClient, queue: Iterator[int],
                       one: Callable[[httpx.AsyncClient, int], Awaitable[None]]) -> None:
    """One closed-loop user: its own connection, one request after another (the indices are shared).

    Not one pool for all the workers: httpcore's pool can hand one idle connection to several queued
    requests at once (it stays idle until the first of them starts); the others find it taken and go
    round again, one winner per round (encode/httpcore#822). Measured with 64 streams ending together
    (benchmarks/serve_ttft.py): requests waited up to 2 s for a connection of the client's own pool."""
    async with client:
        for i in queue:  # shared: each index is taken by one worker
            await one(client, i)


def run_load_processes(workers: int, url: str, protocol: str, prompts: list[str], output_len: int, *,
                       concurrency: int | None = None, request_rate: float | None = None, seed: int = 0,
                       **kwargs: Any) -> tuple[ServeResult, str]:
    """run_load spread over `workers` processes (one asyncio loop parsing thousands of streamed chunks a
    second is CPU-bound): each takes every workers-th prompt, its share of the concurrency or rate."""
    if workers <= 1:
        return run_load_sync(url, protocol, prompts, output_len, concurrency=concurrency,
                             request_rate=request_rate, seed=seed, **kwargs)
    if concurrency is not None and concurrency < workers:
        raise KilnError(f"--workers {workers} is more than --concurrency {concurrency}: use at most that many")
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for w in range(workers):
        share = None if concurrency is None else concurrency // workers + (w < concurrency % workers)
        rate = None if request_rate is None else request_rate / workers
        jobs.append((url, protocol, prompts[w::workers], output_len,
                     dict(concurrency=share, request_rate=rate, seed=seed + w, **kwargs)))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_worker, jobs))
    records = [r for part in parts for r in part[0]]
    start, end = min(p[1] for p in parts), max(p[2] for p in parts)
    return summarize(records, end - start), parts[0][3]


def _worker(job: tuple) -> tuple[list[RequestRecord], float, float, str]:
    url, protocol, prompts, output_len, kwargs = job
    return asyncio.run(_run_records(url, protocol, prompts, output_len, model=kwargs.pop("model", None),
                                    log=_stderr, **{k: kwargs.get(k) for k in (
                                        "concurrency", "request_rate", "api_key")},
                                    seed=kwargs.get("seed", 0), timeout_s=kwargs.get("timeout_s", 300.0)))


async def _at(when: float, job: Any) -> None:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    await job


def run_load_sync(*args: Any, **kwargs: Any) -> tuple[ServeResult, str]:
    """run_load in a fresh event loop (the CLI's and the tests' entry)."""
    return asyncio.run(run_load(*args, **kwargs))
