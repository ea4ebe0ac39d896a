"""Prometheus metrics for GET /metrics: what each request went through, and the engine's state.

Per-request figures (outcomes, time to first token, inter-token latency, end-to-end latency, token
counts) are recorded on the event loop as a request's outputs pass through `Metrics.track`. The
engine's state (queue, running sequences, KV blocks, prefix-cache hit rate, preemptions, tokens/s) is
read when Prometheus scrapes, by a collector: the engine thread never stops to update a gauge, and a
scrape always sees the current value. Each app has its own registry (never prometheus_client's global
one), so that several apps, as in the tests, do not share or clash over metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.runtime.async_engine import AsyncLLM, Output

OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    """The metrics of one app. `track` wraps a request's output stream; `rejected` counts a refusal."""

    def __init__(self, engine: AsyncLLM, model_name: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests", "Requests by how they ended: stop (end token or stop "
                                "string), length (max_tokens), cancelled (client went), error, rejected "
                                "(a bad request, answered 4xx)", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between a request's output steps",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Arrival to the last token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        r.register(EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def rejected(self) -> None:
        self.requests.labels("rejected").inc()

    async def track(self, outputs: AsyncIterator[Output], prompt_tokens: int,
                    arrival: float) -> AsyncIterator[Output]:
        """Pass a request's outputs through, timing them; closing this closes `outputs` (the request is
        then aborted by the engine)."""
        self.prompt_tokens.inc(prompt_tokens)
        last: float | None = None
        outcome: str | None = None
        try:
            async with aclosing(outputs):
                async for out in outputs:
                    last = self._step(out, arrival, last)
                    if out.finished:
                        outcome = out.finish_reason if out.finish_reason in ("stop", "length") else "error"
                    yield out
        except (asyncio.CancelledError, GeneratorExit):
            outcome = outcome or "cancelled"
            raise
        except BaseException:
            outcome = outcome or "error"
            raise
        finally:
            outcome = outcome or "cancelled"
            self.requests.labels(outcome).inc()
            if outcome in ("stop", "length"):
                self.e2e.observe(time.perf_counter() - arrival)

    def _step(self, out: Output, arrival: float, last: float | None) -> float | None:
        n = len(out.delta_ids)
        if not n:
            return last
        now = time.perf_counter()
        if last is None:
            self.ttft.observe(now - arrival)
        else:
            self.itl.observe(now - last)
        self.generation_tokens.inc(n)
        return now


class EngineCollector(Collector):
    """The engine's state, read at scrape time (plain reads of counters the engine thread keeps)."""

    def __init__(self, engine: AsyncLLM, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self) -> list[Metric]:
        return []  # the families are read at each collect

    def collect(self) -> Iterator[Metric]:
        llm, stats = self.engine.llm, self.engine.stats
        blocks, sched = llm.blocks, llm.scheduler
        yield _gauge("kiln_num_requests_waiting", "Requests queued for the engine", len(sched.waiting))
        yield _gauge("kiln_num_requests_running", "Sequences in the running batch", len(sched.running))
        yield _gauge("kiln_kv_cache_blocks_used", "KV-cache blocks held by sequences", blocks.num_used)
        yield _gauge("kiln_kv_cache_blocks_free", "KV-cache blocks free (cached prefixes included)",
                     blocks.num_free)
        yield _gauge("kiln_kv_cache_blocks_cached", "Free blocks that still hold a reusable prefix",
                     blocks.num_cached)
        yield _gauge("kiln_kv_cache_blocks_total", "KV-cache blocks", blocks.num_blocks)
        yield _gauge("kiln_kv_cache_usage_ratio", "Share of KV-cache blocks in use",
                     blocks.num_used / blocks.num_blocks)
        yield _gauge("kiln_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                     blocks.hit_rate)
        yield _gauge("kiln_generation_tokens_per_second", "Tokens generated per second, last 10 s",
                     stats.tokens_per_s())
        yield _gauge("kiln_engine_alive", "1 while the engine thread runs", 1.0 if self.engine.alive else 0.0)
        served = GaugeMetricFamily("kiln_served_model", "The model's name in the APIs", labels=["model_name"])
        served.add_metric([self.model_name], 1.0)
        yield served
        yield _counter("kiln_num_preemptions", "Sequences preempted for KV-cache room", sched.num_preemptions)
        yield _counter("kiln_engine_steps", "Engine steps run", stats.steps)
        yield _counter("kiln_computed_tokens", "Tokens through the model (prefix-cache hits excluded)",
                       stats.computed_tokens)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))
