"""Bad requests: each gets a 4xx in its route's error shape whose message names the field (and the limit),
never a 500; and the server keeps serving afterwards."""

from __future__ import annotations

import httpx
import pytest

from .conftest import MAX_INPUT_LEN, MAX_SEQ_LEN, Server

LONG = " ".join(["word"] * (MAX_INPUT_LEN + 10))
C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/v2/models/ensemble/generate"
USER = [{"role": "user", "content": "Hi"}]

# (route, body: dict, or bytes sent as is) -> (status, words the message holds)
CASES = [
    (C, b'{"prompt": "Hi", ', 400, ["not valid JSON"]),
    (C, b"", 400, ["body is empty"]),
    (C, b"[1, 2]", 400, ["JSON object"]),
    (C, {}, 400, ["prompt", "required"]),
    (C, {"prompt": 5}, 400, ["prompt"]),
    (C, {"prompt": "Hi", "max_tokens": "ten"}, 400, ["max_tokens", "integer"]),
    (C, {"prompt": "Hi", "max_tokens": 0}, 400, ["max_tokens", "greater than or equal to 1"]),
    (C, {"prompt": "Hi", "max_tokens": MAX_SEQ_LEN}, 400, ["max_tokens", f"{MAX_SEQ_LEN}", "at most"]),
    (C, {"prompt": LONG, "max_tokens": 2}, 400, ["prompt", "max_input_len", f"{MAX_INPUT_LEN}"]),
    (C, {"prompt": "", "max_tokens": 2}, 400, ["prompt", "empty"]),
    (C, {"prompt": [], "max_tokens": 2}, 400, ["prompt", "empty"]),
    (C, {"prompt": ["Hi", ""], "max_tokens": 2}, 400, ["prompt[1]", "empty"]),
    (C, {"prompt": [[1, 2], [10**9]], "max_tokens": 2}, 400, ["prompt[1]", "vocabulary"]),
    (C, {"prompt": [-1]}, 400, ["prompt"]),
    (C, {"prompt": "Hi", "model": "gpt-4"}, 404, ["gpt-4", "smollm2"]),
    (C, {"prompt": "Hi", "logprobs": 21}, 400, ["logprobs", "20"]),
    (C, {"prompt": "Hi", "logprobs": -1}, 400, ["logprobs"]),
    (C, {"prompt": "Hi", "n": 0}, 400, ["n", "1"]),
    (C, {"prompt": "Hi", "n": 129}, 400, ["n", "128"]),
    (C, {"prompt": ["Hi"] * 3, "n": 100}, 400, ["n", "256"]),
    (C, {"prompt": "Hi", "temperature": -1}, 400, ["temperature", "0"]),
    (C, {"prompt": "Hi", "top_p": 0}, 400, ["top_p"]),
    (C, {"prompt": "Hi", "top_p": 1.5}, 400, ["top_p", "1"]),
    (C, {"prompt": "Hi", "presence_penalty": 3}, 400, ["presence_penalty", "2"]),
    (C, b'{"prompt": "Hi", "temperature": NaN}', 400, ["temperature", "finite"]),
    (C, b'{"prompt": "Hi", "frequency_penalty": -Infinity}', 400, ["frequency_penalty", "finite"]),
    (C, {"prompt": "Hi", "stop": [""]}, 400, ["stop", "non-empty"]),
    (C, {"prompt": "Hi", "stop": 3}, 400, ["stop"]),
    (C, {"prompt": "Hi", "seed": 2**64}, 400, ["seed"]),
    (C, {"prompt": "Hi", "seed": 2**64 - 1, "n": 2}, 400, ["seed", "n"]),
    (C, b'{"prompt": "Hi \\ud9eb"}', 400, ["prompt", "surrogate"]),
    (C, {"prompt": "Hi", "echo": True}, 400, ["echo"]),
    (C, {"prompt": "Hi", "best_of": 3}, 400, ["best_of"]),
    (C, {"prompt": "Hi", "logit_bias": {"1": 5}}, 400, ["logit_bias"]),
    (C, {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400, ["stream_options", "stream"]),
    (CHAT, {"messages": []}, 400, ["messages", "at least 1"]),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, ["messages[0].role"]),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     ["messages[0].content"]),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, ["messages", "max_input_len"]),
    (CHAT, {"messages": USER, "max_completion_tokens": MAX_SEQ_LEN}, 400,
     ["max_completion_tokens", "at most"]),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, ["top_logprobs", "logprobs"]),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, ["tools"]),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, ["response_format"]),
    (GEN, {"max_tokens": 2}, 400, ["text_input", "required"]),
    (GEN, {"text_input": "", "max_tokens": 2}, 400, ["text_input", "empty"]),
    (GEN, {"text_input": LONG, "max_tokens": 2}, 400, ["text_input", "max_input_len"]),
    (GEN, {"text_input": "Hi", "max_tokens": MAX_SEQ_LEN}, 400, ["max_tokens", "at most"]),
    (GEN, {"text_input": "Hi", "max_tokens": 2, "top_k": -1}, 400, ["top_k"]),
    (GEN, {"text_input": "Hi", "max_tokens": 2, "end_id": 10**6}, 400, ["end_id", "vocabulary"]),
    (GEN, {"text_input": "Hi", "max_tokens": 2, "stop_words": [1]}, 400, ["stop_words"]),
    (GEN, {"text_input": "Hi", "max_tokens": 2, "return_generation_logits": True}, 400,
     ["return_generation_logits"]),
    (GEN, b"{", 400, ["not valid JSON"]),
    (GEN, b'{"text_input": "\\udd91", "max_tokens": 2}', 400, ["text_input", "surrogate"]),
    (GEN, b'{"text_input": "Hi", "max_tokens": 2, "bad_words": ["\\udd91"]}', 400,
     ["bad_words", "surrogate"]),
    (GEN, b'\xff\xfe', 400, ["body"]),
    ("/v2/models/llama/generate", {"text_input": "Hi", "max_tokens": 2}, 404, ["llama", "unknown model"]),
    ("/v1/nothing", {}, 404, ["/v1/nothing"]),
]


