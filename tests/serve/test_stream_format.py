"""The exact bytes of streamed answers: OpenAI chunks and KServe events against the plain `json.dumps` of
each body in its documented shape, so that the writers' pre-encoded parts can never drift from it.

The unit tests drive `Answer.stream` and KServe's event stream with scripted outputs (no engine); the
last test reads a few streams of the live server and checks that every event is its body re-encoded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from kiln.runtime.async_engine import EngineDead, Output
from kiln.serve.kserve import GenerateRequest, _events
from kiln.serve.openai_format import Answer, UsageCount

from .conftest import MODEL, Server

WORDS = ("the", "of", "and", "to", "in", "is")
EOS = 1
ID, CREATED = "cmpl-test", 1_700_000_000
NAME = 'model "q" é'  # a name that JSON must escape, and a non-ASCII one


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from kiln.bench.synthetic import synthetic_tokenizer

    return synthetic_tokenizer(len(WORDS) + 2, WORDS)  # 0 unknown, 1 end of text, then the words


def tok(word: str) -> int:
    return WORDS.index(word) + 2


def plain(body: dict[str, Any]) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n\n"


def outputs(deltas: list[tuple[str, int]], finish: str = "length", logprobs: bool = False,
            cached: int = 0) -> list[Output]:
    """One request's outputs, one token each: (its new text, its id); the last ends with `finish`."""
    outs, ids, text = [], [], ""
    for k, (delta, token) in enumerate(deltas):
        ids, text = ids + [token], text + delta
        last = k == len(deltas) - 1
        lp = [-0.5 - k] if logprobs else []
        top = [{token: -0.5 - k, tok("is"): float("-inf")}] if logprobs else []
        outs.append(Output(7, [2, 3], delta, [token], lp, top, text, ids, last, finish if last else None,
                           cached))
    return outs


def job(outs: list[Output], fail: Exception | None = None) -> Any:
    async def run() -> AsyncIterator[Output]:
        for out in outs:
            await asyncio.sleep(0)  # as a request waits for each engine step
            yield out
        if fail is not None:
            raise fail

    return run


def writes(stream: AsyncIterator[str]) -> list[str]:
    async def collect() -> list[str]:
        return [w async for w in stream]

    return asyncio.run(collect())


def answer(tokenizer: Any, chat: bool, n: int = 1, logprobs: bool = False, include_usage: bool = False,
           prompt_lens: tuple[int, ...] = (2,)) -> Answer:
    return Answer(chat, NAME, tokenizer, {EOS}, UsageCount(n, list(prompt_lens)), logprobs, include_usage,
                  id=ID, created=CREATED)


def head(kind: str) -> dict[str, Any]:
    return {"id": ID, "object": kind, "created": CREATED, "model": NAME}


def chunk(kind: str, choice: dict[str, Any], include_usage: bool) -> str:
    return plain({**head(kind), "choices": [choice], **({"usage": None} if include_usage else {})})


def usage(kind: str, prompt: int, completion: int, cached: int = 0) -> str:
    return plain({**head(kind), "choices": [], "usage": {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached}}})


DONE = "data: [DONE]\n\n"
TEXTS = [(" the", tok("the")), (' "of"\n', tok("of")), ("", tok("and")), (" ✓\u2028", tok("to"))]


# ---- OpenAI completions ------------------------------------------------------------------------------
def test_completion_chunks_are_the_plain_bodies(tokenizer: Any) -> None:
    got = writes(answer(tokenizer, False).stream([job(outputs(TEXTS))]))
    kind = "text_completion"
    want = [chunk(kind, {"index": 0, "text": t, "logprobs": None, "finish_reason": None}, False)
            for t, _ in TEXTS[:2]]  # the third step gave no text: no event
    want.append(chunk(kind, {"index": 0, "text": TEXTS[3][0], "logprobs": None, "finish_reason": "length"},
                      False) + DONE)
    assert got == want  # the last chunk and [DONE] in one write


