"""Issue 18's editor case in a real editor, on the default model: headless Neovim 0.12, the cursor on the
empty, indented line of a function body with another function two blank lines below. Accepting the ghost
text fills that body and nothing else, in process and through `qgpt lsp --server` against `qgpt serve`,
which suggest the same text at temperature 0.

Needs Neovim 0.12 (tests/test_lsp_neovim.py says where it comes from) and the default model's wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
from test_lsp_neovim import ITEM_TEXT, NAMESPACE, NVIM, Neovim, documented_config

FILE = "import math\n\n\ndef area_of_circle(radius):\n    \n\n\ndef main():\n    print(area_of_circle(2.0))\n"
LINES = FILE.split("\n")[:-1]
BODY = 4  # the body's line (0-based): "    ", the cursor at its end
OPTIONS = {"maxTokens": 48, "temperature": 0, "debounceMs": 0}


def default_model() -> str | None:
    try:
        from qgpt_code.models import resolve_model_path

        return str(resolve_model_path(None))
    except Exception:
        return None


pytestmark = pytest.mark.skipif(NVIM is None or default_model() is None,
                                reason="needs Neovim 0.12 and the default model (scripts/setup)")


def accept_at_empty_body(tmp_path, command: list[str]) -> tuple[str, list[str], dict]:
    """Open FILE in Neovim with the documented configuration running `command`, go to the end of the body's
    line in insert mode, wait for ghost text and accept it: (suggestion, lines after <Tab>, qgpt.stats)."""
    override = (f"\nvim.lsp.config('qgpt', {{ cmd = vim.json.decode({json.dumps(json.dumps(command))}),"
                f" init_options = vim.json.decode({json.dumps(json.dumps(OPTIONS))}) }})\n")
    tmp_path.mkdir(parents=True, exist_ok=True)
    file = tmp_path / "shapes.py"
    file.write_text(FILE)
    nvim = Neovim(tmp_path, documented_config() + override, file)
    try:
        nvim.until(lambda: nvim.lua("#vim.lsp.get_clients({name = [[qgpt]]})") == 1, 60, "the server did not attach")
        state = ("vim.lsp.get_clients({name = [[qgpt]]})[1]:request_sync([[workspace/executeCommand]], "
                 "{command = [[qgpt.stats]]}, 5000).result")
        nvim.until(lambda: nvim.lua(state)["state"] == "ready", 180, "the model did not load")
        nvim.send(f"{BODY + 1}GA")  # after the body line's indentation, in insert mode
        marks = (f"vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_get_namespaces()[ [[{NAMESPACE}]] ], 0, -1, "
                 "{details = true})")
        nvim.until(lambda: nvim.lua(marks), 180, "no ghost text appeared")
        suggestion = nvim.lua(ITEM_TEXT)
        nvim.send("<Tab>")
        lines = nvim.until(lambda: (lambda got: got if got != LINES else None)(
            nvim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)")), 15, "<Tab> did not insert the suggestion")
        return suggestion, lines, nvim.lua(state)
    finally:
        nvim.close()
        shutil.rmtree(tmp_path / "data", ignore_errors=True)


def assert_fills_the_body_only(suggestion: str, lines: list[str]) -> None:
    assert suggestion.strip() and suggestion.split("\n")[0].strip(), "it begins on the cursor's line"
    added = len(lines) - len(LINES)
    assert lines[:BODY] == LINES[:BODY] and lines[BODY + 1 + added :] == LINES[BODY + 1 :]
    body = lines[BODY : BODY + 1 + added]
    assert body == ("    " + suggestion).split("\n")
    assert body[0].startswith("    ") and not body[0][4:5].isspace(), "no blank first line, no 5-space indent"
    assert all(not line.strip() or line.startswith("    ") for line in body), "every line inside the function"


@pytest.fixture(scope="module")
def served():
    """`qgpt serve` on the default model, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "qgpt_code.cli", "serve", "--port", str(port), "--device", "cpu"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "qgpt serve did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_accepting_at_an_empty_body_fills_it_and_nothing_else_in_both_backends(tmp_path, served):
    in_process, lines, stats = accept_at_empty_body(tmp_path / "local", [sys.executable, "-m", "qgpt_code.lsp"])
    assert_fills_the_body_only(in_process, lines)
    record = next(r for r in reversed(stats["recent"]) if r["kind"] == "complete")
    print(f"in process: {in_process!r}, {record['completion_tokens']} tokens, {record['finish_reason']}")

    remote, lines, _ = accept_at_empty_body(tmp_path / "remote", [sys.executable, "-m", "qgpt_code.lsp",
                                                                   "--server", served])
    assert remote == in_process
    assert_fills_the_body_only(remote, lines)
