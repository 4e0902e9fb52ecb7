"""Chat-driven edits: the code actions on a selection and the `qgpt.editSelection` command.

`qgpt.editSelection` takes `{uri, range, instruction}` (or the three as separate arguments). It builds
the `[INST]`/chat-template edit prompt from prompts/ (instruction, selection, the code around it under a
budget), generates with work-done progress that the user can cancel, reads the code out of the reply
(`parse_edit_reply`), and applies it with one `workspace/applyEdit`: a single text edit, so one undo
reverts it. The edit carries the document version the prompt was built from; if the user changed the
document meanwhile, nothing is applied. The command's result says what happened:
`{"applied", "replacement", "explanation", "message"}`.

The code actions are "QGPT: Edit selection..." (no instruction: the client asks the user for one; see
docs/editors.md) and one action per preset instruction (`edit_presets`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from qgpt_code.errors import QGPTError
from qgpt_code.prompts import EditRequest, parse_edit_reply

from qgpt_code.lsp.documents import offset_at
from qgpt_code.lsp.progress import WorkDone

logger = logging.getLogger(__name__)

EDIT_COMMAND = "qgpt.editSelection"


@dataclass(frozen=True)
class EditArgs:
    uri: str
    range: types.Range
    instruction: str


def parse_range(server, value: Any, name: str = "range") -> types.Range:
    try:
        return server.protocol._converter.structure(value, types.Range)
    except Exception:
        raise JsonRpcInvalidParams(f"{name} must be an LSP range {{start: {{line, character}}, end: ...}}, "
                                   f"got {value!r}"[:300]) from None


def command_object(arguments: list | None, names: tuple[str, ...], command: str) -> dict:
    """Command arguments as one object: `[{...}]`, or positional values in the order of `names`."""
    arguments = list(arguments or [])
    if len(arguments) == 1 and isinstance(arguments[0], dict):
        return arguments[0]
    if 1 <= len(arguments) <= len(names):
        return dict(zip(names, arguments))
    raise JsonRpcInvalidParams(f"{command} takes one object {{{', '.join(names)}}}, got {len(arguments)} arguments")


def parse_edit_args(server, arguments: list | None) -> EditArgs:
    obj = command_object(arguments, ("uri", "range", "instruction"), EDIT_COMMAND)
    uri, instruction = obj.get("uri"), obj.get("instruction", "")
    if not isinstance(uri, str) or not uri:
        raise JsonRpcInvalidParams(f"{EDIT_COMMAND}: uri must be a document URI, got {uri!r}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise JsonRpcInvalidParams(f"{EDIT_COMMAND}: instruction is missing: say how to change the selection")
    return EditArgs(uri, parse_range(server, obj.get("range")), instruction.strip())


def workspace_edit(server, uri: str, version: int | None, span: types.Range, new_text: str) -> types.WorkspaceEdit:
    """One text edit, versioned when the client accepts `documentChanges`."""
    edit = types.TextEdit(range=span, new_text=new_text)
    workspace = server.client_capabilities.workspace
    if workspace and workspace.workspace_edit and workspace.workspace_edit.document_changes:
        document = types.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version)
        return types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(text_document=document, edits=[edit])])
    return types.WorkspaceEdit(changes={uri: [edit]})


def show(server, kind: types.MessageType, message: str) -> None:
    server.window_show_message(types.ShowMessageParams(type=kind, message=message))


def outcome(applied: bool, message: str = "", replacement: str | None = None, explanation: str = "") -> dict:
    return {"applied": applied, "replacement": replacement, "explanation": explanation, "message": message}


async def edit_selection(server, arguments: list | None) -> dict:
    args = parse_edit_args(server, arguments)
    document = server.documents.document(args.uri)
    text, version, encoding = document.source, document.version, server.documents.encoding
    start, end = sorted((offset_at(text, args.range.start, encoding), offset_at(text, args.range.end, encoding)))
    if start == end:
        raise JsonRpcInvalidParams(f"{EDIT_COMMAND}: the range is empty: select the code to change")
    request = EditRequest(args.instruction, text[start:end], text[:start], text[end:],
                          document.path or "", document.language_id or "")
    backend = server.runtime.available()
    if backend is None:
        message = "QGPT: the model is not ready yet" + (f" ({server.runtime.error})" if server.runtime.error else "")
        show(server, types.MessageType.Warning, message)
        return outcome(False, message)

    task = asyncio.current_task()
    server.protocol.track_command(task)
    progress = WorkDone(server, f"QGPT: {args.instruction}", cancellable=True)
    await progress.begin("generating", 0)
    progress.on_cancel(task.cancel)
    try:
        generation = await backend.edit(request, server.settings, lambda n: progress.report(f"{n} tokens"))
    except asyncio.CancelledError:
        task.uncancel()
        progress.end("cancelled")
        return outcome(False, "cancelled")
    except QGPTError as exc:
        progress.end("failed")
        show(server, types.MessageType.Error, f"QGPT: the edit failed: {exc}")
        return outcome(False, str(exc))
    progress.end("done")

    reply = parse_edit_reply(generation.text, request.selection, request.language_id)
    if not reply.has_code:
        message = f"QGPT: {reply.message}" + (f": {reply.explanation[:300]}" if reply.explanation else "")
        show(server, types.MessageType.Warning, message)
        return outcome(False, reply.message, None, reply.explanation)
    if server.documents.document(args.uri).version != version:
        message = "QGPT: the document changed while the edit was generated; nothing was applied"
        show(server, types.MessageType.Warning, message)
        return outcome(False, message, reply.replacement, reply.explanation)

    span = types.Range(start=server.documents.position_at(text, start), end=server.documents.position_at(text, end))
    result = await server.workspace_apply_edit_async(types.ApplyWorkspaceEditParams(
        edit=workspace_edit(server, args.uri, version, span, reply.replacement), label=f"QGPT: {args.instruction}"))
    reason = result.failure_reason or "no reason given"
    message = "" if result.applied else f"the editor did not apply the edit: {reason}"
    return outcome(bool(result.applied), message, reply.replacement, reply.explanation)


def _plain_range(span: types.Range) -> dict:
    return {"start": {"line": span.start.line, "character": span.start.character},
            "end": {"line": span.end.line, "character": span.end.character}}


def code_actions(server, params: types.CodeActionParams) -> list[types.CodeAction]:
    span = params.range
    if span.start == span.end:
        return []
    only = params.context.only if params.context else None
    if only and not any(str(getattr(k, "value", k)).startswith(("refactor", "qgpt")) for k in only):
        return []
    where = {"uri": params.text_document.uri, "range": _plain_range(span)}
    kind = types.CodeActionKind.RefactorRewrite

    def action(title: str, command: str, arguments: dict) -> types.CodeAction:
        return types.CodeAction(title=title, kind=kind,
                                command=types.Command(title=title, command=command, arguments=[arguments]))

    actions = [action("QGPT: Edit selection...", EDIT_COMMAND, where)]
    actions += [action(f"QGPT: {preset}", EDIT_COMMAND, {**where, "instruction": preset})
                for preset in server.settings.edit_presets]
    actions.append(action("QGPT: Ask about selection...", "qgpt.chat", where))
    return actions


def register(server) -> None:
    @server.feature(types.TEXT_DOCUMENT_CODE_ACTION,
                    types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.RefactorRewrite]))
    def on_code_action(ls, params: types.CodeActionParams):
        return code_actions(ls, params)

    @server.command(EDIT_COMMAND)
    async def on_edit_selection(ls, *arguments):
        return await edit_selection(ls, list(arguments))
