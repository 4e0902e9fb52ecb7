"""The language server end to end: `python -m qgpt_code.lsp` over stdio, driven by pytest-lsp, with the
tiny model (random weights, a SentencePiece tokenizer trained in the test) in the server's own engine.

One server serves the whole module; each test sets the settings it needs with
workspace/didChangeConfiguration (which exercises that path too). Expected completions are computed in
this process with the same model and prompts/, greedy, and must match what the server sends.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.uris import to_fs_path
from lsp_helpers import (
    cancel,
    close_document,
    configure,
    execute,
    inline,
    insert,
    open_document,
    raw_request,
    send_inline,
    start_client,
    stats,
    stop_client,
    tiny_command,
    wait_for,
    wait_ready,
    write_tiny_model,
)

from qgpt_code.generation import SamplingParams, generate_text
from qgpt_code.prompts import ContextFile, ContextOptions, completion_prompt, edit_tokens, parse_edit_reply
from qgpt_code.prompts.edit import EditRequest

pytestmark = pytest.mark.asyncio(loop_scope="module")

BASE = {"temperature": 0, "debounceMs": 0, "contextBudget": 128, "maxTokens": 16, "otherFiles": 0,
        "editTemperature": 0, "editMaxTokens": 40}
CODE = ("import os\n\n\ndef total(prices, qty):\n    result = 0\n    for price in prices:\n        result += \n"
        "    return result\n")


@pytest.fixture(scope="module")
def lsp_model(tmp_path_factory, sp_proto):
    return write_tiny_model(tmp_path_factory.mktemp("lsp_model"), sp_proto)


@pytest.fixture(scope="module")
def lsp_loaded(lsp_model):
    from qgpt_code import load_model

    return load_model(lsp_model, device="cpu", dtype="float32")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session(lsp_model):
    client, result, seconds = await start_client(tiny_command(lsp_model), BASE)
    # right after initialize: the model is still loading, and a request gets an empty answer, not an error
    open_document(client, "file:///work/early.py", CODE)
    early = await inline(client, "file:///work/early.py", 6, 18)
    early_stats = await stats(client)
    close_document(client, "file:///work/early.py")
    ready = await wait_ready(client)
    yield {"client": client, "init": result, "init_seconds": seconds, "early": early, "early_stats": early_stats,
           "ready": ready}
    await stop_client(client)


@pytest.fixture
def client(session):
    return session["client"]


def settings(**changes):
    return {**BASE, **changes}


def expected_completion(loaded, before: str, after: str, path: str, others=(), max_tokens=16, budget=128):
    """What the server should answer, computed here: the same prompt, greedy, post-processed."""
    max_new = min(max_tokens, loaded.model.args.max_seq_len // 2)
    options = ContextOptions(budget=min(budget, loaded.model.args.max_seq_len - max_new - 1))
    prompt = completion_prompt(loaded.tokenizer, before, after, path=path, language_id="python",
                               other_files=others, options=options)
    params = SamplingParams(max_new_tokens=max_new, temperature=0, top_p=0.95,
                            stop=("\n",) if prompt.single_line else (), stop_ids=prompt.stop_ids)
    return prompt.postprocess(generate_text(loaded, prompt.tokens, params).text)


async def test_initialize_answers_at_once_and_advertises_capabilities(session):
    caps = session["init"].capabilities
    assert caps.inline_completion_provider is not None  # registered with InlineCompletionOptions
    assert caps.completion_provider is not None
    assert caps.code_action_provider is not None
    assert {"qgpt.editSelection", "qgpt.chat", "qgpt.stats"} <= set(caps.execute_command_provider.commands)
    sync = caps.text_document_sync
    assert sync.change == types.TextDocumentSyncKind.Incremental
    assert session["init_seconds"] < 10  # pygls and argparse only; the model loads afterwards
    assert session["early_stats"]["state"] == "starting"
    assert list(session["early"].items) == []
    assert session["early_stats"]["requests"]["not_ready"] == 1


async def test_model_loading_is_reported_as_progress(session, client):
    loading = [reports for reports in client.progress_reports.values()
               if reports and isinstance(reports[0], types.WorkDoneProgressBegin) and reports[0].title == "QGPT"]
    assert loading, client.progress_reports
    reports = loading[0]
    assert isinstance(reports[-1], types.WorkDoneProgressEnd) and reports[-1].message == "ready"
    percentages = [r.percentage for r in reports if isinstance(r, types.WorkDoneProgressReport) and r.percentage]
    assert percentages and percentages[-1] == 100


async def test_inline_completion_matches_the_model(client, lsp_loaded):
    uri, other_uri = "file:///work/shop.py", "file:///work/helpers.py"
    other = "def tax(amount):\n    return amount * 0.2\n"
    open_document(client, other_uri, other)
    open_document(client, uri, CODE)
    configure(client, **settings(otherFiles=1))
    before_stats = await stats(client)
    line, character = 6, 18  # after "result += "
    result = await inline(client, uri, line, character)
    expected = expected_completion(lsp_loaded, CODE[: CODE.index("+= ") + 3], CODE[CODE.index("+= ") + 3:],
                                   to_fs_path(uri), [ContextFile(to_fs_path(other_uri), other, "python")])
    assert expected.strip(), "the tiny model completes this document with something"
    assert [item.insert_text for item in result.items] == [expected]
    assert result.items[0].range is None  # the rest of the line is empty
    after_stats = await stats(client)
    assert after_stats["generations_started"] == before_stats["generations_started"] + 1
    assert after_stats["engine"]["requests_submitted"] == before_stats["engine"]["requests_submitted"] + 1
    assert after_stats["recent"][-1]["kind"] == "complete"
    close_document(client, other_uri)
    close_document(client, uri)


async def test_ten_rapid_edits_start_one_generation(client):
    uri = "file:///work/rapid.py"
    text = "def greet(name):\n    message = \n"
    open_document(client, uri, text)
    configure(client, **settings(debounceMs=400))
    before = await stats(client)
    answers = []
    for i, char in enumerate("'Hello, '"):  # nine keystrokes, each an edit and a request, as an editor sends
        insert(client, uri, 2 + i, 1, 14 + i, char)
        answers.append(asyncio.ensure_future(inline(client, uri, 1, 15 + i)))
        await asyncio.sleep(0.01)
    insert(client, uri, 11, 1, 23, "+")
    answers.append(asyncio.ensure_future(inline(client, uri, 1, 24)))
    results = await asyncio.gather(*answers)
    after = await stats(client)
    assert len(results) == 10
    assert all(list(r.items) == [] for r in results[:-1])  # superseded: answered empty
    assert after["generations_started"] - before["generations_started"] == 1
    assert after["engine"]["requests_submitted"] - before["engine"]["requests_submitted"] == 1
    assert after["requests"]["superseded"] - before["requests"].get("superseded", 0) >= 9
    close_document(client, uri)


LONG_GENERATION = 400  # tokens: outlasts the cancel's round trip by a wide margin (the tiny model is fast)


async def _wait_running(client, started_before: int) -> dict:
    return await wait_for(client, lambda s: s["generations_started"] > started_before and s["engine"]["running"] == 1,
                          timeout=30, every=0.01)


def settled(stats: dict) -> bool:
    """The engine runs nothing and the newest generation record is closed: the engine retires a
    cancelled sequence a moment before the server's reader records how it ended."""
    return stats["engine"]["running"] == 0 and bool(stats["recent"]) and stats["recent"][-1]["finish_reason"] != "running"


