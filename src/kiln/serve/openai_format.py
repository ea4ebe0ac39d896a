"""The bodies the OpenAI routes answer with: responses, stream chunks, usage and log probabilities.

Kept apart from the routes (openai_api.py) so that the shapes, which clients parse field by field,
are in one place. Token strings in log probabilities are each token decoded alone (as vLLM shows
them: a token that holds part of a UTF-8 character reads as U+FFFD), and `bytes` are the token's
exact bytes, so that a client can join them into the text. A log probability of -inf (a token the
sampler could not pick) is written as -9999.0: JSON has no infinity.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.async_engine import Output
from kiln.serve.engine_io import Job, Result, merge, stream_error_message

LOGPROB_FLOOR = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# How every body and event is written: compact, UTF-8 as is, no NaN or infinity (JSON has none).
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_text(value: Any) -> str:
    """`value` as the bodies and events write it (the same text as inside a larger body)."""
    return _JSON.encode(value)


def sse(data: dict[str, Any]) -> str:
    return f"data: {_JSON.encode(data)}\n\n"


DONE = "data: [DONE]\n\n"
_FINISH = {None: "null", "stop": '"stop"', "length": '"length"'}  # finish_reason() as JSON


class ChunkWriter:
    """The server-sent event of one stream chunk of one answer, written as `sse` writes the whole chunk
    (`{"id", "object", "created", "model", "choices": [{"index", "text" or "delta", "logprobs",
    "finish_reason"}]}`, then `"usage": null` when the usage comes last), but with the part that is the
    same in every chunk encoded once per request: a server sends thousands of these a second."""

    def __init__(self, head: dict[str, Any], chat: bool, include_usage: bool):
        self.chat = chat
        self.start = f'data: {_JSON.encode(head)[:-1]},"choices":[{{"index":'
        self.end = '}]' + (',"usage":null' if include_usage else "") + "}\n\n"

    def chunk(self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> str:
        if self.chat:
            body = f',"delta":{{"content":{_JSON.encode(text)}}}' if text else ',"delta":{}'
        else:
            body = f',"text":{_JSON.encode(text)}'
        lp = "null" if logprobs is None else _JSON.encode(logprobs)
        return f'{self.start}{index}{body},"logprobs":{lp},"finish_reason":{_FINISH[finish]}{self.end}'

    def role(self, index: int) -> str:
        """A chat choice's first chunk: its role, and no text yet."""
        return (f'{self.start}{index},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                f'"finish_reason":null{self.end}')


def finish_reason(out: Output) -> str | None:
    if not out.finished:
        return None
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


def visible_tokens(out: Output, eos_ids: Container[int], n: int) -> int:
    """How many of the last `n` new tokens to report: all but an end-of-sequence token that ended the
    request (its text is not in the answer either)."""
    if out.finished and out.finish_reason == "stop" and n and out.output_ids[-1] in eos_ids:
        return n - 1
    return n


class TokenText:
    """A token's text and exact bytes, for log probabilities."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._unbyte = _byte_decoder() if self.byte_level else {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token])
        return self._text[token]

    def bytes(self, token: int) -> list[int]:
        if token not in self._bytes:
            self._bytes[token] = list(self._raw(token))
        return self._bytes[token]

    def _raw(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return self.text(token).encode()
        if self.byte_level and all(c in self._unbyte for c in piece):
            return bytes(self._unbyte[c] for c in piece)
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:  # SentencePiece byte fallback
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, reversed."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _lp(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


@dataclass
class CompletionLogprobs:
    """Completions' log probabilities, built up chunk by chunk (text offsets continue across chunks)."""

    text: TokenText
    offset: int = 0
    body: dict[str, list[Any]] = field(default_factory=lambda: {"tokens": [], "token_logprobs": [],
                                                                "top_logprobs": [], "text_offset": []})

    def add(self, ids: list[int], logprobs: list[float],
            tops: list[dict[int, float]]) -> dict[str, list[Any]]:
        """Append these tokens; returns just their part (a stream chunk's logprobs)."""
        part: dict[str, list[Any]] = {key: [] for key in self.body}
        for i, token in enumerate(ids):
            s = self.text.text(token)
            part["tokens"].append(s)
            part["token_logprobs"].append(_lp(logprobs[i]) if i < len(logprobs) else LOGPROB_FLOOR)
            top = tops[i] if i < len(tops) else {}
            part["top_logprobs"].append({self.text.text(t): _lp(v) for t, v in top.items()})
            part["text_offset"].append(self.offset)
            self.offset += len(s)
        for key, values in part.items():
            self.body[key] += values
        return part


def chat_logprobs(text: TokenText, ids: list[int], logprobs: list[float],
                  tops: list[dict[int, float]]) -> list[dict[str, Any]]:
    content = []
    for i, token in enumerate(ids):
        top = tops[i] if i < len(tops) else {}
        content.append({
            "token": text.text(token), "logprob": _lp(logprobs[i]) if i < len(logprobs) else LOGPROB_FLOOR,
            "bytes": text.bytes(token),
            "top_logprobs": [{"token": text.text(t), "logprob": _lp(v), "bytes": text.bytes(t)}
                             for t, v in top.items()],
        })
    return content


@dataclass
class UsageCount:
    """Token counts of a request: each prompt once (whatever n), every choice's output."""

    n: int
    prompt_lens: list[int]
    completion: dict[int, int] = field(default_factory=dict)  # choice -> tokens so far
    cached: dict[int, int] = field(default_factory=dict)  # prompt -> its first choice's cache hits

    def update(self, choice: int, out: Output) -> None:
        self.completion[choice] = len(out.output_ids)
        if choice % self.n == 0:
            self.cached[choice // self.n] = out.cached_tokens

    def body(self) -> dict[str, Any]:
        prompt, completion = sum(self.prompt_lens), sum(self.completion.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached.values())}}


