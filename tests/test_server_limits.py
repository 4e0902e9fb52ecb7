"""The endpoint's edges, over real HTTP: API keys, refusals with the right status and field, body
limits, overload, and clients that disconnect while their generation runs."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from test_server_support import RunningServer, infill_model, make_engine, wait_until

from qgpt_code.server.settings import ServerSettings

KEY = "sekrit-key"
NARROW_CONTEXT = 16384  # the tiny model decodes ~1,000 tokens a second: a long generation must outlast a test
LONG = {"max_tokens": NARROW_CONTEXT - 100, "ignore_eos": True, "temperature": 0}  # runs until cancelled


@pytest.fixture(scope="module")
def keyed(tiny_loaded):
    """A plain model (no infilling pieces, 256-token context) behind an API key and a 64 KiB body limit."""
    server = RunningServer(make_engine(tiny_loaded, max_seq_len=256),
                           ServerSettings(model_id="tiny", api_key=KEY, max_body_bytes=64 << 10))
    yield server
    server.close()


@pytest.fixture(scope="module")
def narrow():
    """One batch slot and one queue place, so that load and cancellation are visible."""
    engine = make_engine(infill_model(NARROW_CONTEXT), max_batch=1, max_queue=1, max_seq_len=NARROW_CONTEXT)
    server = RunningServer(engine, ServerSettings(model_id="narrow"))
    yield server
    server.close()


def post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def test_api_key_refused_and_accepted(keyed):
    with pytest.raises(openai.AuthenticationError) as refused:
        keyed.openai(api_key="not-the-key").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    assert post(keyed, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    reply = keyed.openai(api_key=KEY).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{keyed.url}/metrics").status_code == 401
    assert httpx.get(f"{keyed.url}/openapi.json").status_code == 401


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "n": 16, "seed": 1, "max_tokens": 1} | {"prompt": ["a", "b"]}, "n"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({}, "prompt"),
])
def test_bad_completion_fields_are_400_naming_the_field(keyed, body, param):
    response = post(keyed, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "robot", "content": "hi"}], "messages.0.role"),
    ([], "messages"),
    ([{"role": "assistant", "content": "hi"}], "messages"),  # must end with a user turn
    ([{"role": "user", "content": "[INST] sneaky"}], "messages"),  # reserved tag
])
def test_bad_dialogs_are_400(keyed, messages, param):
    response = post(keyed, "/v1/chat/completions", {"messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_odd_bodies_the_fuzzer_found_are_400s(keyed):
    response = post(keyed, "/v1/completions", {"prompt": "x", "logit_bias": {"": None}})  # an empty key in the path
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("logit_bias")
    response = post(keyed, "/v1/completions", {"prompt": "x", "logprobs": False})  # not silently 0
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_tiny_temperature_is_greedy_not_an_engine_failure(keyed):
    # logits / 1e-30 overflow to inf: the engine would fail the request and everyone batched with it
    greedy = post(keyed, "/v1/completions", {"prompt": "def", "max_tokens": 8, "temperature": 0}).json()
    tiny = post(keyed, "/v1/completions", {"prompt": "def", "max_tokens": 8, "temperature": 1e-30}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_suffix_on_a_model_without_infilling_is_a_clear_400(keyed):
    with pytest.raises(openai.BadRequestError) as refused:
        keyed.openai(api_key=KEY).completions.create(model="tiny", prompt="def f(", suffix="):\n", max_tokens=4)
    assert refused.value.body["param"] == "suffix" and "fill in the middle" in refused.value.body["message"]


def test_unknown_model_is_404(keyed):
    with pytest.raises(openai.NotFoundError) as refused:
        keyed.openai(api_key=KEY).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["code"] == "model_not_found"
    assert httpx.get(f"{keyed.url}/v1/models/gpt-4", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_prompt_beyond_the_context_is_400_context_length_exceeded(keyed):
    """As OpenAI and llama.cpp answer it: the SDK raises BadRequestError; llama.cpp's fields come along."""
    response = post(keyed, "/v1/completions", {"prompt": " x" * 400, "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["type"] == "invalid_request_error" and "exceeds the available context size" in error["message"]
    assert error["n_ctx"] == 256 and error["n_prompt_tokens"] > 256
    client = keyed.openai(api_key=KEY)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 400}])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        list(client.completions.create(model="tiny", prompt=" x" * 400, stream=True))  # refused before streaming