async def test_cancel_request_stops_the_generation_in_the_engine(client):
    uri = "file:///work/long.py"
    open_document(client, uri, "def long():\n    ")
    configure(client, **settings(maxTokens=LONG_GENERATION))
    before = await stats(client)
    answer = send_inline(client, uri, 1, 4, msg_id="cancel-me")
    await _wait_running(client, before["generations_started"])
    cancel(client, "cancel-me")
    with pytest.raises(JsonRpcException) as error:
        await answer
    assert error.value.code == -32800  # RequestCancelled
    after = await wait_for(client, settled, timeout=10, every=0.01)
    record = after["recent"][-1]
    assert record["finish_reason"] == "cancelled", record
    assert record["completion_tokens"] < LONG_GENERATION
    assert after["requests"]["cancelled"] >= 1
    close_document(client, uri)


async def test_newer_request_supersedes_a_running_generation(client):
    uri = "file:///work/supersede.py"
    open_document(client, uri, "def long():\n    ")
    configure(client, **settings(maxTokens=LONG_GENERATION))
    before = await stats(client)
    first = send_inline(client, uri, 1, 4, msg_id="first")
    await _wait_running(client, before["generations_started"])
    configure(client, **settings(maxTokens=8))
    started = time.monotonic()
    second = asyncio.ensure_future(inline(client, uri, 1, 4))
    first_result = await first
    superseded_after = time.monotonic() - started
    second_result = await second
    after = await stats(client)
    assert list(first_result.items) == [] and superseded_after < 2  # empty at once, not after the long generation
    records = after["recent"][-2:]
    assert records[0]["finish_reason"] == "cancelled" and records[0]["completion_tokens"] < LONG_GENERATION
    assert records[1]["finish_reason"] in ("stop", "length")
    assert second_result.items, "the newer request is answered"
    close_document(client, uri)


