"""The OpenAI request and response bodies, as pydantic models, and the error every route answers with.

They are declared (rather than read from raw JSON) so that FastAPI checks each field before a request
reaches the engine, and so that the OpenAPI schema at /openapi.json documents what the server takes
and answers: clients are generated from it, and the fuzz tests draw their requests from it.

Bounds are the documented OpenAI ones where they exist, and otherwise the range in which the sampler
stays finite (a temperature or a repetition penalty far outside them would overflow float32 logits
into NaN, which no request may do to an engine shared by every client). Limits that depend on the
engine (prompt length, max_tokens) are checked per request in openai_api.py, with both numbers named.
Fields other servers accept and kiln does not implement are declared too, where a value would change
the answer (asking for them gets a clear 400); fields no model here declares (a client's extras) are
accepted and ignored, as vLLM does, so that clients sending a newer API's fields keep working
(docs/trtllm-mapping.md lists which).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from kiln.config import MAX_LOGPROBS

MAX_N = 128  # choices per prompt (OpenAI's own limit)
MAX_STOP = 16  # stop strings per request
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
GREEDY_BELOW = 1e-5  # a lower temperature is greedy (as in vLLM): dividing logits by it would overflow them
TOP_P_MIN = 1e-6  # a smaller top_p is raised to this: in float32 it would round to 0 and mask every token



def _text(value: str) -> str:
    """JSON may escape a lone UTF-16 surrogate, which no tokenizer takes: refused as a field's mistake."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"it holds a lone UTF-16 surrogate at character {e.start}: not text") from None
    return value


Text = Annotated[str, AfterValidator(_text)]
TokenId = Annotated[int, Field(ge=0)]
Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None


def sse_docs(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 200 that may be server-sent events (each event's fields; OpenAPI 3.1)."""
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"},
        "data": {"type": "string", "description": "one JSON object (OpenAI's stream ends with [DONE])"}}}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": event}}}}


class ApiError(Exception):
    """A request the server refuses: the HTTP status, a message saying how to fix it, and the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _Body(BaseModel):
    # NaN and infinities are refused at the door: they would poison the logits of a shared batch.
    model_config = ConfigDict(allow_inf_nan=False)


class _Sampling(_Body):
    """The sampling fields the two OpenAI routes share (with vLLM's extras: top_k, repetition_penalty,
    ignore_eos)."""

    model: str | None = Field(None, description="the served model name (default: the only one served)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description="string(s) that end the text; it is cut before them")
    temperature: float | None = Field(None, ge=0, le=100, description="0 is greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="sample from the k most likely tokens; -1 or 0: off")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="choice i of a prompt uses seed + i")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    user: str | None = None


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class CompletionRequest(_Sampling):
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]] = Field(
        description="text, token ids, or a batch of either (one choice per prompt and n)")
    max_tokens: int | None = Field(None, ge=1, description="default 16 (less where less room is left)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
    echo: bool = Field(False, description="not supported: must be false")
    suffix: str | None = Field(None, description="not supported: must be null")
    best_of: int | None = Field(None, ge=1, description="not supported beyond n")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: all the room the prompt leaves")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens (wins)")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    tool_choice: str | dict[str, Any] | None = Field(None, description="not supported beyond 'none'")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")


# ---- answers ------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape (every route but /v2)."""

    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
