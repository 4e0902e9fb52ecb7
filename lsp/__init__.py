"""Language server (pygls 2.x, stdio): inline completions and chat-driven edits. Installed as qgpt_code.lsp.

`qgpt lsp` / `python -m qgpt_code.lsp` (command.py) builds the server (server.py) from one module per
feature: inline.py (textDocument/inlineCompletion), completion.py (the textDocument/completion fallback),
edit.py (code actions, qgpt.editSelection), chat.py (qgpt.chat). The model is a Backend (backend.py): the
in-process engine (engine_backend.py) or a running `qgpt serve` (http_backend.py). Nothing here imports
pygls or torch at package import; docs/lsp.md describes the behaviour and docs/editors.md the editors.
"""
