"""Fuzzing every route of the app's OpenAPI schema with schemathesis: whatever a client sends, the answer is
never a 5xx, and it is one the schema documents (status, content type, body).

Requests go to the app in-process (schemathesis's ASGI transport), on the same engine as the live
server. Generation requests are cut down before they are sent (max_tokens and n at most 2, short
prompts, few of them) so that each example costs a step or two of the model: the point is the server's
handling of what it receives, not long generations.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import MODEL, Server, wait_idle

EXAMPLES = 25
REQUEST_TIMEOUT_S = 60  # a 2-core CI machine under load is slow; a hang still fails
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# Every operation of the schema (test_the_schema_has_every_route keeps the list whole).
OPERATIONS = [
    "GET /v1/models", "GET /v1/models/{model}", "POST /v1/completions", "POST /v1/chat/completions",
    "GET /v2/health/live", "GET /v2/health/ready", "GET /v2", "GET /v2/models/{name}",
    "GET /v2/models/{name}/ready",
    "POST /v2/models/{name}/generate", "POST /v2/models/{name}/generate_stream",
    "GET /health", "GET /metrics", "GET /version",
]


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", server.app)


def test_the_schema_has_every_route(api_schema: Any) -> None:
    labels = [result.ok().label for result in api_schema.get_all_operations()]
    assert sorted(labels) == sorted(OPERATIONS)


def cases(operation: Any) -> st.SearchStrategy:
    """Requests that fit the schema (half of them for the served model), and (where the operation takes
    anything) requests that do not."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    names = [p.name for p in operation.path_parameters]
    if names:
        served = {name: MODEL for name in names}
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=served))
    if operation.body or names or operation.query:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    return st.one_of(strategies)


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors(api_schema: Any, label: str) -> None:
    operation = api_schema.find_operation_by_label(label)

    @given(case=cases(operation), tidy=st.booleans())
    # derandomize: the same examples on every run, so a failure in CI is one a developer can replay
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], derandomize=True)  # no shrinking: the curl line is enough
    def run(case: Any, tidy: bool) -> None:
        cut_down(case.body, tidy)
        case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    run()


def cut(value: Any, most: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str | list):
        return value
    if isinstance(value, int):
        return min(value, most)
    return value[:most * 16] if isinstance(value, str) else value[:most]


UNSUPPORTED = ("echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice", "response_format",
               "stream_options", "beam_width", "return_context_logits", "return_generation_logits")


def cut_down(body: Any, tidy: bool) -> None:
    """Keep a generation request cheap. With `tidy`, also name the served model and drop the fields kiln
    refuses, so that more of the requests reach the engine (those refusals have tests of their own)."""
    if not isinstance(body, dict):
        return
    if tidy:
        for key in UNSUPPORTED:
            body.pop(key, None)
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
    if ("prompt" in body or "messages" in body) and "max_tokens" not in body:
        body["max_tokens"] = 2  # a chat reply would otherwise get all the room its prompt leaves
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if isinstance(body.get(key), int | float) and not isinstance(body[key], bool) and body[key] > 2:
            body[key] = 2  # 2.0 too: a whole float passes for an int
    for key in ("prompt", "text_input", "messages"):
        if isinstance(body.get(key), str | list):
            body[key] = cut(body[key], 4)
    if isinstance(body.get("messages"), list):
        for message in body["messages"]:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = message["content"][:64]


def test_engine_is_idle_after_the_fuzzing(server: Server) -> None:
    wait_idle(server.engine)
    assert server.engine.alive
