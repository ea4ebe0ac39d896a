"""Triton's KServe v2 routes, as tensorrtllm_backend's `ensemble` model answers them.

Health (`/v2/health/live`, `/v2/health/ready`), server and model metadata, model readiness, and the
generate extension: POST /v2/models/{name}/generate answers one JSON object; .../generate_stream
answers server-sent events, one per step that gave text (with `"stream": false`, a single event with the
whole text). Both also answer under /v2/models/{name}/versions/1/. The served model also answers to
`ensemble` and `tensorrt_llm_bls`, the names tensorrtllm_backend's clients call.

The request fields are the ensemble's. Choices, where TensorRT-LLM's behaviour had to be matched:
- `exclude_input_in_output` defaults to false as in the tensorrt_llm model: /generate's text_output is
  text_input followed by the new text. Streamed events carry only the new text of their step (a
  streaming TensorRT-LLM response holds only its new tokens), whatever the field says.
- Without top_k and top_p (or with both 0) a request is greedy, as in TensorRT-LLM; top_p 0 means off.
- `bad_words` and `stop_words` take a string or a list of strings, each string one word ("" is none).
  A bad word is tokenized without special tokens and never generated; a stop word ends the text,
  which is cut before it. `end_id` replaces the tokenizer's end-of-sequence token; `pad_id` is accepted
  and unused (kiln's outputs are never padded).
- `return_log_probs` adds `output_log_probs` (one per new token) and `cum_log_probs` (their sum).
Errors are `{"error": "message"}`: 400 for a bad request, 404 for an unknown model, 503 once the
engine has stopped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from kiln import __version__
from kiln.serve.engine_io import (
    ServerState,
    check_with_engine,
    checked_prompt,
    get_state,
    max_tokens_for,
    run_to_end,
    sampling_params,
    sse_response,
    stream_error_message,
)
from kiln.serve.openai_format import LOGPROB_FLOOR, json_text, sse
from kiln.serve.protocol import GREEDY_BELOW, SEED_MAX, SEED_MIN, TOP_P_MIN, ApiError, Text, sse_docs

ALIASES = ("ensemble", "tensorrt_llm_bls")
VERSION = "1"
MAX_WORDS = 1024  # bad words or stop words per request

Words = Text | list[Text] | None


class GenerateRequest(BaseModel):
    """The inputs of tensorrtllm_backend's ensemble (scalars as JSON values)."""

    model_config = ConfigDict(allow_inf_nan=False)

    text_input: Text
    max_tokens: int = Field(ge=1, description="tokens to generate at most")
    bad_words: Words = Field(None, description="word(s) never generated")
    stop_words: Words = Field(None, description="word(s) that end the text; it is cut before them")
    end_id: int | None = Field(None, ge=0, description="the token that ends generation")
    pad_id: int | None = Field(None, ge=0, description="accepted, unused: outputs are not padded")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.0, ge=0, le=1, description="0: off (with top_k 0 too, greedy)")
    temperature: float = Field(1.0, ge=0, le=100)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    random_seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = Field(False, description="on generate_stream: an event per step (else one at the end)")
    exclude_input_in_output: bool = Field(False, description="text_output without text_input")
    return_log_probs: bool = False
    beam_width: int = Field(1, ge=1, description="only 1")
    return_context_logits: bool = Field(False, description="not supported: must be false")
    return_generation_logits: bool = Field(False, description="not supported: must be false")


class GenerateResponse(BaseModel):
    model_name: str
    model_version: str
    text_output: str
    output_log_probs: list[float] | None = None
    cum_log_probs: float | None = None


class KServeError(BaseModel):
    error: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": KServeError, "description": "a bad request"},
    404: {"model": KServeError, "description": "an unknown model or version"},
    503: {"model": KServeError, "description": "the engine has stopped"},
}
_STREAM = sse_docs("server-sent events, a GenerateResponse each")
_FIELDS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
           "repetition_penalty": "repetition_penalty", "stop": "stop_words"}

router = APIRouter(prefix="/v2", tags=["KServe v2"])


@router.get("/health/live", summary="200 while the server runs")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="200 while the engine runs, 503 once it has stopped",
            responses={503: {"model": KServeError}})
async def ready(request: Request) -> Response:
    state = get_state(request)
    if not state.engine.alive:
        return JSONResponse({"error": f"the engine has stopped: {state.engine.error or 'shut down'}"}, 503)
    return JSONResponse({"ready": True})


