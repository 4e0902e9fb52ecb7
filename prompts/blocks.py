"""Where the cursor is in the code, and where a completion leaves the block that encloses it.

Two families of languages, one table (`SYNTAXES`):
  indented  (Python)                  a block is the lines indented deeper than its opener (`def f():`);
                                      a completion leaves it at the first line indented less than the block
  bracketed (JS/TS, Go, Rust, C/C++)  a block runs from `{` to its `}`; indentation is cosmetic there, so
                                      only brackets (and new top-level definitions) end a block
Both: a completion that closes a bracket opened before the cursor has left the block; if the file already
has that closing bracket after the cursor, the completion ends before it (the file supplies it), else just
after the line that closes it (the block is now complete). A line at column 0 that starts a new top-level
definition (`def`, `function`, `func`, `fn`, ...) is a new answer, not part of this one.

Only the lines nearest the cursor are read (`NEAR_LINES` each way), so a prompt's windows or a whole file
give the same answers, and the cost does not grow with the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

NEAR_LINES = 200  # lines read on either side of the cursor
_OPEN, _CLOSE = "([{", ")]}"
_PAIRS = dict(zip(_CLOSE, _OPEN))


@dataclass(frozen=True)
class Syntax:
    """What block detection needs to know about a language."""

    name: str
    indented: bool  # blocks by indentation (Python) rather than by braces
    line_comment: str  # brackets after it do not count
    quotes: tuple[str, ...]  # string delimiters; brackets inside strings do not count (longest first)
    block_comment: tuple[str, str] | None
    opener: re.Pattern  # a line whose next lines belong to a block it opens (matched on the stripped line)
    top_level: re.Pattern  # a line that starts a new top-level definition (matched at column 0)
    preamble: re.Pattern = re.compile(r"//|/\*|\*|#\[|@")  # decorators, attributes, comments: lines that
    # belong to the definition below them, so a completion made only of them has no definition yet


_NEVER = re.compile(r"(?!)")
_C_COMMENT = ("/*", "*/")
_BRACE_OPENER = re.compile(r"[([{]\s*(?://.*)?$")

PYTHON = Syntax(
    "python", True, "#", ('"""', "'''", '"', "'"), None,
    opener=re.compile(r"[:([{]\s*(?:#.*)?$"),  # `def f():`, `if x:` and an open bracket at the line's end
    top_level=re.compile(r"(?:async\s+def|def|class)\b|@|if\s+__name__\b"),
    preamble=re.compile(r"@|#"),
)
JAVASCRIPT = Syntax(
    "javascript", False, "//", ("`", '"', "'"), _C_COMMENT, _BRACE_OPENER,
    top_level=re.compile(r"(?:export\s+(?:default\s+)?)?(?:declare\s+)?(?:async\s+)?"
                         r"(?:function\b|class\b|const\b|let\b|var\b|interface\b|type\b|enum\b)|import\b"),
)
GO = Syntax(
    "go", False, "//", ("`", '"', "'"), _C_COMMENT, _BRACE_OPENER,
    top_level=re.compile(r"(?:func|type|var|const|import|package)\b"),
)
RUST = Syntax(  # no "'" as a quote: lifetimes (`'a`) would open strings that never close
    "rust", False, "//", ('"',), _C_COMMENT, _BRACE_OPENER,
    top_level=re.compile(r"(?:pub(?:\([^)]*\))?\s+)?(?:(?:async|unsafe|const|extern(?:\s+\"[^\"]*\")?)\s+)*"
                         r"(?:fn|struct|enum|trait|impl|mod|use|type|static|const|macro_rules!)\b|#\["),
)
C = Syntax(
    "c", False, "//", ('"', "'"), _C_COMMENT, _BRACE_OPENER,
    # declarations at column 0: `int main(void) {`, `static void f(...)`, `struct s {`, `#include`
    top_level=re.compile(r"#\s*(?:include|define)\b|(?:struct|enum|union|typedef|class|namespace|template)\b"
                         r"|[A-Za-z_][\w \t*&:<>,]*\b[A-Za-z_]\w*\s*\("),
)
# Unknown languages: brackets as everywhere, indentation judged from the lines after the cursor only (the
# rule every language had before this table), no comments and no top-level keywords.
GENERIC = Syntax("", True, "", ('"', "'"), None, opener=_NEVER, top_level=_NEVER)

