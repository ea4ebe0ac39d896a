"""OpenAI's API: GET /v1/models, POST /v1/completions and POST /v1/chat/completions, streamed or not.

A request is checked whole before anything runs: the model name, fields kiln does not implement, each
prompt against the engine's limits (max_input_len, max_seq_len, the KV cache, the vocabulary), and
max_tokens against the room each prompt leaves. Then one engine request is submitted per prompt and
choice (`n`; with a `seed`, choice i uses seed + i) and they run side by side. Without max_tokens a
completion gets 16 tokens (OpenAI's default) and a chat reply all the room its prompt leaves; either
way never more than fits. The answers' shapes are built in openai_format.py.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kiln.config import SamplingParams
from kiln.serve.engine_io import (
    Job,
    ServerState,
    check_with_engine,
    checked_prompt,
    get_state,
    max_tokens_for,
    run_to_end,
    sampling_params,
    sse_response,
)
from kiln.serve.openai_format import Answer, UsageCount
from kiln.serve.protocol import (
    GREEDY_BELOW,
    SEED_MAX,
    TOP_P_MIN,
    ApiError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    sse_docs,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 256  # prompts x n in one request
_FIELDS = {f: f for f in ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop")}

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a bad request: the message names the field and the limit"},
    404: {"model": ErrorResponse, "description": "an unknown model"},
    503: {"model": ErrorResponse, "description": "the engine has stopped"},
}
_ANSWERS = {**_ERRORS, **sse_docs("the answer, or with stream: true server-sent events ending with [DONE]")}

router = APIRouter(tags=["OpenAI"])


@router.get("/v1/models", response_model=ModelList, summary="the served model")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(get_state(request))]}


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS, summary="one model")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    state = get_state(request)
    _check_model(state, model)
    return _card(state)


def _card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kiln",
            "max_model_len": state.llm.config.build.max_seq_len}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ANSWERS,
             summary="complete prompts (text, token ids, or a batch of either)")
async def completions(body: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    _check_common(state, body)
    _refuse(body.echo, "echo", "echo is not supported: the answer holds only the new text")
    _refuse(body.suffix is not None, "suffix", "suffix is not supported: leave it out")
    _refuse(body.best_of not in (None, body.n), "best_of", "best_of is not supported: use n")
    prompts = _completion_prompts(state, body.prompt)
    names = ["prompt"] if len(prompts) == 1 else [f"prompt[{i}]" for i in range(len(prompts))]
    params = [_params(state, body, ids, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "max_tokens",
                      body.logprobs, name) for ids, name in zip(prompts, names)]
    jobs = _jobs(state, prompts, params, body.n, arrival)
    answer = _answer(state, body, False, [len(p) for p in prompts], body.logprobs is not None)
    return await _respond(request, body.stream, answer, jobs)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ANSWERS,
             summary="answer a conversation (the tokenizer's chat template)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    _check_common(state, body)
    _refuse(bool(body.tools), "tools", "tools are not supported: leave them out")
    _refuse(body.tool_choice not in (None, "none"), "tool_choice",
            "tool_choice is not supported: leave it out")
    _refuse(body.response_format not in (None, {"type": "text"}), "response_format",
            "response_format is not supported beyond {'type': 'text'}")
    _refuse(body.top_logprobs is not None and not body.logprobs, "top_logprobs",
            "top_logprobs needs logprobs: true")
    ids = _chat_prompt(state, body.messages)
    newer = body.max_completion_tokens is not None
    requested = body.max_completion_tokens if newer else body.max_tokens
    field = "max_completion_tokens" if newer else "max_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = [_params(state, body, ids, requested, None, field, logprobs, "messages")]
    jobs = _jobs(state, [ids], params, body.n, arrival)
    return await _respond(request, body.stream, _answer(state, body, True, [len(ids)], body.logprobs), jobs)


def _answer(state: ServerState, body: Any, chat: bool, prompt_lens: list[int], logprobs: bool) -> Answer:
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return Answer(chat, state.model_name, state.llm.tokenizer, state.eos_ids(),
                  UsageCount(body.n, prompt_lens), logprobs, include_usage)


async def _respond(request: Request, stream: bool, answer: Answer, jobs: list[Job]) -> Response:
    if stream:
        return sse_response(answer.stream(jobs))
    results = await run_to_end(request, jobs)
    if results is None:
        return Response(status_code=499)  # the client went: nobody reads this
    return JSONResponse(answer.body(results))


# ---- checks and requests --------------------------------------------------------------------------
def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(404, f"model {model!r} is not served here: this server serves {state.model_name!r} "
                       "(GET /v1/models lists it)", "model", "model_not_found")


def _refuse(bad: bool, param: str, message: str) -> None:
    if bad:
        raise ApiError(400, message, param)


def _check_common(state: ServerState, body: Any) -> None:
    _check_model(state, body.model)
    state.check_alive()
    _refuse(body.stream_options is not None and not body.stream, "stream_options",
            "stream_options needs stream: true")
    _refuse(bool(body.logit_bias), "logit_bias", "logit_bias is not supported: leave it out")
    _refuse(body.seed is not None and body.seed + body.n - 1 > SEED_MAX, "seed",
            f"seed {body.seed} + n {body.n} - 1 is over {SEED_MAX}: choose a smaller seed")


def _completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        items, names = [prompt], ["prompt"]
    else:
        items, names = list(prompt), [f"prompt[{i}]" for i in range(len(prompt))]
    if not items:
        raise ApiError(400, "prompt is empty: give a string, token ids, or a list of either", "prompt")
    if len(items) > MAX_CHOICES:
        raise ApiError(400, f"prompt holds {len(items)} prompts, more than the {MAX_CHOICES} a request may "
                       "send: split the batch", "prompt")
    return [checked_prompt(state, _encode(state, item, name), name) for item, name in zip(items, names)]


def _encode(state: ServerState, item: str | list[int], name: str) -> list[int]:
    if isinstance(item, str):
        if not item:
            raise ApiError(400, f"{name} is empty: give at least one character", name)
        return state.llm.encode(item)
    return list(item)


def _chat_prompt(state: ServerState, messages: list[ChatMessage]) -> list[int]:
    tokenizer = state.llm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions with a prompt "
                       "you format yourself", "messages")
    convo = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
             for m in messages]
    for m, turn in zip(messages, convo):
        if m.name:
            turn["name"] = m.name
    try:
        ids = tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja2's TemplateError (a template may refuse roles), or a tokenizer's own
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ApiError(400, f"messages: the chat template refused them ({first})", "messages") from None
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return checked_prompt(state, list(ids), "messages")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def _params(state: ServerState, body: Any, ids: list[int], requested: int | None, default: int | None,
            field: str, logprobs: int | None, prompt_name: str) -> SamplingParams:
    """The engine's parameters for one prompt (a temperature below GREEDY_BELOW is greedy, as in vLLM;
    top_k -1 is off, as in vLLM)."""
    max_tokens = max_tokens_for(state, ids, requested, default, field, prompt_name)
    temperature = 1.0 if body.temperature is None else body.temperature
    params = sampling_params(
        _FIELDS, max_tokens=max_tokens, temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else max(body.top_p, TOP_P_MIN),
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, ignore_eos=body.ignore_eos,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()), logprobs=logprobs,
    )
    check_with_engine(state, ids, params, prompt_name, _FIELDS | {"max_tokens": field})
    return params


def _jobs(state: ServerState, prompts: list[list[int]], params: list[SamplingParams], n: int,
          arrival: float) -> list[Job]:
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n {n} = {len(prompts) * n} choices, more than the "
                       f"{MAX_CHOICES} a request may ask for: lower n or send fewer prompts", "n")
    jobs: list[Job] = []
    for ids, p in zip(prompts, params):
        for i in range(n):
            choice = p if p.seed is None else dataclasses.replace(p, seed=p.seed + i)
            jobs.append(partial(state.generate, ids, choice, arrival))
    state.admit(len(jobs))  # every choice is a request the engine holds
    return jobs