async def test_typing_along_a_suggestion_is_answered_from_the_cache(client):
    uri = "file:///work/along.py"
    text = "def area(width, height):\n    return \n"
    open_document(client, uri, text)
    configure(client, **settings(debounceMs=0))
    first = await inline(client, uri, 1, 11)
    suggestion = first.items[0].insert_text
    assert len(suggestion) >= 3, suggestion
    before = await stats(client)
    insert(client, uri, 2, 1, 11, suggestion[:2])  # the user types the first two characters of it
    started = time.monotonic()
    second = await inline(client, uri, 1, 13)
    seconds = time.monotonic() - started
    after = await stats(client)
    assert [i.insert_text for i in second.items] == [suggestion[2:]]
    assert after["generations_started"] == before["generations_started"]
    assert after["cache_hits"] == before["cache_hits"] + 1
    assert seconds < 1.0
    close_document(client, uri)


async def test_auto_closed_brackets_are_replaced_by_the_item(client):
    uri = "file:///work/brackets.py"
    text = "def show(value):\n    print()\n"
    open_document(client, uri, text)
    configure(client, **settings(debounceMs=0))
    result = await inline(client, uri, 1, 10)  # between the brackets
    assert result.items, "the tiny model suggests something here"
    item = result.items[0]
    assert item.range == types.Range(start=types.Position(line=1, character=10), end=types.Position(line=1, character=11))
    assert item.insert_text.endswith(")") and "\n" not in item.insert_text
    close_document(client, uri)


async def test_completion_fallback_follows_the_client_capabilities(client):
    uri = "file:///work/fallback.py"
    text = "def area(width, height):\n    ret\n"
    open_document(client, uri, text)
    position = types.Position(line=1, character=7)
    params = types.CompletionParams(text_document=types.TextDocumentIdentifier(uri=uri), position=position)
    configure(client, **settings(completionFallback="auto"))
    auto = await client.text_document_completion_async(params)
    assert list(auto.items) == []  # this client has inline completion: no menu entry
    configure(client, **settings(completionFallback="always"))
    always = await client.text_document_completion_async(params)
    assert len(always.items) == 1 and always.is_incomplete
    edit = always.items[0].text_edit
    assert edit.range.start == types.Position(line=1, character=4)  # the word "ret" is replaced...
    assert edit.new_text.startswith("ret") and always.items[0].filter_text == edit.new_text  # ...and kept
    close_document(client, uri)


