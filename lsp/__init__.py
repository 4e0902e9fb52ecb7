"""Language server (pygls): inline completions and chat-driven edits. Installed as qgpt_code.lsp."""
