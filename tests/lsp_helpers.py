"""Helpers for the language-server tests (no tests here): a pytest-lsp client that declares inline
completion, starting `python -m qgpt_code.lsp` on a tiny model, and small request wrappers.

The servers are real subprocesses spoken to over stdio; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
from typing import Any

from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

TINY_ENGINE = ["--device", "cpu", "--dtype", "float32", "--cache-bytes", "64M", "--max-batch", "2"]
CONTEXT = 1024  # the edit prompt (system message, fences, instruction) alone is ~340 tokens in a 512-piece vocabulary


def write_tiny_model(directory, sp_proto: bytes):
    """The conftest's tiny llama (random weights, the trained SentencePiece tokenizer) with a 1024-token
    context, written as an HF directory."""
    from builders import hf_llama, write_hf_dir

    return write_hf_dir(hf_llama({"max_position_embeddings": CONTEXT}), directory, sp_proto)


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qgpt_code.lsp", *args]


def tiny_command(model_dir, *args: str) -> list[str]:
    return server_command("--model", str(model_dir), *TINY_ENGINE, *args)


def capabilities(inline: bool = True) -> types.ClientCapabilities:
    """VS Code's capabilities (pytest-lsp's profile), plus inline completion, which the profile lacks."""
    caps = client_capabilities("visual-studio-code")
    if inline:
        caps.text_document.inline_completion = types.InlineCompletionClientCapabilities()
    return caps


async def start_client(command: list[str], init_options: dict | None = None, *, inline: bool = True,
                       env: dict | None = None) -> tuple[LanguageClient, types.InitializeResult, float]:
    """A client connected to a fresh server: (client, initialize result, seconds initialize took).
    The client records `workspace/applyEdit` requests in `client.applied_edits` and says yes to them."""
    client = await ClientServerConfig(server_command=command, server_env=env).start()
    client.applied_edits = []

    @client.feature(types.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: types.ApplyWorkspaceEditParams):
        client.applied_edits.append(params)
        return types.ApplyWorkspaceEditResult(applied=True)

    started = time.monotonic()
    result = await client.initialize_session(types.InitializeParams(
        capabilities=capabilities(inline), initialization_options=init_options or {}))
    return client, result, time.monotonic() - started


async def stop_client(client: LanguageClient) -> None:
    await client.shutdown_session()
    await client.stop()


async def stats(client: LanguageClient) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(command="qgpt.stats"))


async def wait_for(client: LanguageClient, predicate, timeout: float = 120.0, every: float = 0.05) -> dict:
    """Poll qgpt.stats until `predicate(stats)` holds; the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        current = await stats(client)
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; last stats: {current}")
        await asyncio.sleep(every)


async def wait_ready(client: LanguageClient, timeout: float = 180.0) -> dict:
    current = await wait_for(client, lambda s: s["state"] in ("ready", "failed"), timeout, every=0.2)
    assert current["state"] == "ready", current
    return current


def configure(client: LanguageClient, **settings: Any) -> None:
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"qgpt": settings}))


def open_document(client: LanguageClient, uri: str, text: str, language_id: str = "python", version: int = 1) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
        uri=uri, language_id=language_id, version=version, text=text)))


def close_document(client: LanguageClient, uri: str) -> None:
    client.text_document_did_close(types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri)))


def insert(client: LanguageClient, uri: str, version: int, line: int, character: int, text: str) -> None:
    """An incremental change inserting `text` at (line, character)."""
    at = types.Position(line=line, character=character)
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=text)]))


def inline_params(uri: str, line: int, character: int) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line=line, character=character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))


async def inline(client: LanguageClient, uri: str, line: int, character: int) -> types.InlineCompletionList:
    return await client.text_document_inline_completion_async(inline_params(uri, line, character))


def send_inline(client: LanguageClient, uri: str, line: int, character: int, msg_id: str):
    """An inline-completion request with a known id (to cancel it); an awaitable for its answer."""
    return asyncio.ensure_future(client.protocol.send_request_async(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, inline_params(uri, line, character), msg_id=msg_id))


def cancel(client: LanguageClient, msg_id: str) -> None:
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))


def raw_request(client: LanguageClient, method: str, params: Any, msg_id: str):
    """Send a request exactly as given (params as plain JSON, however wrong); an awaitable for the
    response (raises the JSON-RPC error the server answers with)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return asyncio.wrap_future(future)


async def execute(client: LanguageClient, command: str, *arguments: Any):
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(
        command=command, arguments=list(arguments)))


def whole(text: str) -> types.Range:
    """The range of a whole document (for expected-edit checks)."""
    lines = text.split("\n")
    return types.Range(start=types.Position(line=0, character=0),
                       end=types.Position(line=len(lines) - 1, character=len(lines[-1])))


# -- raw JSON-RPC framing, for what a typed client cannot send ---------------------------------------------


def frame(message: dict | bytes) -> bytes:
    """A `Content-Length` frame around a message (a dict as JSON, or bytes as they are)."""
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def pump(stream, into: bytearray) -> None:
    """Copy a pipe into a buffer until it closes (run on a thread)."""
    for chunk in iter(lambda: stream.read1(65536), b""):
        into += chunk
