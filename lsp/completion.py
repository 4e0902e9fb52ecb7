"""`textDocument/completion`: the same completion as one menu item, for clients without inline support.

"auto" (the default `completion_fallback`) answers only clients that did not declare
`textDocument.inlineCompletion`, so an editor with ghost text does not also get a menu entry. The item
replaces the word before the cursor with that word plus the completion, so the client's filtering (by the
word typed so far) keeps it; `isIncomplete` makes the client ask again as the user types.
"""

from __future__ import annotations

import re

from lsprotocol import types

from qgpt_code.lsp.documents import Snapshot

_WORD_BEFORE = re.compile(r"[A-Za-z0-9_$]*\Z")
LABEL_CHARS = 60


def wants_items(server) -> bool:
    mode = server.settings.completion_fallback
    if mode != "auto":
        return mode == "always"
    text_document = server.client_capabilities.text_document
    return not (text_document and text_document.inline_completion)


def completion_item(snapshot: Snapshot, completion: str) -> types.CompletionItem | None:
    if not completion.strip():
        return None
    word = _WORD_BEFORE.search(snapshot.before).group()
    text = word + completion
    first_line = text.strip().splitlines()[0] if text.strip() else text
    label = first_line if len(first_line) <= LABEL_CHARS else first_line[: LABEL_CHARS - 1] + "…"
    span = types.Range(start=snapshot.position(snapshot.offset - len(word)), end=snapshot.position())
    return types.CompletionItem(
        label=label,
        kind=types.CompletionItemKind.Snippet,
        detail="QGPT",
        documentation=types.MarkupContent(kind=types.MarkupKind.PlainText, value=text),
        filter_text=text,
        sort_text="0",
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=span, new_text=text),
    )


async def completion(server, params: types.CompletionParams) -> types.CompletionList:
    if not wants_items(server):
        return types.CompletionList(is_incomplete=False, items=[])
    found = await server.completer.complete(params.text_document.uri, params.position)
    item = completion_item(*found) if found else None
    server.completer.counters["answered" if item else "empty"] += 1
    return types.CompletionList(is_incomplete=True, items=[item] if item else [])


def register(server) -> None:
    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))
    async def on_completion(ls, params: types.CompletionParams):
        return await completion(ls, params)