SYNTAXES: dict[str, Syntax] = {
    "python": PYTHON,
    **dict.fromkeys(("javascript", "javascriptreact", "typescript", "typescriptreact"), JAVASCRIPT),
    "go": GO,
    "rust": RUST,
    **dict.fromkeys(("c", "cpp", "objective-c", "objective-cpp", "cuda-cpp", "java", "csharp"), C),
}
_EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "javascriptreact", ".ts": "typescript", ".tsx": "typescriptreact", ".go": "go", ".rs": "rust",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".java": "java",
}


def syntax_for(language_id: str = "", path: str = "") -> Syntax:
    """The language's syntax from its LSP language id, else from the path's extension, else `GENERIC`."""
    language = language_id.lower() or _EXTENSIONS.get(PurePosixPath(path).suffix.lower(), "")
    return SYNTAXES.get(language, GENERIC)


def indentation(line: str) -> int:
    """Width of a line's leading whitespace, tabs counted as 4 columns."""
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip())


def brackets(text: str, syntax: Syntax, state: str = ""):
    """(offset, bracket) for each bracket of `text` outside strings and comments. `state` is the string
    delimiter or block-comment opener `text` starts inside ("" for code)."""
    i, n = 0, len(text)
    while i < n:
        if state:  # inside a string or a block comment: find its end
            end = syntax.block_comment[1] if state == "/*" and syntax.block_comment else state
            if state in ('"', "'"):  # one-line strings end at the line's end too
                stop = text.find("\n", i)
                stop = n if stop < 0 else stop
                j = i
                while j < stop and text[j] != state:
                    j += 2 if text[j] == "\\" else 1
                i, state = (j + 1, "") if j < stop else (stop, "")
                continue
            j = text.find(end, i)
            if j < 0:
                return
            i, state = j + len(end), ""
            continue
        char = text[i]
        if syntax.line_comment and text.startswith(syntax.line_comment, i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if syntax.block_comment and text.startswith(syntax.block_comment[0], i):
            state, i = "/*", i + len(syntax.block_comment[0])
            continue
        quote = next((q for q in syntax.quotes if text.startswith(q, i)), None)
        if quote:
            state, i = quote, i + len(quote)
            continue
        if char in _OPEN or char in _CLOSE:
            yield i, char
        i += 1


def open_brackets(text: str, syntax: Syntax) -> list[str]:
    """The brackets of `text` (read as code from its start) still open at its end, outermost first."""
    stack: list[str] = []
    for _, char in brackets(text, syntax):
        if char in _OPEN:
            stack.append(char)
        elif stack and stack[-1] == _PAIRS[char]:
            stack.pop()
    return stack


def closers_ahead(text: str, syntax: Syntax) -> list[str]:
    """The closing brackets in `text` (what follows the cursor) that close something opened before it,
    innermost first."""
    depth, found = 0, []
    for _, char in brackets(text, syntax):
        if char in _OPEN:
            depth += 1
        elif depth:
            depth -= 1
        else:
            found.append(char)
    return found


@dataclass(frozen=True)
class Cursor:
    """What the completion rules need to know about the cursor's place in the code."""

    syntax: Syntax
    line_before: str  # the cursor's line up to the cursor
    block_indent: int | None  # indented languages: a completion line indented less has left the block
    in_block: bool  # inside a definition (or a bracket): a new top-level definition leaves it
    closers: tuple[str, ...]  # closing brackets the file already has after the cursor, innermost first
    wants_indent: bool  # the cursor sits at an opener's indentation: the first line brings its own indent

    @property
    def in_indentation(self) -> bool:
        """The cursor's line holds only whitespace before the cursor."""
        return not self.line_before.strip()


def _near_prefix(prefix: str) -> str:
    start = len(prefix)
    for _ in range(NEAR_LINES):
        start = prefix.rfind("\n", 0, start)
        if start < 0:
            return prefix
    return prefix[start + 1 :]


def _near_suffix(suffix: str) -> str:
    end = -1
    for _ in range(NEAR_LINES):
        end = suffix.find("\n", end + 1)
        if end < 0:
            return suffix
    return suffix[:end]


def cursor_at(prefix: str, suffix: str, syntax: Syntax) -> Cursor:
    """The cursor between `prefix` and `suffix` (only the `NEAR_LINES` nearest lines are read)."""
    before, after = _near_prefix(prefix), _near_suffix(suffix)
    line_before = before[before.rfind("\n") + 1 :]
    above = [line for line in before[: len(before) - len(line_before)].split("\n") if line.strip()]
    previous = above[-1] if above else ""
    below = [line for line in after.split("\n")[1:] if line.strip()]
    opened = open_brackets(before, syntax)
    opener = bool(previous) and bool(syntax.opener.search(previous.strip()))
    column = indentation(line_before)
    wants_indent = not line_before.strip() and opener and indentation(previous) >= column

    block_indent: int | None = None
    if syntax is GENERIC or (syntax.indented and not column and not line_before.strip()):
        if below and indentation(below[0]):  # the block the next line belongs to goes on after the cursor
            block_indent = indentation(below[0])
        elif syntax is not GENERIC and previous and (indentation(previous) or opener):
            block_indent = 1  # at column 0 after an indented line: inside a top-level definition
    elif syntax.indented:
        if line_before.strip():  # at the end of code: its block, or the one it opens
            block_indent = indentation(line_before) + (1 if syntax.opener.search(line_before.strip()) else 0)
        else:  # in the indentation an editor put there (deeper if the line above opens a block)
            block_indent = indentation(previous) + 1 if wants_indent else column
    if syntax.indented:
        in_block = bool(block_indent)
    else:
        in_block = "{" in opened
    return Cursor(syntax, line_before, block_indent, in_block, tuple(closers_ahead(after, syntax)), wants_indent)


def block_end(completion: str, cursor: Cursor) -> int:
    """Where the completion (inserted at `cursor`) leaves the enclosing block: an offset into it, or its
    length when it stays inside. A cut before a line is at the end of the line before it."""
    syntax = cursor.syntax
    events = list(brackets(completion, syntax))
    k, depth = 0, 0  # depth: brackets the completion opened and has not closed yet
    position, has_content = 0, False
    for index, line in enumerate(completion.split("\n")):
        line_end = position + len(line)
        # the cursor's own line is in the block, unless the completion writes it from the indentation
        # (an empty line: then its indentation is the completion's)
        if (index or cursor.in_indentation) and line.strip() and depth == 0:
            line = cursor.line_before + line if index == 0 else line
            cut = max(position - 1, 0)  # before this line: at the previous line break (or nothing)
            if (syntax.indented and cursor.block_indent is not None
                    and indentation(line) < cursor.block_indent):
                return cut  # a dedent past the block
            if not line[:1].isspace() and syntax.top_level.match(line) and (cursor.in_block or has_content):
                return cut  # a new top-level definition
        while k < len(events) and events[k][0] < line_end:
            offset, char = events[k]
            k += 1
            if char in _OPEN:
                depth += 1
            elif depth:
                depth -= 1
            elif cursor.closers:  # closes a bracket opened before the cursor, which the file closes already
                head = completion[position:offset]
                return position - 1 if index and not head.strip() else position + len(head.rstrip())
            else:  # closes the enclosing block, which the file leaves open: the answer ends with this line
                return line_end
        has_content = has_content or bool(line.strip() and not syntax.preamble.match(line.strip()))
        position = line_end + 1
    return len(completion)
