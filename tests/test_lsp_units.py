"""The language server's plain functions: settings, positions, the completion cache, items."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lsprotocol import types

from qgpt_code.lsp.cache import CompletionCache
from qgpt_code.lsp.chat import question_dialog
from qgpt_code.lsp.completion import completion_item
from qgpt_code.lsp.documents import Snapshot, is_auto_closed, offset_at, position_at, rest_of_line
from qgpt_code.lsp.inline import inline_items
from qgpt_code.lsp.settings import Settings, field_docs, parse_settings
from qgpt_code.prompts import estimate_tokens

ROOT = Path(__file__).resolve().parent.parent


# -- settings --------------------------------------------------------------------------------------
def test_settings_accept_camel_and_snake_case_flat_or_in_a_section():
    base = Settings()
    flat, problems = parse_settings({"maxTokens": 32, "debounce_ms": 10, "editPresets": ["Port to Rust"]}, base)
    assert problems == [] and flat.max_tokens == 32 and flat.debounce_ms == 10
    assert flat.edit_presets == ("Port to Rust",)
    nested, problems = parse_settings({"qgpt": {"serverUrl": "http://gpu:8000", "temperature": 1}}, base)
    assert problems == [] and nested.server_url == "http://gpu:8000" and nested.temperature == 1.0
    assert parse_settings(None, flat) == (flat, [])


@pytest.mark.parametrize("data, key", [
    ({"maxTokens": "64"}, "maxTokens"),
    ({"maxTokens": 0}, "maxTokens"),
    ({"maxTokens": 2.5}, "maxTokens"),
    ({"maxTokens": True}, "maxTokens"),
    ({"temperature": -1}, "temperature"),
    ({"completionFallback": "sometimes"}, "completionFallback"),
    ({"editPresets": "Add types"}, "editPresets"),
    ({"editPresets": [""]}, "editPresets"),
    ({"serverUrl": None}, "serverUrl"),
    ({"maxTokenz": 3}, "maxTokenz"),
])
def test_a_bad_setting_is_reported_and_keeps_the_previous_value(data, key):
    base = Settings(max_tokens=20)
    settings, problems = parse_settings({**data, "debounceMs": 7}, base)
    assert len(problems) == 1 and problems[0].startswith(f"{key}: ")
    assert settings.debounce_ms == 7  # the good ones still apply
    assert settings.replace(debounce_ms=base.debounce_ms) == base


def test_settings_that_are_not_an_object_are_refused():
    assert parse_settings([1, 2], Settings())[1] == ["settings must be an object, got list"]


def test_every_setting_is_documented_here_in_the_docs_and_in_the_vscode_extension():
    docs = (ROOT / "docs" / "lsp.md").read_text()
    package = json.loads((ROOT / "editors" / "vscode" / "package.json").read_text())
    properties = package["contributes"]["configuration"]["properties"]
    for name, doc, default in field_docs():
        camel = re.sub(r"_(\w)", lambda m: m.group(1).upper(), name)
        assert doc, f"{name} has no docstring"
        assert f"`{camel}`" in docs, f"docs/lsp.md does not list {camel}"
        entry = properties.get(f"qgpt.{camel}")
        assert entry is not None, f"package.json lacks qgpt.{camel}"
        expected = list(default) if isinstance(default, tuple) else default
        assert entry["default"] == expected, camel


# -- positions -------------------------------------------------------------------------------------
TEXT = "a😀b\n名前 = 1\r\nx\n"


@pytest.mark.parametrize("encoding, line, character, offset", [
    ("utf-16", 0, 1, 1), ("utf-16", 0, 2, 1), ("utf-16", 0, 3, 2),  # the emoji is 2 UTF-16 units
    ("utf-8", 0, 1, 1), ("utf-8", 0, 3, 1), ("utf-8", 0, 5, 2),  # ...and 4 UTF-8 bytes
    ("utf-32", 0, 2, 2),
    ("utf-8", 1, 3, 5), ("utf-16", 1, 1, 5),  # 名 is 3 bytes, 1 UTF-16 unit
    ("utf-16", 1, 99, 10), ("utf-16", 2, 1, 13),  # past the end of a line: its end (before \r\n)
    ("utf-16", 3, 0, 14), ("utf-16", 9, 9, 14),  # past the last line: the end of the document
])
def test_offsets_follow_the_negotiated_encoding(encoding, line, character, offset):
    assert offset_at(TEXT, types.Position(line=line, character=character), encoding) == offset


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_positions_round_trip_through_offsets(encoding):
    for offset in range(len(TEXT) + 1):
        if TEXT[offset - 1 : offset + 1] == "\r\n":
            continue  # between \r and \n is not a position
        position = position_at(TEXT, offset, encoding)
        assert offset_at(TEXT, position, encoding) == offset, (offset, position)


def test_offsets_at_the_end_of_a_last_line_without_a_break():
    text = "ab\ncd"
    assert offset_at(text, types.Position(line=1, character=2)) == 5
    assert offset_at(text, types.Position(line=1, character=7)) == 5  # pygls' own converter says 4
    assert position_at(text, 5) == types.Position(line=1, character=2)


@pytest.mark.parametrize("rest, closed", [
    (")", True), ("])", True), ('")', True), ("};", True), ("  ) ", True), ("'", True),
    ("", False), ("   ", False), ("x)", False), (") + 1", False), (";", False),
])
def test_auto_closed_rest_of_line(rest, closed):
    assert is_auto_closed(rest) is closed


def snapshot(before: str, after: str, encoding: str = "utf-16") -> Snapshot:
    return Snapshot("file:///a.py", before + after, len(before), 1, "/a.py", "python", encoding)


def test_an_item_replaces_auto_closed_brackets_to_the_end_of_the_line():
    snap = snapshot("x = [\n    print(f'😀", "')\ny = 1\n")
    [item] = inline_items(snap, "{name}")
    assert item.insert_text == "{name}')"
    assert item.range == types.Range(start=types.Position(line=1, character=14), end=types.Position(line=1, character=16))
    [item8] = inline_items(snapshot(snap.before, snap.after, "utf-8"), "{name}")
    assert item8.range.start.character == 16  # the emoji is 4 bytes in UTF-8


def test_items_elsewhere_insert_at_the_cursor():
    assert inline_items(snapshot("def f(", "x)"), "a, ") == [types.InlineCompletionItem(insert_text="a, ")]
    [multi] = inline_items(snapshot("def f():\n    ", ""), "return 1\n")
    assert multi.range is None
    assert inline_items(snapshot("x = ", ")"), "  \n") == []
    assert rest_of_line("abc\r\ndef") == "abc"


def test_a_completion_item_replaces_the_word_before_the_cursor():
    item = completion_item(snapshot("    ret", "\n"), "urn total\n")
    assert item.label == "return total" and item.filter_text == "return total\n"
    assert item.text_edit.range == types.Range(start=types.Position(line=0, character=4),
                                               end=types.Position(line=0, character=7))
    assert completion_item(snapshot("x", ""), "   ") is None


# -- the completion cache ---------------------------------------------------------------------------
def test_typing_along_a_cached_completion():
    cache = CompletionCache(4)
    cache.store("a", "def ", "\n", "area(w, h):")
    assert cache.lookup("a", "def ar", "\n") == "ea(w, h):"
    assert cache.lookup("a", "def ", "\n") == "area(w, h):"
    assert cache.lookup("a", "def area(w, h):", "\n") is None  # all of it typed: nothing left to offer
    assert cache.lookup("a", "def ax", "\n") is None  # typed something else
    assert cache.lookup("a", "def ar", ")\n") is None  # the text after the cursor changed
    assert cache.lookup("b", "def ar", "\n") is None  # another document
    assert cache.lookup("a", "xef ar", "\n") is None  # the text before changed
    assert cache.hits == 2
    cache.forget("a")
    assert cache.lookup("a", "def ar", "\n") is None


def test_the_cache_keeps_only_the_newest_entries():
    cache = CompletionCache(2)
    for i in range(3):
        cache.store("a", f"x{i} = ", "", f"{i}{i}")
    assert cache.lookup("a", "x0 = ", "") is None and cache.lookup("a", "x2 = ", "") == "22"
    cache.resize(0)
    cache.store("a", "y = ", "", "1 + 1")
    assert cache.lookup("a", "y = ", "") is None


# -- chat prompts -----------------------------------------------------------------------------------
def test_a_question_quotes_as_much_of_the_file_as_fits():
    code = "".join(f"line_{i} = {i}  # ``` fence\n" for i in range(400))
    dialog = question_dialog("What is this?", code, "/a.py", "python", estimate_tokens, 500, selected=False)
    user = dialog[1]["content"]
    assert user.startswith("File: /a.py (python)\n\nThe file:\n````python\nline_0 = 0")
    assert user.endswith("Question: What is this?")
    assert sum(estimate_tokens(m["content"]) for m in dialog) <= 500
    assert "line_399" not in user
    alone = question_dialog("Why?", "", "", "", estimate_tokens, 500, selected=False)
    assert alone[1]["content"] == "Question: Why?"
