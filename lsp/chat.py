"""`qgpt.chat`: a free question, about the selection or the whole file, answered by the chat model.

Arguments: `{question, uri?, range?, show?}`. With a range the selection is quoted, without one the file
(its first lines, as many as fit `edit_budget`); without a uri the question stands alone. The answer is
returned as `{"answer": ...}` and, unless `show` is false, also shown with `window/showMessage`. It is
generated with cancellable work-done progress, like an edit.
"""

from __future__ import annotations

import asyncio
import re
from typing import Callable

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from qgpt_code.errors import QGPTError
from qgpt_code.prompts import Message
from qgpt_code.prompts.windows import head_window_end

from qgpt_code.lsp.documents import offset_at
from qgpt_code.lsp.edit import command_object, parse_range, show
from qgpt_code.lsp.progress import WorkDone

CHAT_COMMAND = "qgpt.chat"
CHAT_SYSTEM_PROMPT = ("You are an expert programmer. Answer the question about the code accurately and "
                      "briefly; show code in fenced blocks.")


def question_dialog(question: str, code: str, path: str, language_id: str, count: Callable[[str], int],
                    budget: int, selected: bool) -> list[Message]:
    """The dialog for a question about `code`, cut to its first lines that fit `budget` tokens."""
    about = f"File: {path}" + (f" ({language_id})" if language_id else "") + "\n\n" if path else ""
    ask = f"Question: {question.strip()}"
    fixed = count(CHAT_SYSTEM_PROMPT) + count(about) + count(ask) + 32  # fences, titles, chat tags
    if code.strip() and budget - fixed > 0:
        code = code[: head_window_end(count, code, budget - fixed)]
        longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
        fence = "`" * max(3, longest + 1)
        title = "Selected code:" if selected else "The file:"
        body = code if code.endswith("\n") else code + "\n"
        about += f"{title}\n{fence}{language_id}\n{body}{fence}\n\n"
    return [Message(role="system", content=CHAT_SYSTEM_PROMPT), Message(role="user", content=about + ask)]


async def chat(server, arguments: list | None) -> dict:
    obj = command_object(arguments, ("question", "uri", "range"), CHAT_COMMAND)
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: question is missing")
    code, path, language_id, selected = "", "", "", False
    if obj.get("uri") is not None:
        document = server.documents.document(obj["uri"])
        code, path, language_id = document.source, document.path or "", document.language_id or ""
        if obj.get("range") is not None:
            span = parse_range(server, obj["range"])
            encoding = server.documents.encoding
            start, end = sorted((offset_at(code, span.start, encoding), offset_at(code, span.end, encoding)))
            if start < end:
                code, selected = code[start:end], True
    backend = server.runtime.available()
    if backend is None:
        message = "QGPT: the model is not ready yet"
        show(server, types.MessageType.Warning, message)
        return {"answer": None, "message": message}

    settings = server.settings
    dialog = question_dialog(question, code, path, language_id, backend.count_tokens, settings.edit_budget, selected)
    task = asyncio.current_task()
    server.protocol.track_command(task)
    progress = WorkDone(server, "QGPT: thinking", cancellable=True)
    await progress.begin(question.strip()[:80], 0)
    progress.on_cancel(task.cancel)
    try:
        generation = await backend.chat(dialog, settings, lambda n: progress.report(f"{n} tokens"))
    except asyncio.CancelledError:
        task.uncancel()
        progress.end("cancelled")
        return {"answer": None, "message": "cancelled"}
    except QGPTError as exc:
        progress.end("failed")
        show(server, types.MessageType.Error, f"QGPT: the question failed: {exc}")
        return {"answer": None, "message": str(exc)}
    progress.end("done")
    answer = generation.text.strip()
    if obj.get("show", True):
        show(server, types.MessageType.Info, answer or "(no answer)")
    return {"answer": answer, "message": ""}


def register(server) -> None:
    @server.command(CHAT_COMMAND)
    async def on_chat(ls, *arguments):
        return await chat(ls, list(arguments))