@pytest.fixture(scope="module")
def http(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("route", "body", "status", "words"), CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}" for i, c in enumerate(CASES)])
def test_bad_request(http: httpx.Client, route: str, body: dict | bytes, status: int,
                     words: list[str]) -> None:
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    message = error if route.startswith("/v2") else error["message"]
    if not route.startswith("/v2"):
        assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_param_names_the_field(http: httpx.Client) -> None:
    r = http.post(C, json={"prompt": "Hi", "max_tokens": MAX_SEQ_LEN})
    assert r.json()["error"]["param"] == "max_tokens"
    r = http.post(CHAT, json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.json()["error"]["param"] == "messages[0].role"


def test_server_still_serves(http: httpx.Client) -> None:
    r = http.post(C, json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


EXTREMES = [
    {"top_p": 1e-300}, {"temperature": 1e-300}, {"temperature": 1e-300, "top_k": 5}, {"temperature": 100},
    {"repetition_penalty": 0.01}, {"repetition_penalty": 100},
    {"presence_penalty": -2, "frequency_penalty": -2}, {"presence_penalty": 2, "frequency_penalty": 2},
    {"top_k": 10**9}, {"seed": -(2**63)}, {"seed": 2**64 - 1},
]


@pytest.mark.parametrize("extreme", EXTREMES, ids=[next(iter(e)) for e in EXTREMES])
def test_extreme_values_in_range_are_served(http: httpx.Client, server: Server, extreme: dict) -> None:
    """The ends of every documented range: answered, and the engine (shared by all clients) survives."""
    r = http.post(C, json={"prompt": "Hi", "max_tokens": 2, "temperature": 1.0, **extreme})
    assert r.status_code == 200, r.text
    kserve = {"text_input": "Hi", "max_tokens": 2, "top_k": 3, **extreme}
    kserve["random_seed"] = kserve.pop("seed", None)
    r = http.post(GEN, json=kserve)
    assert r.status_code == 200, r.text
    assert server.engine.alive


def test_a_bug_is_a_logged_500(http: httpx.Client, monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    from kiln.serve.engine_io import ServerState

    def broken(self: ServerState) -> set[int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ServerState, "eos_ids", broken)
    r = http.post(C, json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in r.json()["error"]["message"]
    assert any("POST /v1/completions failed" in rec.getMessage() for rec in caplog.records)


def test_a_stopped_engine_is_503_but_live() -> None:
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from kiln.serve.app import create_app

    dead = SimpleNamespace(alive=False, error="RuntimeError: the GPU fell off",
                           llm=SimpleNamespace(tokenizer=object()))
    with TestClient(create_app(dead, "m")) as client:
        assert client.get("/v2/health/live").status_code == 200
        for path in ("/health", "/v2/health/ready", "/v2/models/m/ready"):
            r = client.get(path)
            assert r.status_code == 503 and "GPU fell off" in r.text, path
        r = client.post(C, json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        r = client.post(GEN, json={"text_input": "Hi", "max_tokens": 1})
        assert r.status_code == 503 and "restart" in r.json()["error"]
