"""Reading the code out of a chat model's reply: fenced blocks, bare code, or nothing but prose.

Models answer an edit request in many shapes: one fenced block (the asked-for shape), several blocks (the
answer, then a usage example), a block that first quotes the original, an untagged block, bare code with a
sentence before it, or only prose. `parse_edit_reply` returns the replacement for the selection, re-indented
to the selection's indentation, or says there was no code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from os.path import commonprefix

NO_CODE_MESSAGE = "the model's reply contains no code"

# A fence opens with 3+ backticks or tildes (CommonMark allows up to 3 spaces before it) and an optional
# info string; it closes with the same character, at least as many times, alone on its line.
_OPENING_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*?)[ \t]*$")

_LANGUAGE_ALIASES = {
    "py": "python", "python3": "python", "js": "javascript", "jsx": "javascriptreact", "ts": "typescript",
    "tsx": "typescriptreact", "sh": "shellscript", "bash": "shellscript", "zsh": "shellscript",
    "shell": "shellscript", "c++": "cpp", "cc": "cpp", "cs": "csharp", "c#": "csharp", "rs": "rust",
    "golang": "go", "rb": "ruby", "kt": "kotlin", "yml": "yaml", "md": "markdown",
}

_CODE_SIGNAL = re.compile(
    r"[=;{}]|\w\(|^\s*(?:#|//|/\*|--|<!--|@)|"
    r"^\s*(?:def|class|return|import|from|if|elif|else|for|while|try|except|with|async|await|function|const|let|var|"
    r"fn|pub|use|package|func|public|private|static|#include|SELECT|INSERT|UPDATE|DELETE)\b"
)
_PROSE_WORDS = {"the", "a", "an", "is", "are", "this", "that", "here", "here's", "it", "to", "of", "and",
                "with", "you", "your", "i", "we", "now", "will", "can", "sure", "instead"}


@dataclass(frozen=True)
class CodeBlock:
    language: str  # the fence's info word, lower-cased ("" when untagged)
    code: str
    start: int  # offsets of the whole block (fences included) in the reply
    end: int


@dataclass(frozen=True)
class EditReply:
    """What a reply means for the selection: the replacement text, or None with NO_CODE_MESSAGE."""

    replacement: str | None
    explanation: str  # the reply's prose, to show the user if wanted

    @property
    def has_code(self) -> bool:
        return self.replacement is not None

    @property
    def message(self) -> str:
        return "" if self.has_code else NO_CODE_MESSAGE


def code_blocks(reply: str) -> list[CodeBlock]:
    """The fenced code blocks of a markdown reply, in order. An unclosed block (the reply was cut off)
    runs to the end of the reply."""
    blocks: list[CodeBlock] = []
    lines = reply.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    index = 0
    while index < len(lines):
        opening = _OPENING_FENCE.match(lines[index].rstrip("\r\n"))
        if not opening:
            index += 1
            continue
        fence = opening.group("fence")
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((i for i in range(index + 1, len(lines)) if closing.match(lines[i].rstrip("\r\n"))), len(lines))
        language = (opening.group("info").split() or [""])[0].lower()
        code = "".join(lines[index + 1 : end])
        blocks.append(CodeBlock(language, code, offsets[index], offsets[min(end + 1, len(lines))]))
        index = end + 1
    return blocks


def _canonical_language(name: str) -> str:
    name = name.lower()
    return _LANGUAGE_ALIASES.get(name, name)


def _is_prose(line: str) -> bool:
    """A line that reads as an English sentence rather than code."""
    text = line.strip()
    if not text or _CODE_SIGNAL.search(text):
        return False
    text = re.sub(r"^(?:[-*+]|\d+[.)])\s+", "", text)  # a list item's marker
    words = re.findall(r"[\w']+", text)
    if len(words) < 3:
        return False
    if text.endswith((".", "!", "?")):
        return True
    return text[0].isupper() and (text.endswith(":") or sum(word.lower() in _PROSE_WORDS for word in words) >= 2)


def _bare_code(reply: str) -> tuple[str, str] | None:
    """(code, prose) for a reply without fences: code is what remains once the sentences before and
    after it are removed, provided something code-like remains."""
    lines = reply.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip() and not _is_prose(line)), None)
    if first is None:
        return None
    last = max(i for i, line in enumerate(lines) if line.strip() and not _is_prose(line))
    prose = "".join(lines[:first] + lines[last + 1 :]).strip()
    return "".join(lines[first : last + 1]), prose


def _same_code(a: str, b: str) -> bool:
    return [line.strip() for line in a.strip().splitlines()] == [line.strip() for line in b.strip().splitlines()]


def choose_block(blocks: list[CodeBlock], language_id: str = "", original: str = "") -> CodeBlock | None:
    """The block that answers the request: among blocks in the file's language (or untagged; any block
    when none is), the first that is not a quote of the original selection."""
    wanted = _canonical_language(language_id)
    fitting = [b for b in blocks if not b.language or not wanted or _canonical_language(b.language) == wanted]
    candidates = fitting or blocks
    candidates = [b for b in candidates if b.code.strip()]
    changed = [b for b in candidates if not (original.strip() and _same_code(b.code, original))]
    pool = changed or candidates
    return pool[0] if pool else None


def _code_and_prose(reply: str, language_id: str, original: str) -> tuple[str, str] | None:
    """(code, the prose around it) of a reply. A reply with fences keeps its code in them, so when its
    blocks are all empty there is no code; a reply without fences may be bare code."""
    blocks = code_blocks(reply)
    if not blocks:
        return _bare_code(reply)
    block = choose_block(blocks, language_id, original)
    if block is None:
        return None
    around = (reply[: block.start].strip(), reply[block.end :].strip())
    return block.code, "\n\n".join(part for part in around if part)


def extract_code(reply: str, language_id: str = "", original: str = "") -> str | None:
    """The code a reply offers (see `choose_block`), or bare code once prose is removed; None if none."""
    found = _code_and_prose(reply, language_id, original)
    return found[0] if found else None


def _leading_whitespace(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _common_indent(text: str) -> str:
    return commonprefix([_leading_whitespace(line) for line in text.splitlines() if line.strip()])


def reindent(code: str, selection: str) -> str:
    """`code` moved to the selection's indentation (models often return an indented method flush left),
    with a final line break exactly when the selection has one."""
    old, new = _common_indent(code), _common_indent(selection)
    lines = code.splitlines()
    while lines and not lines[0].strip():  # blank lines just inside the fence
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if old != new:
        lines = [new + line[len(old) :] if line.strip() else "" for line in lines]
    text = "\n".join(lines)
    return text + "\n" if selection.endswith("\n") else text


def parse_edit_reply(reply: str, selection: str, language_id: str = "") -> EditReply:
    """The replacement for `selection` that a model's reply to an edit prompt holds."""
    found = _code_and_prose(reply, language_id, selection)
    if found is None:
        return EditReply(None, reply.strip())
    code, prose = found
    return EditReply(reindent(code, selection), prose)