@router.get("", summary="server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "kiln", "version": __version__, "extensions": ["generate", "generate_stream"]}


@router.get("/models/{name}", responses=_ERRORS, summary="model metadata (the ensemble's inputs and outputs)")
async def model_metadata(name: str, request: Request) -> dict[str, Any]:
    resolve(get_state(request), name)
    return {"name": name, "versions": [VERSION], "platform": "ensemble", "inputs": _INPUTS,
            "outputs": _OUTPUTS}


@router.get("/models/{name}/ready", responses=_ERRORS, summary="200 when the model can take requests")
async def model_ready(name: str, request: Request) -> Response:
    state = get_state(request)
    resolve(state, name)
    state.check_alive()
    return JSONResponse({"name": name, "ready": True})


@router.post("/models/{name}/generate", response_model=GenerateResponse, responses=_ERRORS,
             summary="generate, answering at the end")
async def generate(name: str, body: GenerateRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    resolve(state, name)
    ids, params = _prepare(state, body)
    results = await run_to_end(request, [lambda: state.generate(ids, params, arrival)])
    if results is None:
        return Response(status_code=499)  # the client went
    out, logprobs = results[0].output, results[0].logprobs
    text = out.text if body.exclude_input_in_output else body.text_input + out.text
    return JSONResponse(_answer(name, text, logprobs, sum(logprobs), body.return_log_probs))


@router.post("/models/{name}/generate_stream", response_model=GenerateResponse,
             responses={**_ERRORS, **_STREAM}, summary="generate, streaming server-sent events")
async def generate_stream(name: str, body: GenerateRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    resolve(state, name)
    ids, params = _prepare(state, body)
    return sse_response(_events(name, body, lambda: state.generate(ids, params, arrival)))


# The same under /versions/{version}/ (Triton's long form; the only version is 1).
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata_v(name: str, version: str, request: Request) -> dict[str, Any]:
    resolve(get_state(request), name, version)
    return await model_metadata(name, request)


@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready_v(name: str, version: str, request: Request) -> Response:
    resolve(get_state(request), name, version)
    return await model_ready(name, request)


@router.post("/models/{name}/versions/{version}/generate", include_in_schema=False)
async def generate_v(name: str, version: str, body: GenerateRequest, request: Request) -> Response:
    resolve(get_state(request), name, version)
    return await generate(name, body, request)


@router.post("/models/{name}/versions/{version}/generate_stream", include_in_schema=False)
async def generate_stream_v(name: str, version: str, body: GenerateRequest, request: Request) -> Response:
    resolve(get_state(request), name, version)
    return await generate_stream(name, body, request)


def resolve(state: ServerState, name: str, version: str = VERSION) -> None:
    """404 unless `name` is the served model (or an alias) and `version` is 1."""
    if name != state.model_name and name not in ALIASES:
        raise ApiError(404, f"Request for unknown model: '{name}' is not found (this server serves "
                       f"'{state.model_name}', also as {' and '.join(repr(a) for a in ALIASES)})")
    if version != VERSION:
        raise ApiError(404, f"Request for unknown model: '{name}' version {version} is not found "
                       f"(the only version is {VERSION})")


def _prepare(state: ServerState, body: GenerateRequest) -> tuple[list[int], Any]:
    state.check_alive()
    if body.beam_width != 1:
        raise ApiError(400, f"beam_width {body.beam_width} is not supported: kiln decodes one beam; use 1")
    for flag in ("return_context_logits", "return_generation_logits"):
        if getattr(body, flag):
            raise ApiError(400, f"{flag} is not supported: leave it false")
    if not body.text_input:
        raise ApiError(400, "text_input is empty: give the prompt's text")
    ids = checked_prompt(state, state.llm.encode(body.text_input), "text_input")
    greedy = (body.top_k == 0 and body.top_p == 0) or body.temperature < GREEDY_BELOW
    params = sampling_params(
        _FIELDS, max_tokens=max_tokens_for(state, ids, body.max_tokens, None, "max_tokens", "text_input"),
        temperature=0.0 if greedy else body.temperature, top_k=body.top_k,
        top_p=max(body.top_p, TOP_P_MIN) if body.top_p else 1.0,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.random_seed, end_id=body.end_id,
        stop=tuple(_words(body.stop_words, "stop_words")), logprobs=0 if body.return_log_probs else None,
        bad_token_ids=_bad_token_ids(state, body.bad_words),
    )
    if body.end_id is not None and body.end_id >= state.llm.config.model.vocab_size:
        raise ApiError(400, f"end_id {body.end_id} is outside the vocabulary "
                       f"(0..{state.llm.config.model.vocab_size - 1})")
    check_with_engine(state, ids, params, "text_input", _FIELDS)
    state.admit(1)  # last: a request refused for its content is a 400, not a 429
    return ids, params


def _words(words: Words, name: str) -> list[str]:
    items = [words] if isinstance(words, str) else list(words or [])
    items = [w for w in items if w]
    if len(items) > MAX_WORDS:
        raise ApiError(400, f"{name} has {len(items)} words, more than {MAX_WORDS}: send fewer")
    return items


def _bad_token_ids(state: ServerState, words: Words) -> tuple[tuple[int, ...], ...]:
    tokenizer = state.llm.tokenizer
    encoded = (tuple(tokenizer.encode(w, add_special_tokens=False)) for w in _words(words, "bad_words"))
    return tuple(ids for ids in encoded if ids)


def _answer(name: str, text: str, logprobs: list[float], cum: float, with_logprobs: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": name, "model_version": VERSION, "text_output": text}
    if with_logprobs:
        body.update(_logprob_fields(logprobs, cum))
    return body


def _logprob_fields(logprobs: list[float], cum: float) -> dict[str, Any]:
    return {"output_log_probs": [max(lp, LOGPROB_FLOOR) for lp in logprobs],
            "cum_log_probs": max(cum, LOGPROB_FLOOR * max(len(logprobs), 1))}


class _EventWriter:
    """The event `sse(_answer(...))` of one streamed step, with the part that is the same in every event
    (the model's name and version) encoded once per request."""

    def __init__(self, name: str, with_logprobs: bool):
        self.start = sse(_answer(name, "", [], 0.0, False))[: -len('""}\n\n')]
        self.with_logprobs = with_logprobs

    def event(self, text: str, logprobs: list[float], cum: float) -> str:
        if not self.with_logprobs:
            return f"{self.start}{json_text(text)}}}\n\n"
        return f"{self.start}{json_text(text)},{json_text(_logprob_fields(logprobs, cum))[1:]}\n\n"


async def _events(name: str, body: GenerateRequest, job: Any) -> AsyncIterator[str]:
    cum, text, logprobs = 0.0, "", []
    writer = _EventWriter(name, body.return_log_probs)
    try:
        async with aclosing(job()) as outputs:
            async for out in outputs:
                cum += sum(out.delta_logprobs)
                if not body.stream:  # one event at the end, with everything
                    text, logprobs = text + out.delta, logprobs + out.delta_logprobs
                    if out.finished:
                        whole = text if body.exclude_input_in_output else body.text_input + text
                        yield sse(_answer(name, whole, logprobs, cum, body.return_log_probs))
                elif out.delta or out.finished or body.return_log_probs:
                    yield writer.event(out.delta, out.delta_logprobs, cum)
    except Exception as e:
        yield sse({"error": stream_error_message(e)[1]})


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


_INPUTS = [
    _tensor("text_input", "BYTES", [-1, 1]), _tensor("max_tokens", "INT32", [-1, 1]),
    _tensor("bad_words", "BYTES", [-1, -1]), _tensor("stop_words", "BYTES", [-1, -1]),
    _tensor("end_id", "INT32", [-1, 1]), _tensor("pad_id", "INT32", [-1, 1]),
    _tensor("top_k", "INT32", [-1, 1]), _tensor("top_p", "FP32", [-1, 1]),
    _tensor("temperature", "FP32", [-1, 1]), _tensor("repetition_penalty", "FP32", [-1, 1]),
    _tensor("presence_penalty", "FP32", [-1, 1]), _tensor("frequency_penalty", "FP32", [-1, 1]),
    _tensor("random_seed", "UINT64", [-1, 1]), _tensor("return_log_probs", "BOOL", [-1, 1]),
    _tensor("beam_width", "INT32", [-1, 1]), _tensor("stream", "BOOL", [-1, 1]),
    _tensor("exclude_input_in_output", "BOOL", [-1, 1]),
]
_OUTPUTS = [
    _tensor("text_output", "BYTES", [-1, -1]), _tensor("cum_log_probs", "FP32", [-1, -1]),
    _tensor("output_log_probs", "FP32", [-1, -1, -1]),
]