async def test_edit_command_applies_the_parsed_reply_as_one_edit(client, lsp_loaded):
    uri = "file:///work/edit.py"
    text = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
    open_document(client, uri, text)
    configure(client, **settings())
    span = types.Range(start=types.Position(line=0, character=0), end=types.Position(line=1, character=16))
    selection_end = text.index("b\n") + 1
    request = EditRequest("Add type hints", text[:selection_end], "", text[selection_end:], to_fs_path(uri), "python")
    max_new = 40
    tokens = edit_tokens(lsp_loaded.info, lsp_loaded.tokenizer, request, min(3072, 1024 - max_new - 1))
    reply = generate_text(lsp_loaded, tokens, SamplingParams(max_new_tokens=max_new, temperature=0, top_p=0.95)).text
    expected = parse_edit_reply(reply, request.selection, "python")
    assert expected.has_code, "the tiny model's reply has something that reads as code"
    before = len(client.applied_edits)
    result = await execute(client, "qgpt.editSelection", {"uri": uri, "range": {
        "start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 16}}, "instruction": "Add type hints"})
    assert result["applied"] is True and result["replacement"] == expected.replacement
    assert len(client.applied_edits) == before + 1
    edit = client.applied_edits[-1].edit
    [change] = edit.document_changes  # the client accepts versioned edits: one document, one text edit
    assert change.text_document.uri == uri and change.text_document.version == 1
    [text_edit] = change.edits
    assert text_edit.range == span and text_edit.new_text == expected.replacement
    progress = [r for r in client.progress_reports.values()
                if r and isinstance(r[0], types.WorkDoneProgressBegin) and r[0].title == "QGPT: Add type hints"]
    assert progress and progress[-1][0].cancellable and isinstance(progress[-1][-1], types.WorkDoneProgressEnd)
    close_document(client, uri)


async def test_edit_is_cancelled_from_its_progress(client):
    uri = "file:///work/edit_cancel.py"
    text = "def add(a, b):\n    return a + b\n"
    open_document(client, uri, text)
    configure(client, **settings(editMaxTokens=LONG_GENERATION))
    before = await stats(client)
    command = asyncio.ensure_future(execute(client, "qgpt.editSelection", uri, {
        "start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 16}}, "Rewrite it slowly"))
    await _wait_running(client, before["generations_started"])
    [token] = [t for t, r in client.progress_reports.items()
               if r and isinstance(r[0], types.WorkDoneProgressBegin) and r[0].title == "QGPT: Rewrite it slowly"]
    client.window_work_done_progress_cancel(types.WorkDoneProgressCancelParams(token=token))
    result = await command
    assert result == {"applied": False, "replacement": None, "explanation": "", "message": "cancelled"}
    after = await wait_for(client, settled, timeout=10, every=0.01)
    assert after["recent"][-1]["kind"] == "edit" and after["recent"][-1]["finish_reason"] == "cancelled"
    close_document(client, uri)


async def test_cancel_request_stops_an_edit_command(client):
    uri = "file:///work/edit_cancel_request.py"
    open_document(client, uri, "def add(a, b):\n    return a + b\n")
    configure(client, **settings(editMaxTokens=LONG_GENERATION))
    before = await stats(client)
    answer = asyncio.ensure_future(client.protocol.send_request_async(
        types.WORKSPACE_EXECUTE_COMMAND, types.ExecuteCommandParams(command="qgpt.editSelection", arguments=[{
            "uri": uri, "instruction": "Rewrite it", "range": {"start": {"line": 0, "character": 0},
                                                              "end": {"line": 1, "character": 16}}}]),
        msg_id="edit-cancel-me"))
    await _wait_running(client, before["generations_started"])
    cancel(client, "edit-cancel-me")
    with pytest.raises(JsonRpcException) as error:
        await answer
    assert error.value.code == -32800
    after = await wait_for(client, settled, timeout=10, every=0.01)
    record = after["recent"][-1]
    assert record["kind"] == "edit" and record["finish_reason"] == "cancelled" and record["completion_tokens"] < LONG_GENERATION
    close_document(client, uri)


async def test_code_actions_offer_the_edit_command(client):
    uri = "file:///work/actions.py"
    open_document(client, uri, "def add(a, b):\n    return a + b\n")
    configure(client, **settings(editPresets=["Add type hints"]))
    span = {"start": {"line": 0, "character": 0}, "end": {"line": 1, "character": 16}}
    # raw JSON: lsprotocol's client-side converter reads `(Command | CodeAction)[]` as Commands
    actions = await raw_request(client, "textDocument/codeAction", {
        "textDocument": {"uri": uri}, "range": span, "context": {"diagnostics": []}}, "actions")
    assert [a["title"] for a in actions] == ["QGPT: Edit selection...", "QGPT: Add type hints",
                                             "QGPT: Ask about selection..."]
    assert {a["kind"] for a in actions} == {"refactor.rewrite"}
    ask, preset = actions[0]["command"], actions[1]["command"]
    assert ask["command"] == "qgpt.editSelection" and ask["arguments"] == [{"uri": uri, "range": span}]
    assert preset["arguments"] == [{"uri": uri, "range": span, "instruction": "Add type hints"}]
    empty = await raw_request(client, "textDocument/codeAction", {
        "textDocument": {"uri": uri}, "range": {"start": span["start"], "end": span["start"]},
        "context": {"diagnostics": []}}, "no-actions")
    assert not empty
    quickfix_only = await raw_request(client, "textDocument/codeAction", {
        "textDocument": {"uri": uri}, "range": span, "context": {"diagnostics": [], "only": ["quickfix"]}}, "only")
    assert not quickfix_only
    close_document(client, uri)


async def test_chat_answers_and_shows_the_answer(client):
    uri = "file:///work/chat.py"
    open_document(client, uri, "def add(a, b):\n    return a + b\n")
    configure(client, **settings())
    shown = len(client.messages)
    result = await execute(client, "qgpt.chat", {"question": "What does add do?", "uri": uri})
    assert isinstance(result["answer"], str) and result["message"] == ""
    assert client.messages[shown:] and client.messages[-1].message == (result["answer"] or "(no answer)")
    quiet = await execute(client, "qgpt.chat", {"question": "And now?", "show": False})
    assert isinstance(quiet["answer"], str) and len(client.messages) == shown + 1
    close_document(client, uri)


async def test_malformed_requests_get_errors_and_the_server_keeps_serving(client):
    uri = "file:///work/malformed.py"
    open_document(client, uri, "x = 1\n")
    cases = [
        ("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": "here",
                                           "context": {"triggerKind": 1}}, -32602),
        ("textDocument/inlineCompletion", {"textDocument": {"uri": uri}, "position": {"line": -1, "character": 0},
                                           "context": {"triggerKind": 1}}, -32602),
        ("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///never/opened.py"},
                                           "position": {"line": 0, "character": 0},
                                           "context": {"triggerKind": 1}}, -32602),
        ("workspace/executeCommand", {"command": "qgpt.editSelection", "arguments": [{"uri": uri}]}, -32602),
        ("workspace/executeCommand", {"command": "qgpt.editSelection",
                                      "arguments": [{"uri": uri, "range": "all", "instruction": "x"}]}, -32602),
        ("workspace/executeCommand", {"command": "qgpt.chat", "arguments": [{}]}, -32602),
        ("workspace/executeCommand", {"command": "qgpt.noSuchCommand"}, -32602),
        ("qgpt/noSuchMethod", {}, -32601),
    ]
    for i, (method, params, code) in enumerate(cases):
        with pytest.raises(JsonRpcException) as error:
            await asyncio.wait_for(raw_request(client, method, params, f"bad-{i}"), 10)
        assert error.value.code == code, (method, params, error.value)
    # unreadable JSON (no id to answer): logged, and the connection survives
    client.protocol.writer.write(b"Content-Length: 9\r\n\r\n{not json")
    current = await stats(client)
    assert current["ready"]
    assert (await inline(client, uri, 0, 5)).items is not None
    close_document(client, uri)


async def test_bad_settings_are_reported_once_and_good_ones_apply(client):
    shown = len(client.messages)
    configure(client, **settings(maxTokens="lots", debounceMs=5, noSuchSetting=1))
    current = await stats(client)
    assert current["settings"]["debounce_ms"] == 5 and current["settings"]["max_tokens"] == 16
    warnings = client.messages[shown:]
    assert len(warnings) == 1 and warnings[0].type == types.MessageType.Warning
    assert "maxTokens" in warnings[0].message and "noSuchSetting" in warnings[0].message
