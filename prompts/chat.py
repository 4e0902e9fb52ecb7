"""One entry for chat prompts: Llama 2 `[INST]` dialogs or the model's own chat template."""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from qgpt_code.prompts.chat_template import ChatTemplateError, template_tokens
from qgpt_code.prompts.dialog import Dialog, checked_messages, dialog_tokens
from qgpt_code.tokenizer import Tokenizer


class ChatModelInfo(Protocol):
    """The part of `qgpt_code.checkpoints.ModelInfo` that chat prompts read (duck-typed: importing
    ModelInfo itself would pull in torch)."""

    chat_format: str  # "llama2" or "template"
    chat_template: str | None
    metadata: Mapping[str, Any]  # bos_token / eos_token strings for template models


def chat_tokens(info: ChatModelInfo, tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Prompt ids for a chat dialog in the model's format. The tokenizer is passed alongside `info`
    because ModelInfo does not hold it."""
    if info.chat_format == "llama2":
        return dialog_tokens(tokenizer, dialog)
    if info.chat_format == "template":
        if not info.chat_template:
            raise ChatTemplateError("this model has no chat format (its file holds no chat template); use completion")
        return template_tokens(info.chat_template, tokenizer, checked_messages(dialog), info.metadata or {})
    raise ChatTemplateError(f"unknown chat format {info.chat_format!r} (expected 'llama2' or 'template')")