@dataclass
class Answer:
    """The answer to one request, whole or as a stream: a completion's, or (`chat`) a chat's."""

    chat: bool
    model: str
    tokenizer: Any
    eos_ids: Container[int]
    usage: UsageCount
    logprobs: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.text = TokenText(self.tokenizer)
        self.kind = "chat.completion" if self.chat else "text_completion"

    def head(self, kind: str, **rest: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **rest}

    def body(self, results: list[Result]) -> dict[str, Any]:
        choices = [self._choice(i, r) for i, r in enumerate(results)]
        return self.head(self.kind, choices=choices, usage=self.usage.body())

    def _choice(self, i: int, r: Result) -> dict[str, Any]:
        out = r.output
        self.usage.update(i, out)
        keep = visible_tokens(out, self.eos_ids, len(out.output_ids))
        lp = self._logprobs(CompletionLogprobs(self.text), out.output_ids[:keep], r.logprobs[:keep],
                            r.top_logprobs[:keep])
        if self.chat:
            message = {"role": "assistant", "content": out.text}
            return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish_reason(out)}
        return {"index": i, "text": out.text, "logprobs": lp, "finish_reason": finish_reason(out)}

    def _logprobs(self, done: CompletionLogprobs, ids: list[int], lps: list[float],
                  tops: list[dict[int, float]]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": chat_logprobs(self.text, ids, lps, tops)}
        return done.add(ids, lps, tops)

    async def stream(self, jobs: list[Job]) -> AsyncIterator[str]:
        """Server-sent events: (for a chat, each choice's role first, at once), a chunk per step that gave
        text, the finish reason on each choice's last, the usage if asked, then [DONE]. An error after
        the first event is told in an event of its own (the status is already sent), as vLLM does.
        Events that are ready together (the choices of one step; the last chunk, the usage and [DONE])
        go out in one write."""
        kind = f"{self.kind}.chunk" if self.chat else self.kind
        writer = ChunkWriter(self.head(kind), self.chat, self.include_usage)
        done = [CompletionLogprobs(self.text) for _ in jobs]
        left, ended = len(jobs), False
        try:
            if self.chat:
                yield "".join(writer.role(i) for i in range(len(jobs)))
            async for ready in merge(jobs):
                text = ""
                for i, out in ready:
                    text += self._chunk(writer, done[i], i, out)
                    if out.finished:
                        left -= 1
                if not left:  # every choice has ended: the stream's end goes in the same write
                    text += self._end(kind)
                    ended = True
                if text:
                    yield text
            if not ended:
                yield self._end(kind)
        except Exception as e:
            status, message = stream_error_message(e)
            if not ended:  # (after [DONE], nothing more is sent)
                kind = "invalid_request_error" if status < 500 else "server_error"
                yield sse({"error": {"message": message, "type": kind, "param": None, "code": None}}) + DONE

    def _chunk(self, writer: ChunkWriter, done: CompletionLogprobs, i: int, out: Output) -> str:
        """The event of one choice's output ("" when it has nothing to tell)."""
        self.usage.update(i, out)
        lp = None
        if self.logprobs:
            keep = visible_tokens(out, self.eos_ids, len(out.delta_ids))
            lp = self._logprobs(done, out.delta_ids[:keep], out.delta_logprobs[:keep],
                                out.delta_top_logprobs[:keep])
        if out.delta or out.finished or lp is not None:
            return writer.chunk(i, out.delta, lp, finish_reason(out))
        return ""

    def _end(self, kind: str) -> str:
        usage = sse(self.head(kind, choices=[], usage=self.usage.body())) if self.include_usage else ""
        return usage + DONE

