"""Chat-edit prompts: "rewrite this selection following an instruction", with the file around it.

The prompt is a dialog (a system message and one user message) so it goes through `chat_tokens` and
fits both Llama 2 `[INST]` models and models with their own template. The user message names the file and
language, shows the code before and after the selection (the lines nearest the selection, as many as the
budget allows), then the selection, then the instruction: the parts the answer depends on most come
last, nearest to where the model starts writing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from qgpt_code.errors import PromptTooLongError
from qgpt_code.prompts.chat import ChatModelInfo, chat_tokens
from qgpt_code.prompts.chat_template import CONTROL_TOKEN_SHAPE
from qgpt_code.prompts.dialog import Message, find_reserved_tag
from qgpt_code.prompts.positions import split_at_range
from qgpt_code.tokenizer import Tokenizer

EDIT_SYSTEM_PROMPT = (
    "You are an expert programmer who edits code exactly as instructed. Reply with the rewritten code "
    "in a single fenced code block and nothing else. Keep the indentation and style of the original."
)

Count = Callable[[str], int]


@dataclass(frozen=True)
class EditRequest:
    """What the user asked to change, and where."""

    instruction: str
    selection: str
    before: str = ""  # file text before the selection
    after: str = ""  # file text after the selection
    path: str = ""
    language_id: str = ""


def edit_request_at(
    text: str,
    start: tuple[int, int],
    end: tuple[int, int],
    instruction: str,
    *,
    path: str = "",
    language_id: str = "",
) -> EditRequest:
    """An EditRequest for a document and an LSP range (line, UTF-16 character)."""
    before, selection, after = split_at_range(text, start, end)
    return EditRequest(instruction, selection, before, after, path, language_id)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate (about 3 characters per token for code), for callers that talk
    to a remote server and hold no tokenizer."""
    return len(text) // 3 + 1


def _fence_for(*texts: str) -> str:
    """A backtick fence longer than any backtick run in the texts, so file content cannot close it."""
    longest = max((len(run) for text in texts for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _code_block(title: str, code: str, fence: str, language: str) -> str:
    body = code if code.endswith("\n") else code + "\n"
    return f"{title}\n{fence}{language}\n{body}{fence}\n\n"


def _about(path: str, language: str) -> str:
    if path:
        return f"File: {path}" + (f" ({language})" if language else "") + "\n\n"
    return f"Language: {language}\n\n" if language else ""


def edit_dialog(request: EditRequest, context_before: str = "", context_after: str = "") -> list[Message]:
    """The edit dialog showing the given context (already cut to size) around the selection."""
    language = request.language_id
    fence = _fence_for(request.selection, context_before, context_after)
    parts = [_about(request.path, language)]
    if context_before.strip():
        parts.append(_code_block("Code before the selection:", context_before, fence, language))
    if context_after.strip():
        parts.append(_code_block("Code after the selection:", context_after, fence, language))
    parts.append(_code_block("Selected code:", request.selection, fence, language))
    parts.append(f"Instruction: {request.instruction.strip()}\n\n")
    parts.append(
        "Rewrite the selected code following the instruction. "
        f"Reply with only the new selected code, in one {fence}{language} block."
    )
    return [Message(role="system", content=EDIT_SYSTEM_PROMPT), Message(role="user", content="".join(parts))]


def _unsafe(line: str) -> bool:
    """Lines that would make the dialog refused (chat tags, control tokens) end the context there."""
    return find_reserved_tag(line) is not None or CONTROL_TOKEN_SHAPE.search(line) is not None


def fit_context(request: EditRequest, count: Count, budget: int) -> tuple[str, str]:
    """The lines before and after the selection to show, nearest first, taken alternately from each side
    while their token count fits `budget`. A side stops early at a line holding a chat tag."""
    above = request.before.splitlines(keepends=True)[::-1]  # nearest first
    below = request.after.splitlines(keepends=True)
    taken: dict[str, list[str]] = {"above": [], "below": []}
    open_sides = {"above": above, "below": below}
    used = 0
    while open_sides:
        for side in list(open_sides):
            lines = open_sides[side]
            index = len(taken[side])
            if index >= len(lines) or _unsafe(lines[index]):
                del open_sides[side]
                continue
            cost = count(lines[index])
            if used + cost > budget:
                del open_sides[side]
                continue
            taken[side].append(lines[index])
            used += cost
    return "".join(reversed(taken["above"])), "".join(taken["below"])


def edit_dialog_within(request: EditRequest, count: Count, budget: int) -> list[Message]:
    """The edit dialog with as much surrounding code as fits in `budget` tokens (as `count` counts them).
    Raises PromptTooLongError when the instruction and selection alone do not fit."""
    # everything but the context lines: both context blocks' titles and fences, plus the chat format's tags
    fixed = sum(count(message["content"]) for message in edit_dialog(request, "x", "x")) + 16
    if fixed > budget:
        raise PromptTooLongError(fixed, budget)
    return edit_dialog(request, *fit_context(request, count, budget - fixed))


def edit_tokens(info: ChatModelInfo, tokenizer: Tokenizer, request: EditRequest, budget: int) -> list[int]:
    """Prompt ids for an edit request, in the model's chat format, at most `budget` tokens."""

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    room = budget
    while True:  # line-by-line counts differ a little from the joined text's: retry tighter if over
        tokens = chat_tokens(info, tokenizer, edit_dialog_within(request, count, room))
        if len(tokens) <= budget:
            return tokens
        room -= len(tokens) - budget
