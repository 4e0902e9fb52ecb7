"""The language server with `--server URL`: the same features through a real `qgpt serve` app
(`create_app` under uvicorn, on a free 127.0.0.1 port in this process, with a bearer key), so the tests can
look at the engine behind it. The tiny model here has Code Llama's infilling pieces, so completions go
through the suffix-first infilling prompt on the server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from lsp_helpers import (
    cancel,
    close_document,
    configure,
    execute,
    inline,
    insert,
    open_document,
    send_inline,
    server_command,
    start_client,
    stats,
    stop_client,
    wait_for,
    wait_ready,
)

from qgpt_code.prompts import EditRequest, edit_dialog_within, estimate_tokens, parse_edit_reply

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "test-key"
BASE = {"temperature": 0, "debounceMs": 0, "maxTokens": 16, "otherFiles": 0, "editTemperature": 0,
        "editMaxTokens": 40}
CODE = "def total(prices):\n    result = 0\n    for price in prices:\n        result += \n    return result\n"


class Served:
    """`create_app(engine, settings)` under uvicorn in a thread, until `close()`."""

    def __init__(self, engine, api_key: str = KEY):
        import uvicorn

        from qgpt_code.server.app import create_app
        from qgpt_code.server.settings import ServerSettings

        self.engine = engine
        # IPPROTO_TCP: asyncio disables Nagle only on sockets that say TCP (else each answer waits 40 ms)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(engine, ServerSettings(model_id="tiny", api_key=api_key))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def post(self, route: str, body: dict) -> dict:
        response = httpx.post(self.url + route, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        response.raise_for_status()
        return response.json()

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted + " ")), 0.0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def infill_loaded(tmp_path_factory):
    from builders import hf_llama, train_sentencepiece, write_hf_dir

    from qgpt_code import load_model

    directory = write_hf_dir(hf_llama({"max_position_embeddings": 1024}, seed=0),
                             tmp_path_factory.mktemp("infill_model"), train_sentencepiece(512, infill_pieces=True))
    return load_model(directory, device="cpu", dtype="float32")


def new_engine(loaded):
    from qgpt_code.engine import Engine

    return Engine(loaded, max_batch=2, max_seq_len=1024, cache_bytes=64 << 20)


@pytest.fixture(scope="module")
def served(infill_loaded):
    engine = new_engine(infill_loaded)
    server = Served(engine)
    yield server
    server.close()
    engine.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(served):
    client, _, _ = await start_client(server_command("--server", served.url + "/v1", "--api-key", KEY), BASE)
    ready = await wait_ready(client, timeout=60)
    assert ready["backend"] == f"tiny at {served.url}"
    yield client
    await stop_client(client)


async def in_process_completion(engine, prefix: str, suffix: str, path: str, language: str) -> str:
    """What the in-process backend (lsp/engine_backend.py) suggests, on the engine behind the server."""
    from qgpt_code.lsp.backend import CompletionInput
    from qgpt_code.lsp.engine_backend import EngineBackend
    from qgpt_code.lsp.settings import Settings

    backend = EngineBackend(options=None)
    backend.engine, backend.loaded = engine, engine.loaded
    settings = Settings(temperature=0, max_tokens=16, other_files=0)
    return (await backend.complete(CompletionInput(prefix, suffix, path, language), settings)).text


@pytest.mark.parametrize(("line", "character"), [(3, 18), (2, 4), (4, 0)])
async def test_inline_completion_is_the_in_process_backends(client, served, line, character):
    """One prompt path (issue 18): the server builds the in-process prompt from the /infill fields the
    language server sends (path and language included), so at temperature 0 both give the same text."""
    from qgpt_code.prompts import split_at

    uri = "file:///work/http_shop.py"
    open_document(client, uri, CODE)
    submitted = served.engine.stats().requests_submitted
    result = await inline(client, uri, line, character)
    assert served.engine.stats().requests_submitted == submitted + 1
    prefix, suffix = split_at(CODE, line, character)
    expected = await in_process_completion(served.engine, prefix, suffix, "/work/http_shop.py", "python")
    assert expected.strip(), "the tiny model suggests something here"
    assert [item.insert_text for item in result.items] == [expected]
    record = (await stats(client))["recent"][-1]
    assert record["kind"] == "complete" and record["finish_reason"] in ("stop", "length")
    assert record["prompt_tokens"] > 0
    close_document(client, uri)


def test_the_infill_body_carries_what_the_prompt_is_built_from():
    from qgpt_code.lsp.backend import CompletionInput
    from qgpt_code.lsp.http_backend import infill_body
    from qgpt_code.lsp.settings import Settings
    from qgpt_code.prompts import ContextFile

    request = CompletionInput("def f():\n    ", "\n", "/w/a.py", "python", (ContextFile("/w/b.rs", "fn b() {}", "rust"),))
    body = infill_body(request, Settings(temperature=0, max_tokens=32))
    assert body["input_prefix"] == request.prefix and body["prompt"] == "" and body["input_suffix"] == "\n"
    assert (body["path"], body["language"], body["n_predict"], body["temperature"]) == ("/w/a.py", "python", 32, 0)
    assert body["input_extra"] == [{"filename": "/w/b.rs", "text": "fn b() {}", "language": "rust"}]
    assert "stop" not in body  # a multi-line completion: the server's early stop ends it
    assert infill_body(CompletionInput("f(", ")\n"), Settings())["stop"] == ["\n"]


async def test_ten_rapid_edits_reach_the_server_once(client, served):
    uri = "file:///work/http_rapid.py"
    open_document(client, uri, "def greet(name):\n    message = \n")
    configure(client, **{**BASE, "debounceMs": 400})
    submitted = served.engine.stats().requests_submitted
    answers = []
    for i, char in enumerate("'Hello, '+"):
        insert(client, uri, 2 + i, 1, 14 + i, char)
        answers.append(asyncio.ensure_future(inline(client, uri, 1, 15 + i)))
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*answers)
    assert all(list(r.items) == [] for r in results[:-1])
    assert served.engine.stats().requests_submitted == submitted + 1
    configure(client, **BASE)
    close_document(client, uri)


async def test_cancel_request_cancels_the_generation_on_the_server(client, served):
    uri = "file:///work/http_long.py"
    open_document(client, uri, "def long():\n    ")
    configure(client, **{**BASE, "maxTokens": 400})
    cancelled = served.metric("qgpt_generations_finished_total", reason="cancelled")
    answer = send_inline(client, uri, 1, 4, msg_id="http-cancel")
    assert await asyncio.to_thread(lambda: _until(lambda: served.engine.stats().running == 1, 20))
    cancel(client, "http-cancel")
    with pytest.raises(JsonRpcException) as error:
        await answer
    assert error.value.code == -32800
    # the stream was closed, so the server cancelled the job: nothing runs, and it ended as "cancelled"
    assert await asyncio.to_thread(lambda: _until(lambda: served.engine.stats().running == 0, 10))
    assert await asyncio.to_thread(lambda: _until(
        lambda: served.metric("qgpt_generations_finished_total", reason="cancelled") == cancelled + 1, 10))
    record = (await stats(client))["recent"][-1]
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 400
    configure(client, **BASE)
    close_document(client, uri)


async def test_edit_through_the_server_applies_its_reply(client, served):
    uri = "file:///work/http_edit.py"
    text = "def add(a, b):\n    return a + b\n"
    open_document(client, uri, text)
    request = EditRequest("Add type hints", text[:-1], "", "\n", "/work/http_edit.py", "python")
    dialog = edit_dialog_within(request, estimate_tokens, 3072)
    reply = (await asyncio.to_thread(served.post, "/v1/chat/completions", {
        "messages": dialog, "max_tokens": 40, "temperature": 0, "top_p": 0.95}))["choices"][0]["message"]["content"]
    expected = parse_edit_reply(reply, request.selection, "python")
    assert expected.has_code
    result = await execute(client, "qgpt.editSelection", {"uri": uri, "instruction": "Add type hints", "range": {
        "start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 16}}})
    assert result["applied"] and result["replacement"] == expected.replacement
    [change] = client.applied_edits[-1].edit.document_changes
    assert change.edits[0].new_text == expected.replacement
    close_document(client, uri)


async def test_a_server_that_goes_away_is_reported_once(infill_loaded):
    engine = new_engine(infill_loaded)
    server = Served(engine)
    client, _, _ = await start_client(server_command("--server", server.url, "--api-key", KEY), BASE)
    try:
        await wait_ready(client, timeout=60)
        uri = "file:///work/http_gone.py"
        open_document(client, uri, CODE)
        server.close()
        answers = [await inline(client, uri, 3, 18) for _ in range(4)]
        assert all(list(a.items) == [] for a in answers)
        errors = [m for m in client.messages if m.type == types.MessageType.Error]
        assert len(errors) == 1 and server.url in errors[0].message, [m.message for m in errors]
        assert (await stats(client))["requests"]["failed"] == 4
    finally:
        await stop_client(client)
        engine.close()


async def test_a_wrong_key_is_reported_once_and_a_new_key_from_the_editor_is_used(served):
    client, _, _ = await start_client(server_command("--server", served.url, "--api-key", "wrong"), BASE)
    try:
        current = await wait_for(client, lambda s: s["state"] != "starting", timeout=60, every=0.1)
        assert current["state"] == "failed" and "401" in current["error"]
        errors = [m for m in client.messages if m.type == types.MessageType.Error]
        assert len(errors) == 1 and "401" in errors[0].message
        uri = "file:///work/http_key.py"
        open_document(client, uri, CODE)
        assert list((await inline(client, uri, 3, 18)).items) == []
        configure(client, **{**BASE, "apiKey": KEY})  # the backend settings changed: it restarts
        await wait_ready(client, timeout=60)
        assert (await inline(client, uri, 3, 18)).items
        assert len([m for m in client.messages if m.type == types.MessageType.Error]) == 1
    finally:
        await stop_client(client)


def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
