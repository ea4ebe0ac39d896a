"""The Triton / KServe v2 routes of `kiln serve` over raw HTTP (httpx), and GET /metrics."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import API_KEY, MODEL, Server

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def http(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def events(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[6:]) for line in lines]


def test_health_and_metadata(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/health").status_code == 200
    assert http.get("/v2").json()["name"] == "kiln"
    for name in (MODEL, "ensemble", "tensorrt_llm_bls"):
        meta = http.get(f"/v2/models/{name}").json()
        assert meta["name"] == name and meta["versions"] == ["1"]
        assert {"text_input", "max_tokens", "bad_words", "stop_words"} <= {t["name"] for t in meta["inputs"]}
        assert "text_output" in {t["name"] for t in meta["outputs"]}
        assert http.get(f"/v2/models/{name}/ready").status_code == 200
    assert http.get("/v2/models/ensemble/versions/1/ready").status_code == 200
    missing = http.get("/v2/models/llama/ready")
    assert missing.status_code == 404 and "unknown model" in missing.json()["error"]
    assert http.get("/v2/models/ensemble/versions/2").status_code == 404


def test_generate_equals_the_openai_text(http: httpx.Client) -> None:
    openai_text = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
                            ).json()["choices"][0]["text"]
    body = {"text_input": PROMPT, "max_tokens": 6, "bad_words": "", "stop_words": ""}
    out = http.post("/v2/models/ensemble/generate", json=body).json()
    assert out["model_name"] == "ensemble" and out["model_version"] == "1"
    assert out["text_output"] == PROMPT + openai_text  # the input is in the output unless excluded
    out = http.post(f"/v2/models/{MODEL}/generate", json={**body, "exclude_input_in_output": True}).json()
    assert out["text_output"] == openai_text


def test_curl_style_form_content_type_is_read_as_json(http: httpx.Client) -> None:
    body = json.dumps({"text_input": PROMPT, "max_tokens": 2, "exclude_input_in_output": True})
    r = http.post("/v2/models/ensemble/generate", content=body,
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["text_output"].startswith(" Paris")


def test_generate_stream_steps_add_up(http: httpx.Client) -> None:
    body = {"text_input": PROMPT, "max_tokens": 6, "exclude_input_in_output": True, "return_log_probs": True}
    whole = http.post("/v2/models/ensemble/generate", json=body).json()
    with http.stream("POST", "/v2/models/ensemble/generate_stream", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        steps = events(r)
    assert len(steps) == 6 and "".join(s["text_output"] for s in steps) == whole["text_output"]
    assert [lp for s in steps for lp in s["output_log_probs"]] == pytest.approx(whole["output_log_probs"])
    assert steps[-1]["cum_log_probs"] == pytest.approx(whole["cum_log_probs"])
    assert len(whole["output_log_probs"]) == 6 and all(lp <= 0 for lp in whole["output_log_probs"])
    with http.stream("POST", "/v2/models/ensemble/generate_stream", json={**body, "stream": False}) as r:
        (single,) = events(r)
    assert single["text_output"] == whole["text_output"]


def test_bad_words_and_stop_words(http: httpx.Client) -> None:
    body = {"text_input": PROMPT, "max_tokens": 6, "exclude_input_in_output": True}
    banned = http.post("/v2/models/ensemble/generate", json={**body, "bad_words": [" Paris"]}).json()
    assert not banned["text_output"].startswith(" Paris")
    stopped = http.post("/v2/models/ensemble/generate", json={**body, "stop_words": "."}).json()
    assert stopped["text_output"] == " Paris"


def test_end_id_ends_generation(http: httpx.Client, server: Server) -> None:
    period = server.engine.llm.tokenizer.encode(".", add_special_tokens=False)[-1]
    body = {"text_input": PROMPT, "max_tokens": 6, "exclude_input_in_output": True, "end_id": period}
    assert http.post("/v2/models/ensemble/generate", json=body).json()["text_output"] == " Paris"


def test_v2_errors_are_error_strings(http: httpx.Client) -> None:
    r = http.post("/v2/models/ensemble/generate", json={"text_input": PROMPT, "max_tokens": 100_000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]
    r = http.post("/v2/models/gpt/generate", json={"text_input": PROMPT, "max_tokens": 2})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = http.post("/v2/models/ensemble/generate",
                  json={"text_input": PROMPT, "max_tokens": 2, "beam_width": 2})
    assert r.status_code == 400 and "beam_width" in r.json()["error"]


def test_api_key_spares_only_the_health_probes(keyed_server: Server) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/health").status_code == 200
        for path in ("/metrics", "/v2/models/ensemble", "/v1/models", "/openapi.json"):
            r = http.get(path)
            assert r.status_code == 401, path
        assert "API key" in http.get("/v2").json()["error"]
        r = http.get("/v2/models/ensemble", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
        assert http.get("/metrics", headers={"x-api-key": API_KEY}).status_code == 200


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(http.get("/metrics").text)
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no metric {name} {labels}")


def test_metrics_parse_and_move(http: httpx.Client, server: Server) -> None:
    before = {name: metric(http, name) for name in (
        "kiln_prompt_tokens_total", "kiln_generation_tokens_total", "kiln_time_to_first_token_seconds_count",
        "kiln_e2e_request_latency_seconds_count", "kiln_inter_token_latency_seconds_count")}
    length = metric(http, "kiln_requests_total", outcome="length")
    rejected = metric(http, "kiln_requests_total", outcome="rejected")
    http.post("/v2/models/ensemble/generate", json={"text_input": PROMPT, "max_tokens": 3})
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    after = {name: metric(http, name) for name in before}
    prompt_len = len(server.engine.llm.encode(PROMPT))
    assert after["kiln_prompt_tokens_total"] - before["kiln_prompt_tokens_total"] == prompt_len
    assert after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] == 3
    moved = {name.removeprefix("kiln_"): after[name] - before[name] for name in before}
    assert moved["time_to_first_token_seconds_count"] == 1  # one request finished
    assert moved["e2e_request_latency_seconds_count"] == 1
    assert moved["inter_token_latency_seconds_count"] == 2  # between its 3 tokens
    assert metric(http, "kiln_requests_total", outcome="length") == length + 1
    assert metric(http, "kiln_requests_total", outcome="rejected") == rejected + 1
    assert metric(http, "kiln_kv_cache_blocks_total") == server.engine.llm.blocks.num_blocks
    for name in ("kiln_num_requests_waiting", "kiln_num_requests_running", "kiln_kv_cache_blocks_used",
                 "kiln_kv_cache_blocks_free", "kiln_prefix_cache_hit_rate", "kiln_num_preemptions_total",
                 "kiln_generation_tokens_per_second", "kiln_kv_cache_blocks_cached"):
        assert metric(http, name) >= 0
    assert metric(http, "kiln_engine_alive") == 1
