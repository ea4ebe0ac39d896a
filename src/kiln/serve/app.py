"""The FastAPI app of `kiln serve`: one AsyncLLM behind the OpenAI and the Triton/KServe v2 protocols.

    app = create_app(AsyncLLM(LLM(engine_dir, tokenizer_dir)), "smollm2", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

The protocols' routes are in openai_api.py and kserve.py; this module assembles them with what
every route shares: the API key check, /health, /metrics, and the error answers. Every client mistake
is answered 4xx in the shape of the route's protocol (OpenAI's `{"error": {...}}`, KServe's
`{"error": "..."}` under /v2) with the field named; FastAPI's 422 for a body that does not fit its
model becomes a 400, and the OpenAPI schema says so. Only a bug in kiln gives a 500 (and is logged).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln import __version__
from kiln.errors import KilnError
from kiln.runtime.async_engine import AsyncLLM, EngineDead
from kiln.serve import kserve, openai_api
from kiln.serve.engine_io import ServerState, get_state
from kiln.serve.metrics import CONTENT_TYPE, Metrics
from kiln.serve.protocol import ApiError, ErrorResponse

log = logging.getLogger("kiln.serve")


def create_app(engine: AsyncLLM, served_model_name: str, api_key: str | None = None,
               max_queue_size: int | None = None) -> FastAPI:
    """The app serving `engine` as `served_model_name`; with `api_key`, every route but the health
    probes wants `Authorization: Bearer KEY`; with `max_queue_size`, requests beyond the engine's
    max_batch_size running plus that many waiting are refused with 429."""
    if not served_model_name:
        raise KilnError("the served model name is empty: give --served_model_name NAME")
    if engine.llm.tokenizer is None:
        raise KilnError("the engine has no tokenizer, and the APIs take and give text: load the LLM with "
                        "tokenizer_dir (--tokenizer_dir)")
    app = FastAPI(title="kiln", version=__version__, summary="OpenAI and KServe v2 APIs of a kiln engine",
                  responses={401: {"model": ErrorResponse, "description": "missing or wrong API key"}})
    app.state.kiln = ServerState(engine, served_model_name, Metrics(engine, served_model_name),
                                 max_queue_size=max_queue_size)
    app.include_router(openai_api.router)
    app.include_router(kserve.router)
    _add_common_routes(app)
    _add_error_handlers(app)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(JsonBodyMiddleware)
    _document_400_not_422(app)
    return app


def _add_common_routes(app: FastAPI) -> None:
    @app.get("/health", summary="200 while the engine runs, 503 once it has stopped",
             responses={503: {"model": ErrorResponse}})
    async def health(request: Request) -> dict[str, str]:
        get_state(request).check_alive()
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version", summary="kiln's version")
    async def version() -> dict[str, str]:
        return {"version": __version__}


# ---- errors ---------------------------------------------------------------------------------------
def error_response(request: Request, status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An error in the shape of the route's protocol: KServe under /v2, OpenAI elsewhere."""
    headers = {"Retry-After": "1"} if status == 429 else None  # at capacity: clients retry after a second
    if request.url.path.startswith("/v2"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _count_rejection(request: Request) -> None:
    if request.method == "POST":
        get_state(request).metrics.rejected()


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    if exc.status < 500:
        _count_rejection(request)
    return error_response(request, exc.status, exc.message, exc.param, exc.code)


async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
    _count_rejection(request)
    return error_response(request, 400, str(exc))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count_rejection(request)
    message, param = describe_validation_errors(exc.errors())
    return error_response(request, 400, message, param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code == 404:
        message = (f"no route {request.method} {request.url.path}: the OpenAI API is under /v1 "
                   "(/v1/models, /v1/completions, /v1/chat/completions), KServe v2 under /v2")
    elif exc.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
    elif exc.status_code == 400 and request.method == "POST":  # FastAPI could not parse the body
        message = f"the body could not be read ({message}): send a JSON object in UTF-8"
        _count_rejection(request)
    return error_response(request, exc.status_code, message)


async def _engine_dead(request: Request, exc: EngineDead) -> JSONResponse:
    return error_response(request, 503, f"{exc}: restart the server (its log says why it stopped)")


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, f"internal error ({type(exc).__name__}): this is a bug in kiln; "
                          "the server log has the traceback")


def _add_error_handlers(app: FastAPI) -> None:
    handlers: list[tuple[type[Exception], Any]] = [
        (ApiError, _api_error), (KilnError, _kiln_error), (RequestValidationError, _validation_error),
        (StarletteHTTPException, _http_error), (EngineDead, _engine_dead), (Exception, _bug),
    ]
    for kind, handler in handlers:
        app.add_exception_handler(kind, handler)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the field, what it must be, what came; and the field's name."""
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        return f"the body is not valid JSON ({reason} at character {loc[-1] if loc else 0})", None
    if not loc and first.get("type") == "missing":
        return "the body is empty: send a JSON object of the request's fields", None
    if not loc:
        got = _shown(first.get("input"))
        return f"the body must be a JSON object of the request's fields, not {got}", None
    same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][: 1] == loc[:1]]
    path = _common_path([[p for p in e["loc"] if p != "body"] for e in same])
    param = _path_text(path)
    more = len({str(e.get("loc")) for e in errors}) - len({str(e.get("loc")) for e in same})
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    if first.get("type") == "missing":
        return f"{param} is required{tail}", param
    if len(same) > 1:  # a union: none of its forms fit
        forms = "; ".join(dict.fromkeys(e["msg"] for e in same))
        return f"{param}: {_shown(first.get('input'))} fits none of the forms it takes ({forms}){tail}", param
    return f"{param}: {first['msg']} (got {_shown(first.get('input'))}){tail}", param


def _common_path(paths: list[list[Any]]) -> list[Any]:
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common


def _path_text(path: list[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- middleware -----------------------------------------------------------------------------------
class JsonBodyMiddleware:
    """Reads every POST body as JSON, whatever its Content-Type: `curl -d '{...}'` (as tensorrtllm_backend's
    docs show it) sends application/x-www-form-urlencoded."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """With an API key, every route but the health probes wants `Authorization: Bearer KEY` (or an
    `api-key` / `x-api-key` header, as Azure-style clients send it)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_key or _is_open(scope["path"]) or self._ok(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = "a wrong API key" if self._given(scope) else "no API key"
        message = (f"{given}: send the header 'Authorization: Bearer KEY' with the key the server was "
                   "started with (--api_key)")
        response = error_response(request, 401, message, code="invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _given(self, scope: Scope) -> list[str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        keys = [headers.get("api-key"), headers.get("x-api-key")]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            keys.append(auth[7:].strip())
        return [k for k in keys if k]

    def _ok(self, scope: Scope) -> bool:
        return any(hmac.compare_digest(k.encode(), self.api_key.encode()) for k in self._given(scope))


def _is_open(path: str) -> bool:
    return path == "/health" or path.startswith("/v2/health/")


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this app answers those mistakes with a 400. (And the
    health probes never answer 401.)"""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path, methods in schema.get("paths", {}).items():
                for op in methods.values():
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"].setdefault("400", {"description": "a bad request"})
                    if _is_open(path):
                        op.get("responses", {}).pop("401", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
