"""Open documents as the features see them: a snapshot of the text around a cursor, and positions in
whatever encoding the client negotiated.

pygls keeps the documents up to date from incremental `didChange` notifications. Positions need care:
Neovim offers UTF-8 first and pygls picks it, VS Code speaks UTF-16, and `prompts/` counts UTF-16. This
module converts LSP positions to string offsets (and back) in the negotiated encoding, clamping
out-of-range positions as the specification asks (past the end of a line: the end of that line; past the
last line: the end of the document). pygls' own converter moves a position past the end of the last line
one character back, so it is not used here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams

from qgpt_code.prompts.positions import line_end, line_starts

Units = Callable[[str], int]

UNITS: dict[str, Units] = {
    "utf-8": lambda char: len(char.encode("utf-8", "surrogatepass")),
    "utf-16": lambda char: 2 if ord(char) > 0xFFFF else 1,
    "utf-32": lambda char: 1,
}


def _units(encoding: str | None) -> Units:
    return UNITS.get(str(encoding or "utf-16"), UNITS["utf-16"])


def offset_at(text: str, position: types.Position, encoding: str | None = "utf-16") -> int:
    """The string offset of an LSP position. A character inside a multi-unit character rounds down."""
    starts = line_starts(text)
    if position.line >= len(starts):
        return len(text)
    units = _units(encoding)
    offset, end, count = starts[position.line], line_end(text, starts, position.line), 0
    while offset < end:
        count += units(text[offset])
        if count > position.character:
            break
        offset += 1
    return offset


def position_at(text: str, offset: int, encoding: str | None = "utf-16") -> types.Position:
    """The LSP position of a string offset (the inverse of `offset_at`)."""
    import bisect

    offset = max(0, min(offset, len(text)))
    starts = line_starts(text)
    line = bisect.bisect_right(starts, offset) - 1
    end = min(offset, line_end(text, starts, line))
    units = _units(encoding)
    return types.Position(line=line, character=sum(units(char) for char in text[starts[line] : end]))


def rest_of_line(text_after: str) -> str:
    """The text after the cursor up to the end of its line."""
    for index, char in enumerate(text_after):
        if char in "\r\n":
            return text_after[:index]
    return text_after


CLOSERS = set(")]}>\"'`")


def is_auto_closed(rest: str) -> bool:
    """Whether the rest of the line holds only what an editor auto-inserts: closing brackets and
    quotes (and the `;`, `,` or `:` that may follow them), at least one closer."""
    stripped = rest.strip()
    return bool(stripped) and any(c in CLOSERS for c in stripped) and all(c in CLOSERS or c in ";,:" for c in stripped)


@dataclass(frozen=True)
class Snapshot:
    """One document at one moment, split at a cursor."""

    uri: str
    text: str
    offset: int  # the cursor, as an index into `text`
    version: int | None
    path: str
    language_id: str
    encoding: str

    @property
    def before(self) -> str:
        return self.text[: self.offset]

    @property
    def after(self) -> str:
        return self.text[self.offset :]

    def position(self, offset: int | None = None) -> types.Position:
        return position_at(self.text, self.offset if offset is None else offset, self.encoding)


class Documents:
    """The open documents, read through pygls' workspace, and when each was last edited."""

    def __init__(self, server):
        self.server = server
        self.edited_at: dict[str, float] = {}

    @property
    def encoding(self) -> str:
        return str(self.server.workspace.position_encoding or "utf-16")

    def is_open(self, uri: str) -> bool:
        from urllib.parse import unquote

        return unquote(uri) in self.server.workspace.text_documents

    def document(self, uri: str):
        """The open document; JSON-RPC "invalid params" for one that was never opened (pygls would
        otherwise read it from disk)."""
        if not self.is_open(uri):
            raise JsonRpcInvalidParams(f"document not open: {uri}")
        return self.server.workspace.get_text_document(uri)

    def snapshot(self, uri: str, position: types.Position) -> Snapshot:
        doc = self.document(uri)
        text = doc.source
        return Snapshot(uri, text, offset_at(text, position, self.encoding), doc.version,
                        doc.path or doc.filename or "", doc.language_id or "", self.encoding)

    def position_at(self, text: str, offset: int) -> types.Position:
        return position_at(text, offset, self.encoding)

    def changed(self, uri: str) -> None:
        self.edited_at[uri] = time.monotonic()

    def closed(self, uri: str) -> None:
        self.edited_at.pop(uri, None)

    def others(self, uri: str, limit: int, language_id: str):
        """Up to `limit` other open documents, most recently edited first: (path, text, language_id)."""
        if limit <= 0:
            return []
        docs = [d for d in self.server.workspace.text_documents.values() if d.uri != uri]
        docs.sort(key=lambda d: self.edited_at.get(d.uri, 0.0), reverse=True)
        return [(d.path or d.filename or d.uri, d.source, d.language_id or language_id) for d in docs[:limit]]
