"""A bound on waiting requests: beyond max_batch_size running + max_queue_size waiting, HTTP 429 at once.

The shared engine is reused behind an app with max_queue_size 1; the count of open requests is set by
hand to put the server at its bound (filling 65 real slots would take minutes on a CPU), and real
requests check that the count goes up and comes back down.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from .conftest import MODEL, Server, run_server, wait_idle


@pytest.fixture(scope="module")
def capped(engine) -> Iterator[Server]:
    from kiln.serve.app import create_app

    app = create_app(engine, MODEL, max_queue_size=1)
    for url in run_server(app):
        yield Server(url, app, engine)


def state(server: Server):
    return server.app.state.kiln


def completion(server: Server, n: int = 1) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "In the beginning", "max_tokens": 2, "n": n, "temperature": 0})


def test_requests_are_counted_while_they_run(capped):
    assert state(capped).open_requests == 0
    r = completion(capped, n=2)
    assert r.status_code == 200, r.text
    assert state(capped).open_requests == 0
    wait_idle(capped.engine)


def test_at_capacity_both_protocols_answer_429(capped):
    st = state(capped)
    room = st.llm.config.build.max_batch_size + 1
    st.open_requests = room
    try:
        r = completion(capped)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "server_overloaded"
        assert "max_queue_size 1" in err["message"] and f"{room} requests" in err["message"]
        r = httpx.post(f"{capped.url}/v2/models/{MODEL}/generate", timeout=60,
                       json={"text_input": "In the beginning", "max_tokens": 2})
        assert r.status_code == 429 and "at capacity" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
    finally:
        st.open_requests = 0


def test_room_for_one_but_not_two(capped):
    st = state(capped)
    st.open_requests = st.llm.config.build.max_batch_size  # one waiting place left
    try:
        assert completion(capped, n=2).status_code == 429  # two choices are two requests
        r = completion(capped, n=1)
        assert r.status_code == 200, r.text
        assert st.open_requests == st.llm.config.build.max_batch_size
    finally:
        st.open_requests = 0
    wait_idle(capped.engine)


def test_the_default_server_has_no_bound_in_tests(server):
    assert state(server).max_queue_size is None