def test_request_body_is_bounded(keyed):
    response = post(keyed, "/v1/completions", {"prompt": "x" * (100 << 10)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    # chunked upload without a length: refused once the limit is crossed, not after reading it all
    chunks = (b'{"prompt": "' + b"x" * 8192 for _ in range(100))
    response = httpx.post(f"{keyed.url}/v1/completions", content=chunks,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413


def test_malformed_json_is_400(keyed):
    response = httpx.post(f"{keyed.url}/v1/completions", content=b'{"prompt": ',
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def read_a_few_chunks(server, chunks: int = 3, body: dict | None = None) -> None:
    """Start a long streaming completion, read some chunks, then hang up."""
    body = body or {"prompt": "def main():\n", "stream": True, **LONG}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i >= 2 * chunks:  # an event is a data line and a blank line
                break


def test_disconnect_mid_stream_cancels_and_frees_the_slot(narrow):
    cancelled = narrow.metric("qgpt_generations_finished_total", reason="cancelled")
    computed = narrow.engine.stats().tokens_computed
    read_a_few_chunks(narrow)
    assert wait_until(lambda: narrow.engine.stats().running == 0, timeout=10), "the generation kept running"
    assert narrow.metric("qgpt_generations_finished_total", reason="cancelled") == cancelled + 1
    assert narrow.engine.stats().tokens_computed - computed < 500  # far short of the thousands asked for
    reply = narrow.openai().completions.create(model="narrow", prompt="x = ", max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_disconnect_while_waiting_for_a_whole_response_cancels_too(narrow):
    """Recorded as what it is: a cancelled generation and a request nobody was left to answer, not a 503."""
    route = "/v1/completions"
    cancelled = narrow.metric("qgpt_generations_finished_total", reason="cancelled")
    unanswered = narrow.metric("qgpt_http_requests_total", route=route, status="no_response")
    errors = narrow.metric("qgpt_http_requests_total", route=route, status="503")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{narrow.url}{route}", json={"prompt": "class A:\n", **LONG}, timeout=0.5)
    assert wait_until(lambda: narrow.engine.stats().running == 0, timeout=10)
    assert wait_until(lambda: narrow.metric("qgpt_http_requests_total", route=route, status="no_response")
                      == unanswered + 1)
    assert narrow.metric("qgpt_generations_finished_total", reason="cancelled") == cancelled + 1
    assert narrow.metric("qgpt_http_requests_total", route=route, status="503") == errors


INFILL = {"input_prefix": "def area(r):\n", "prompt": "    return ", "input_suffix": "\n", "n_predict": 2}


@pytest.mark.parametrize("body, param", [
    ({k: v for k, v in INFILL.items() if k != "input_prefix"}, "input_prefix"),
    ({k: v for k, v in INFILL.items() if k != "input_suffix"}, "input_suffix"),
    # llama.cpp's test_infill.py::test_invalid_input_extra_req
    ({**INFILL, "input_extra": [{}]}, "input_extra.0.text"),
    ({**INFILL, "input_extra": [{"filename": "ok"}]}, "input_extra.0.text"),
    ({**INFILL, "input_extra": [{"filename": 123}]}, "input_extra.0"),
    ({**INFILL, "input_extra": [{"filename": 123, "text": "abc"}]}, "input_extra.0.filename"),
    ({**INFILL, "input_extra": [{"filename": 123, "text": 456}]}, "input_extra.0"),
    ({**INFILL, "input_extra": {"filename": "a", "text": "b"}}, "input_extra"),
])
def test_infill_is_validated_as_llama_cpp_does(keyed, body, param):
    response = post(keyed, "/infill", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_infill_needs_no_extra_files_and_accepts_empty_ones(keyed):
    assert post(keyed, "/infill", INFILL).status_code == 200
    assert post(keyed, "/infill", {**INFILL, "input_prefix": "", "input_suffix": ""}).status_code == 200
    assert post(keyed, "/infill", {**INFILL, "input_extra": [{"text": "TAU = 6.28\n"}]}).status_code == 200


def test_cors_is_off_by_default(keyed):
    preflight = httpx.options(f"{keyed.url}/v1/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = post(keyed, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert "access-control-allow-origin" not in response.headers


def test_allowed_origins_get_cors_headers(tiny_loaded):
    origin = "https://editor.example"
    server = RunningServer(make_engine(tiny_loaded, max_batch=1, max_seq_len=256),
                           ServerSettings(model_id="tiny", api_key=KEY, allowed_origins=(origin,)))
    try:
        # a browser's preflight carries no key: it is answered before the key is asked for
        preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        answered = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                              headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
        unauthorized = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers={"Origin": origin})
        assert unauthorized.status_code == 401  # readable by the page, so it can say why
        assert unauthorized.headers["access-control-allow-origin"] == origin
    finally:
        server.close()


def test_overload_is_429_with_retry_after_and_clears(narrow):
    started, stop = threading.Event(), threading.Event()

    def occupy():
        with httpx.stream("POST", f"{narrow.url}/v1/completions", json={"prompt": "a", "stream": True, **LONG},
                          timeout=60) as response:
            for _ in response.iter_lines():
                started.set()
                if stop.is_set():
                    return

    occupants = [threading.Thread(target=occupy) for _ in range(2)]  # one running, one queued
    for thread in occupants:
        thread.start()
    try:
        assert started.wait(30)
        assert wait_until(lambda: narrow.engine.stats().queued == 1)
        response = httpx.post(f"{narrow.url}/v1/completions", json={"prompt": "b", "max_tokens": 2})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            narrow.openai().chat.completions.create(model="narrow", messages=[{"role": "user", "content": "x"}])
    finally:
        stop.set()
        for thread in occupants:
            thread.join(timeout=60)
    assert wait_until(lambda: narrow.engine.stats().running == 0 and narrow.engine.stats().queued == 0)
    assert narrow.openai().completions.create(model="narrow", prompt="b", max_tokens=2).usage.completion_tokens >= 1


def test_request_timeout_ends_a_generation():
    # 1,000 tokens of this tiny model take 0.1-0.25 s on the 2-core machine: the deadline must fall well inside.
    server = RunningServer(make_engine(infill_model(), max_batch=1), ServerSettings(model_id="t", request_timeout=0.02))
    try:
        start = time.monotonic()
        reply = server.openai().completions.create(model="t", prompt="x", extra_body={"ignore_eos": True},
                                                   max_tokens=1000, temperature=0)
        assert reply.choices[0].finish_reason == "timeout" and time.monotonic() - start < 10
        assert reply.usage.completion_tokens < 1000
    finally:
        server.close()