def test_completion_with_logprobs_usage_and_an_end_token(tokenizer: Any) -> None:
    steps = [(" the", tok("the")), (" of", tok("of")), ("", EOS)]
    got = "".join(writes(answer(tokenizer, False, logprobs=True, include_usage=True, prompt_lens=(5,))
                         .stream([job(outputs(steps, "stop", logprobs=True, cached=3))])))
    kind = "text_completion"

    def lp(word: str, value: float, offset: int) -> dict[str, Any]:
        return {"tokens": [word], "token_logprobs": [value], "top_logprobs": [{word: value, "is": -9999.0}],
                "text_offset": [offset]}

    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}  # the end token's
    want = [
        chunk(kind, {"index": 0, "text": " the", "logprobs": lp("the", -0.5, 0), "finish_reason": None},
              True),
        chunk(kind, {"index": 0, "text": " of", "logprobs": lp("of", -1.5, 3), "finish_reason": None},
              True),
        chunk(kind, {"index": 0, "text": "", "logprobs": empty, "finish_reason": "stop"}, True),
        usage(kind, 5, 3, cached=3), DONE,
    ]
    assert got == "".join(want)


def test_two_prompts_of_two_choices_each(tokenizer: Any) -> None:
    """Choice i of n=2 over two prompts; chunks of one step go out together, the usage counts each
    prompt once and every choice's tokens."""
    runs = [outputs(TEXTS[:1], "stop"), outputs(TEXTS[:2]), outputs(TEXTS[1:3], "stop"), outputs(TEXTS[3:])]
    ans = answer(tokenizer, False, n=2, include_usage=True, prompt_lens=(2, 4))
    got = writes(ans.stream([job(r) for r in runs]))
    kind = "text_completion"

    def c(i: int, text: str, finish: str | None) -> str:
        return chunk(kind, {"index": i, "text": text, "logprobs": None, "finish_reason": finish}, True)

    step1 = [c(0, " the", "stop"), c(1, " the", None), c(2, ' "of"\n', None), c(3, TEXTS[3][0], "length")]
    step2 = [c(1, ' "of"\n', "length"), c(2, "", "stop"), usage(kind, 6, 1 + 2 + 2 + 1), DONE]
    assert got == ["".join(step1), "".join(step2)]


# ---- OpenAI chat ---------------------------------------------------------------------------------------
def test_chat_chunks_are_the_plain_bodies(tokenizer: Any) -> None:
    ans = answer(tokenizer, True, n=2, include_usage=True)
    got = "".join(writes(ans.stream([job(outputs(TEXTS[:2])), job(outputs(TEXTS[2:], "stop"))])))
    kind = "chat.completion.chunk"

    def c(i: int, delta: dict[str, Any], finish: str | None) -> str:
        return chunk(kind, {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}, True)

    role = {"role": "assistant", "content": ""}
    want = [c(0, role, None), c(1, role, None),
            c(0, {"content": " the"}, None),  # choice 1's first step gave no text and did not end
            c(0, {"content": ' "of"\n'}, "length"), c(1, {"content": TEXTS[3][0]}, "stop"),
            usage(kind, 2, 4), DONE]
    assert got == "".join(want)


def test_chat_logprobs(tokenizer: Any) -> None:
    steps = [(" the", tok("the")), ("", EOS)]
    got = "".join(writes(answer(tokenizer, True, logprobs=True)
                         .stream([job(outputs(steps, "stop", logprobs=True))])))
    kind = "chat.completion.chunk"
    top = [{"token": "the", "logprob": -0.5, "bytes": list(b"the")},
           {"token": "is", "logprob": -9999.0, "bytes": list(b"is")}]
    content = [{"token": "the", "logprob": -0.5, "bytes": list(b"the"), "top_logprobs": top}]
    want = [
        chunk(kind, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}, False),
        chunk(kind, {"index": 0, "delta": {"content": " the"}, "logprobs": {"content": content},
                     "finish_reason": None}, False),
        chunk(kind, {"index": 0, "delta": {}, "logprobs": {"content": []}, "finish_reason": "stop"}, False),
        DONE,
    ]
    assert got == "".join(want)


