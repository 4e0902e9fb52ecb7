"""Starting the language server: stdout carries only the protocol, a model that cannot load is reported
once, and the command module stays argparse-only."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from lsprotocol import types
from lsp_helpers import (
    TINY_ENGINE,
    configure,
    execute,
    frame,
    inline,
    open_document,
    pump,
    server_command,
    start_client,
    stats,
    stop_client,
    wait_for,
)

# The server, with noise written to stdout in every way while the model loads (after startup).
NOISY_SERVER = """
import os, sys
import qgpt_code.checkpoints as checkpoints

original = checkpoints.load_model

def noisy_load(*args, **kwargs):
    print("noise from print")
    sys.stdout.write("noise from sys.stdout\\n")
    sys.stdout.flush()
    os.write(1, b"noise from fd 1\\n")
    return original(*args, **kwargs)

checkpoints.load_model = noisy_load
from qgpt_code.lsp.command import main
sys.exit(main(sys.argv[1:]))
"""


def parse_frames(data: bytes) -> list[dict]:
    """Every byte must belong to a well-formed `Content-Length` frame holding JSON-RPC."""
    messages, at = [], 0
    while at < len(data):
        end = data.index(b"\r\n\r\n", at)
        headers = dict(line.split(b": ", 1) for line in data[at:end].split(b"\r\n"))
        assert set(headers) <= {b"Content-Length", b"Content-Type"}, data[at:end]
        length = int(headers[b"Content-Length"])
        body = data[end + 4 : end + 4 + length]
        assert len(body) == length, "a frame is cut short"
        message = json.loads(body)
        assert message["jsonrpc"] == "2.0"
        messages.append(message)
        at = end + 4 + length
    return messages


def test_stdout_carries_only_protocol_messages(tiny_hf):
    command = [sys.executable, "-c", NOISY_SERVER, "--model", str(tiny_hf[1]), *TINY_ENGINE]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = bytearray(), bytearray()
    readers = [threading.Thread(target=pump, args=pair, daemon=True) for pair in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()

    def send(message: dict) -> None:
        proc.stdin.write(frame(message))
        proc.stdin.flush()

    try:
        send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"capabilities": {}}})
        send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        deadline, ready, request = time.monotonic() + 120, False, 1
        while not ready and time.monotonic() < deadline:
            send({"jsonrpc": "2.0", "id": request, "method": "workspace/executeCommand",
                  "params": {"command": "qgpt.stats"}})
            time.sleep(0.3)
            request += 1
            ready = b'"state": "ready"' in out or b'"state":"ready"' in out
        assert ready, bytes(err[-2000:])
        send({"jsonrpc": "2.0", "id": "bye", "method": "shutdown"})
        time.sleep(0.5)
        send({"jsonrpc": "2.0", "method": "exit"})
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join(timeout=10)
    messages = parse_frames(bytes(out))
    assert any(m.get("id") == 0 and "capabilities" in m.get("result", {}) for m in messages)
    assert any(m.get("id") == "bye" for m in messages)
    for noise in (b"noise from print", b"noise from sys.stdout", b"noise from fd 1"):
        assert noise in err  # the noise happened, and went to stderr
        assert noise not in out


@pytest.mark.asyncio
async def test_a_model_that_cannot_load_is_reported_once():
    client, _, _ = await start_client(server_command("--model", "/nonexistent/model.gguf", "--device", "cpu"),
                                      {"debounceMs": 0})
    try:
        current = await wait_for(client, lambda s: s["state"] != "starting", timeout=120, every=0.2)
        assert current["state"] == "failed" and "/nonexistent/model.gguf" in current["error"]
        uri = "file:///work/fails.py"
        open_document(client, uri, "def f():\n    \n")
        answers = [await inline(client, uri, 1, 4) for _ in range(5)]
        assert all(list(a.items) == [] for a in answers)  # empty answers, not errors
        configure(client, maxTokens=8)  # settings that do not choose the backend: no restart, no new message
        edit = await execute(client, "qgpt.editSelection", uri, {"start": {"line": 0, "character": 0},
                                                                  "end": {"line": 0, "character": 8}}, "Rename it")
        assert edit["applied"] is False and "not ready" in edit["message"]
        errors = [m for m in client.messages if m.type == types.MessageType.Error]
        assert len(errors) == 1 and "/nonexistent/model.gguf" in errors[0].message
        assert (await stats(client))["requests"]["not_ready"] == 5
    finally:
        await stop_client(client)


def test_the_command_module_imports_only_argparse():
    code = ("import sys, qgpt_code.lsp.command as c, argparse;"
            "p = argparse.ArgumentParser(); s = p.add_subparsers(); c.add_lsp_command(s);"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'pygls', 'lsprotocol', 'httpx')];"
            "assert not heavy, heavy;"
            "args = p.parse_args(['lsp', '--server', 'http://h:1', '--api-key', 'k', '--max-batch', '3']);"
            "assert args.run is c.run_lsp and args.server == 'http://h:1' and args.max_batch == 3")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
