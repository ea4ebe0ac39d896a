"""Many clients at once, some of them leaving early: every request that stays gets the text it gets alone
(greedy), and every one that goes is aborted, so that the engine ends idle with all its KV blocks free."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from .conftest import MODEL, Server, wait_idle

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
    "To make a cup of tea, first",
    "In 1969, the first man on the moon",
    "My favourite fruit is",
    "The quick brown fox",
]
MAX_TOKENS = 6
CONCURRENT = 64


def body(route: str, prompt: str, stream: bool) -> dict:
    if route == "openai":
        return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": stream}
    return {"text_input": prompt, "max_tokens": MAX_TOKENS, "exclude_input_in_output": True, "stream": stream}


def path(route: str) -> str:
    return "/v1/completions" if route == "openai" else "/v2/models/ensemble/generate_stream"


def text_of(route: str, event: dict) -> str:
    return event["choices"][0]["text"] if route == "openai" else event["text_output"]


async def one(client: httpx.AsyncClient, route: str, prompt: str, leave_after: int | None) -> str | None:
    """Stream one request; with `leave_after`, close the connection after that many chunks (None back)."""
    text, chunks = "", 0
    async with client.stream("POST", path(route), json=body(route, prompt, True)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += text_of(route, event)
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return None
    return text


async def crowd(url: str, plan: list[tuple[str, str, int | None]]) -> list[str | None]:
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, *p) for p in plan))


@pytest.fixture(scope="module")
def alone(server: Server) -> dict[str, str]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        return {p: http.post("/v1/completions", json=body("openai", p, False)).json()["choices"][0]["text"]
                for p in PROMPTS}


def test_concurrent_streams_with_cancellations(server: Server, alone: dict[str, str]) -> None:
    cancelled = cancelled_count(server)
    rng = random.Random(0)
    plan = [("openai" if i % 2 else "kserve", PROMPTS[i % len(PROMPTS)],
             rng.choice([1, 2, 3]) if rng.random() < 0.35 else None) for i in range(CONCURRENT)]
    results = asyncio.run(crowd(server.url, plan))
    kept = [(p, text) for (_, p, leave), text in zip(plan, results) if leave is None]
    assert 0 < len(kept) < CONCURRENT
    for prompt, text in kept:
        assert text == alone[prompt], prompt
    wait_idle(server.engine)
    assert server.engine.llm.blocks.num_used == 0
    assert cancelled_count(server) - cancelled == CONCURRENT - len(kept)  # as /metrics counts them


def cancelled_count(server: Server) -> float:
    return server.app.state.kiln.metrics.requests.labels("cancelled")._value.get()


def test_a_client_that_leaves_a_whole_answer_cancels_it(server: Server) -> None:
    long = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=long)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v2/models/ensemble/generate", json={"text_input": PROMPTS[1], "max_tokens": 400})
    wait_idle(server.engine)


def test_leaving_a_stream_of_n_choices_cancels_them_all(server: Server) -> None:
    async def leave() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            chat = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 300, "n": 3,
                    "stream": True, "temperature": 1.0, "seed": 1}
            async with client.stream("POST", "/v1/chat/completions", json=chat) as r:
                async for line in r.aiter_lines():
                    event = json.loads(line[6:]) if line.startswith("data: {") else None
                    if event and event["choices"][0]["delta"].get("content"):
                        return  # the first text: leave

    asyncio.run(leave())
    wait_idle(server.engine)