def test_an_error_mid_stream_is_an_event_then_done(tokenizer: Any) -> None:
    failing = job(outputs(TEXTS[:2])[:1], EngineDead("the engine has stopped: the GPU fell off"))
    got = writes(answer(tokenizer, False).stream([failing]))
    error = {"message": "the engine has stopped: the GPU fell off: restart the server (its log says why it "
             "stopped)", "type": "server_error", "param": None, "code": None}
    first = {"index": 0, "text": " the", "logprobs": None, "finish_reason": None}
    assert "".join(got) == chunk("text_completion", first, False) + plain({"error": error}) + DONE


def test_a_failing_choice_ends_the_stream_after_what_came_first(tokenizer: Any) -> None:
    failing = job(outputs(TEXTS[:2])[:1], RuntimeError("boom"))
    got = "".join(writes(answer(tokenizer, False, n=2).stream([failing, job(outputs(TEXTS))])))
    first = {"index": 0, "text": " the", "logprobs": None, "finish_reason": None}
    error = {"message": "internal error (RuntimeError): a bug in kiln; the server log has the traceback",
             "type": "server_error", "param": None, "code": None}
    assert got == chunk("text_completion", first, False) + plain({"error": error}) + DONE


# ---- KServe --------------------------------------------------------------------------------------------
def kserve_body(text: str, extra: dict[str, Any] | None = None) -> str:
    return plain({"model_name": NAME, "model_version": "1", "text_output": text, **(extra or {})})


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_kserve_events_are_the_plain_bodies(with_logprobs: bool) -> None:
    body = GenerateRequest(text_input="Hi", max_tokens=4, stream=True, return_log_probs=with_logprobs)
    got = writes(_events(NAME, body, job(outputs(TEXTS, logprobs=True))))
    want, cum = [], 0.0
    for k, (text, _) in enumerate(TEXTS):
        cum += -0.5 - k
        if text or with_logprobs or k == len(TEXTS) - 1:
            extra = {"output_log_probs": [-0.5 - k], "cum_log_probs": cum} if with_logprobs else None
            want.append(kserve_body(text, extra))
    assert got == want


def test_kserve_unstreamed_event_and_error() -> None:
    body = GenerateRequest(text_input="Hi", max_tokens=4, stream=False, return_log_probs=True)
    got = writes(_events(NAME, body, job(outputs(TEXTS[:2], logprobs=True))))
    assert got == [kserve_body("Hi" + TEXTS[0][0] + TEXTS[1][0],
                               {"output_log_probs": [-0.5, -1.5], "cum_log_probs": -2.0})]
    body = GenerateRequest(text_input="Hi", max_tokens=4, stream=True)
    got = writes(_events(NAME, body, job(outputs(TEXTS[:2])[:1], EngineDead("gone"))))
    error = "gone: restart the server (its log says why it stopped)"
    assert got == [kserve_body(" the"), plain({"error": error})]


# ---- the live server ------------------------------------------------------------------------------------
SAMPLED = {"stream": True, "temperature": 1.0, "seed": 3}
STREAMS = [
    ("/v1/completions", {"prompt": ["Hi", "The sky"], "n": 2, "max_tokens": 3, "logprobs": 2,
                         "stream_options": {"include_usage": True}, **SAMPLED}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say «oui»"}], "max_tokens": 4,
                              "logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True},
                              **SAMPLED}),
    (f"/v2/models/{MODEL}/generate_stream", {"text_input": "Hi", "max_tokens": 3, "return_log_probs": True,
                                             "stream": True, "top_k": 50, "random_seed": 3}),
]


@pytest.mark.parametrize(("path", "body"), STREAMS, ids=["completions", "chat", "kserve"])
def test_live_events_are_their_bodies_reencoded(server: Server, path: str, body: dict[str, Any]) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        raw = http.post(path, json=body).text
    events = raw.split("\n\n")
    assert events[-1] == "" and len(events) > 3
    for event in events[:-1]:
        assert event.startswith("data: ")
        if event != "data: [DONE]":
            assert plain(json.loads(event[6:])) == event + "\n\n"
