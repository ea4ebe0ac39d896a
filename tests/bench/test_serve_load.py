"""kiln bench serve against a fake server: both streaming protocols, failures counted, a clear error
where nothing listens. The fake answers as `kiln serve` is specified to, one word per chunk."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kiln.bench.serve_load import (
    WORDS,
    RequestRecord,
    arrival_times,
    make_prompts,
    parse_line,
    request_for,
    run_load_sync,
    summarize,
)
from kiln.errors import KilnError

KEY = "secret"
MODEL = "tiny"
MAX_TOKENS = 64  # the fake refuses more with HTTP 400, as a server refuses requests over its limits


def fake_server() -> FastAPI:
    app = FastAPI()

    def refusal(request: Request, body: dict[str, Any]) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        if body["max_tokens"] > MAX_TOKENS:
            return JSONResponse({"error": {"message": f"max_tokens is over {MAX_TOKENS}"}}, status_code=400)
        return None

    async def words(n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(0.002)
            yield f" w{i}"

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        refused = refusal(request, body)
        if refused:
            return refused
        assert body["stream"] is True and body["ignore_eos"] is True and body["model"] == MODEL

        async def events() -> AsyncIterator[str]:
            async for text in words(body["max_tokens"]):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v2/models/{name}/generate_stream")
    async def generate_stream(name: str, request: Request) -> Any:
        body = await request.json()
        refused = refusal(request, body)
        if refused:
            return refused
        if name != MODEL:
            return JSONResponse({"error": f"no model {name}"}, status_code=404)

        async def events() -> AsyncIterator[str]:
            async for text in words(body["max_tokens"]):
                yield f"data: {json.dumps({'model_name': name, 'text_output': text})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_server(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the fake server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- pure functions --------------------------------------------------------------------------------

def test_prompts_are_seeded_words_of_the_list() -> None:
    p = make_prompts(3, 12, seed=5)
    assert p == make_prompts(3, 12, seed=5) and p != make_prompts(3, 12, seed=6)
    assert len(set(p)) == 3 and all(len(x.split()) == 12 and set(x.split()) <= set(WORDS) for x in p)


def test_poisson_arrivals_are_seeded_with_the_asked_mean_rate() -> None:
    t = arrival_times(2000, rate=50.0, seed=1)
    assert t == arrival_times(2000, rate=50.0, seed=1) and t[0] == 0.0
    assert all(b >= a for a, b in zip(t, t[1:]))
    assert 45 < len(t) / t[-1] < 55
    with pytest.raises(KilnError, match="--request_rate 0"):
        arrival_times(3, 0)


def test_request_bodies_of_both_protocols() -> None:
    path, body = request_for("openai", "m", "hi there", 8)
    assert path == "/v1/completions"
    assert body == {"model": "m", "prompt": "hi there", "max_tokens": 8, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
    path, body = request_for("kserve", "my model", "hi", 8)
    assert path == "/v2/models/my%20model/generate_stream"
    assert body == {"text_input": "hi", "max_tokens": 8, "temperature": 0, "stream": True}
    with pytest.raises(KilnError, match="--protocol 'grpc'"):
        request_for("grpc", "m", "hi", 8)


def test_server_sent_event_lines() -> None:
    assert parse_line("openai", "") is None and parse_line("openai", ": keep-alive") is None
    assert parse_line("openai", 'data: {"choices": [{"text": " a"}]}').text == " a"
    assert parse_line("openai", "data: [DONE]").done
    usage = parse_line("openai", 'data: {"choices": [], "usage": {"completion_tokens": 7}}')
    assert usage.text == "" and usage.usage_tokens == 7
    assert parse_line("openai", 'data: {"choices": [{"text": "x"}], "usage": null}').usage_tokens is None
    assert parse_line("kserve", 'data: {"text_output": "b"}').text == "b"
    assert "boom" in parse_line("kserve", 'data: {"error": "boom"}').error
    assert parse_line("kserve", "data: {not json").error.startswith("not JSON")


def test_summary_counts_failures_and_times_only_successes() -> None:
    records = [
        RequestRecord(None, 0.1, 0.5, (0.1, 0.2), 3, 3),
        RequestRecord(None, 0.3, 0.9, (0.3,), 2, 2),
        RequestRecord("HTTP 400"), RequestRecord("HTTP 400"), RequestRecord("ReadTimeout"),
    ]
    r = summarize(records, wall_s=2.0)
    assert (r.num_requests, r.completed, r.failed) == (5, 2, 3)
    assert r.failures == {"HTTP 400": 2, "ReadTimeout": 1}
    assert r.requests_per_s == 1.0 and r.output_chunks_per_s == 2.5 and r.output_tokens_per_s == 2.5
    assert r.ttft.count == 2 and r.itl.count == 3 and r.latency.p50 == pytest.approx(0.7)
    assert any("HTTP 400: 2, ReadTimeout: 1" in line for line in r.lines())
    data = json.loads(r.to_json(url="x"))
    assert data["url"] == "x" and data["failures"] == {"HTTP 400": 2, "ReadTimeout": 1}
    # tokens only when every completed request reported its usage
    assert summarize(records[:1] + [RequestRecord(None, 0.1, 0.2, (), 1, None)], 1.0).output_tokens is None
    assert summarize([RequestRecord("HTTP 401")], 1.0).ttft is None


# ---- against the fake server -----------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["openai", "kserve"])
def test_concurrency_run_counts_every_chunk(server_url: str, protocol: str) -> None:
    prompts = make_prompts(8, 16)
    r, model = run_load_sync(server_url, protocol, prompts, 5, concurrency=3, api_key=KEY)
    assert model == MODEL  # the first of GET /v1/models
    assert (r.num_requests, r.completed, r.failures) == (8, 8, {})
    assert r.output_chunks == 40 and r.itl.count == 8 * 4
    assert r.output_tokens == (40 if protocol == "openai" else None)  # kserve has no usage report
    assert 0 < r.ttft.p99 <= r.latency.p99 and r.ttft.p50 <= r.latency.p50 <= r.wall_s
    assert r.requests_per_s > 0


def test_load_spread_over_worker_processes_counts_every_request(server_url: str) -> None:
    from kiln.bench.serve_load import run_load_processes

    r, model = run_load_processes(2, server_url, "openai", make_prompts(7, 8), 4, concurrency=3, api_key=KEY)
    assert model == MODEL and (r.num_requests, r.completed, r.failures) == (7, 7, {})
    assert r.output_chunks == 28 and r.output_tokens == 28 and 0 < r.ttft.p50 <= r.latency.p50 <= r.wall_s
    with pytest.raises(KilnError, match="--workers 4 is more than --concurrency 3"):
        run_load_processes(4, server_url, "openai", make_prompts(7, 8), 4, concurrency=3, api_key=KEY)


def test_request_rate_run(server_url: str) -> None:
    r, _ = run_load_sync(server_url, "openai", make_prompts(6, 4), 3, request_rate=200.0, api_key=KEY, seed=3)
    assert r.completed == 6 and r.output_chunks == 18 and r.output_tokens_per_s > 0


def test_failures_are_counted_and_the_body_shown_once(server_url: str) -> None:
    shown: list[str] = []
    r, _ = run_load_sync(server_url, "openai", make_prompts(5, 4), MAX_TOKENS + 1, model=MODEL,
                         concurrency=2, api_key=KEY, log=shown.append)
    assert (r.completed, r.failures) == (0, {"HTTP 400": 5})
    assert r.ttft is None and len(shown) == 1 and f"max_tokens is over {MAX_TOKENS}" in shown[0]

    shown.clear()
    r, _ = run_load_sync(server_url, "kserve", make_prompts(4, 4), 2, model=MODEL, concurrency=4,
                         api_key="wrong", log=shown.append)
    assert r.failures == {"HTTP 401": 4} and len(shown) == 1 and "invalid api key" in shown[0]


def test_an_unknown_model_is_counted_by_its_status(server_url: str) -> None:
    r, _ = run_load_sync(server_url, "kserve", make_prompts(2, 4), 2, model="other", concurrency=1,
                         api_key=KEY, log=lambda _: None)
    assert r.failures == {"HTTP 404": 2}


def test_nothing_listening_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KilnError, match=f"is `kiln serve` running at {url}"):
        run_load_sync(url, "openai", make_prompts(2, 4), 2, concurrency=1)
    with pytest.raises(KilnError, match="--url '127.0.0.1:8000' is invalid"):
        run_load_sync("127.0.0.1:8000", "openai", make_prompts(2, 4), 2, concurrency=1)


def test_cli_writes_json_and_fails_when_every_request_does(server_url: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from kiln.cli import main

    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--url", server_url, "--protocol", "kserve", "--concurrency", "2",
            "--num_requests", "4", "--input_len", "8", "--output_len", "3", "--output_json", str(out)]
    assert main(args + ["--api_key", KEY]) == 0
    data = json.loads(out.read_text())
    assert data["completed"] == 4 and data["model"] == MODEL and data["output_chunks"] == 12
    assert capsys.readouterr().out.startswith(f"kiln bench serve: kserve at {server_url}, model {MODEL}")
    assert main(args + ["--api_key", "wrong", "--model", MODEL]) == 1
    err = capsys.readouterr().err
    assert "invalid api key" in err and "every request failed (HTTP 401: 4)" in err
    assert main(args + ["--api_key", "wrong"]) == 1  # no --model: GET /v1/models must answer
    assert "/v1/models answered HTTP 401" in capsys.readouterr().err
