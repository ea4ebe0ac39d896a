"""The OpenAI API of `kiln serve`, through the official `openai` client against the live server."""

from __future__ import annotations

import openai
import pytest

from .conftest import API_KEY, MODEL, Server, wait_idle

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_greedy_with_usage(client: openai.OpenAI, server: Server) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == MODEL
    assert choice.text.startswith(" Paris") and choice.finish_reason == "length"
    prompt_len = len(server.engine.llm.encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, 6)
    assert out.usage.total_tokens == prompt_len + 6
    assert out.usage.prompt_tokens_details.cached_tokens >= 0
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert again.choices[0].text == choice.text


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=[1, 504, 3458, 282], temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_chat_answers_and_stops_at_the_end_token(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_completion_tokens=24)
    (choice,) = out.choices
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert "Paris" in choice.message.content and "<|im_end|>" not in choice.message.content
    assert choice.finish_reason == "stop"
    assert out.usage.completion_tokens <= 24


def test_streamed_completion_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and len(texts) > 1
    assert all(c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_sends_the_role_then_content(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5, temperature=0,
        stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["."])
    assert out.choices[0].text == " Paris" and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop="is")
    assert "is" not in out.choices[0].text


def test_n_choices_use_seed_plus_i(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt="My favourite colour is", max_tokens=3, temperature=1.0)
    both = client.completions.create(n=2, seed=7, **args)
    assert [c.index for c in both.choices] == [0, 1]
    first = client.completions.create(seed=7, **args).choices[0].text
    second = client.completions.create(seed=8, **args).choices[0].text
    assert [c.text for c in both.choices] == [first, second]
    assert both.usage.completion_tokens == 6


def test_batch_of_prompts_gives_a_choice_each(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "One, two, three,"], max_tokens=3,
                                    temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    assert texts[0].startswith(" Paris")


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(value)  # greedy: the chosen one is the best
        assert max(top.values()) == pytest.approx(value)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens - (out.choices[0].finish_reason == "stop")
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_client_errors_are_400_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens" and "max_seq_len" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_api_key_is_required(keyed_server: Server) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    good = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=API_KEY, max_retries=0)
    out = good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.choices[0].text.startswith(" Paris")


def test_engine_is_idle_after_the_requests(server: Server) -> None:
    wait_idle(server.engine)


def test_logprob_bytes_join_into_the_text(server: Server) -> None:
    """Tokens that hold part of a UTF-8 character read as U+FFFD, but their bytes are exact."""
    from kiln.serve.openai_format import TokenText

    tokenizer = server.engine.llm.tokenizer
    text = TokenText(tokenizer)
    phrase = "héllo 日本 world"
    ids = tokenizer.encode(phrase, add_special_tokens=False)
    assert any("\ufffd" in text.text(t) for t in ids)
    assert bytes(b for t in ids for b in text.bytes(t)).decode() == phrase
