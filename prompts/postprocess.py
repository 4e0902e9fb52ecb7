"""Turning a raw model completion into what the editor inserts at the cursor.

Each rule is a small pure function; `postprocess_completion` applies them in order (why, in brackets):
  - the cursor's line goes on after the cursor: keep the completion's first line only, minus whitespace the
    line already has before the cursor and a tail that types out again what follows the cursor
    (a prefix-only model writes the whole line);
  - otherwise (a multi-line completion):
      1. if generation ran out of tokens, drop the unfinished last line (half a statement is never wanted);
      2. on an empty line, drop leading blank lines, and re-base the first line's indentation on the
         cursor's column (accepting a suggestion that begins with a line break leaves the cursor's line
         blank; the model wrote that line from column 0);
      3. drop whitespace the cursor's line already ends with (`␣␣␣␣` + ` return` is a 5-space indent:
         byte-level BPE models like tokens with a leading space), unless the cursor sits at an opener's
         indentation and the first line must be indented deeper;
      4. cut where the completion starts repeating the lines after the cursor;
      5. cut where it leaves the block enclosing the cursor (blocks.py: a dedent past the block, a closing
         bracket the file already has, a new top-level definition), language by language;
  - finally strip trailing whitespace.
`answer_is_complete` is the same analysis as a stop criterion, for the engine to stop generating early.
"""

from __future__ import annotations

import re

from qgpt_code.prompts.blocks import Cursor, block_end, cursor_at, indentation, syntax_for

_TRAILING_SPACE = re.compile(r"[ \t]+(?=\r?\n)")
_PAIRS = {")": "(", "]": "[", "}": "{"}
_CONFIRM_LINES = 3  # a repeat of the suffix must match this many lines (or all that there are)


def rest_of_line(suffix: str) -> str:
    """What follows the cursor on its line."""
    return re.split(r"\r\n|\r|\n", suffix, maxsplit=1)[0]


def line_before_cursor(prefix: str) -> str:
    """What precedes the cursor on its line."""
    return prefix[max(prefix.rfind("\n"), prefix.rfind("\r")) + 1 :]


def first_line_only(completion: str) -> str:
    return rest_of_line(completion)


def _has_unmatched_bracket(text: str) -> bool:
    stack: list[str] = []
    for char in text:
        if char in "([{":
            stack.append(char)
        elif char in _PAIRS:
            if not stack or stack.pop() != _PAIRS[char]:
                return True
    return bool(stack)


def drop_retyped_rest_of_line(line: str, rest: str) -> str:
    """Drop the end of a one-line completion that types again what already follows the cursor.

    A model that saw only the prefix writes the whole line, so `foo(|)` comes back as `a, b)`: keep `a, b`.
    The tail stays when it closes a bracket the completion itself opened (`x[0]` before `]`).
    """
    tail = rest.strip()
    stripped = line.rstrip()
    if not tail or len(stripped) <= len(tail) or not stripped.endswith(tail):
        return line
    kept = stripped[: -len(tail)]
    if not _has_unmatched_bracket(stripped) and _has_unmatched_bracket(kept):
        return line
    return kept.rstrip() if rest[:1].isspace() else kept  # the file already has the space before the tail


def _following_lines(suffix: str) -> list[str]:
    """The non-blank lines after the cursor's line, right-stripped."""
    after = re.split(r"\r\n|\r|\n", suffix)[1:]
    return [line.rstrip() for line in after if line.strip()]


def _line_offsets(completion: str) -> list[tuple[int, str]]:
    """Each line of the completion with the offset of its line break (or of the end)."""
    offsets, position = [], 0
    for line in completion.split("\n"):
        offsets.append((position + len(line), line))
        position += len(line) + 1
    return offsets


def cut_at_repeated_suffix(completion: str, line_prefix: str, suffix: str) -> str:
    """Cut the completion where it starts writing again the lines that already follow the cursor.

    The completion's lines are compared (indentation included, trailing whitespace ignored) with the
    non-blank lines after the cursor's line; the first line of the completion is compared as it would
    read after `line_prefix`. A repeat must match `_CONFIRM_LINES` lines, or every remaining line of the
    completion (so a lone `}` that the file already has is caught). When the completion stops in the middle
    of a line (it ran out of tokens), that unfinished line may match just the start of a suffix line.
    """
    expected = _following_lines(suffix)
    lines = _line_offsets(completion)
    full_lines = [(line_prefix + lines[0][1]).rstrip(), *(line.rstrip() for _, line in lines[1:])]
    unfinished = full_lines[-1] if lines[-1][1].strip() else None
    for start, line in enumerate(full_lines):
        if not line.strip():
            continue
        candidates = [text for text in full_lines[start:] if text.strip()]
        checked = min(_CONFIRM_LINES, len(candidates), len(expected))
        if checked and all(
            candidates[k] == expected[k]
            or (k == len(candidates) - 1 and candidates[k] == unfinished and expected[k].startswith(unfinished))
            for k in range(checked)
        ):
            return "" if start == 0 else completion[: lines[start - 1][0]]
    return completion


def cut_at_block_end(completion: str, cursor: Cursor) -> str:
    """End the completion where it leaves the block enclosing the cursor (see blocks.py)."""
    return completion[: block_end(completion, cursor)]


def drop_unfinished_line(completion: str) -> str:
    """A completion that ran out of tokens, cut back to its last whole line (nothing if it has none after
    the cursor's line: the cursor's line alone is kept, being what the user types along)."""
    return completion[: completion.rfind("\n")] if "\n" in completion else completion


def drop_leading_blank_lines(completion: str, cursor: Cursor) -> str:
    """On a line with only indentation before the cursor, a completion whose first line is blank starts at
    its first non-blank line instead, indented from the cursor's column rather than from column 0; when
    that line is indented less than the cursor in an indented language, it is outside the block: nothing."""
    lines = completion.split("\n")
    if not cursor.in_indentation or len(lines) < 2 or lines[0].strip():
        return completion
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return ""
    line, before = lines[first], cursor.line_before
    if line.startswith(before):
        line = line[len(before) :]
    elif cursor.syntax.indented and indentation(line) < indentation(before):
        return ""
    else:
        line = " " * max(0, indentation(line) - indentation(before)) + line.lstrip()
    return "\n".join([line, *lines[first + 1 :]])


def drop_duplicated_whitespace(completion: str, cursor: Cursor) -> str:
    """No leading whitespace on the first line when the cursor's line already ends with whitespace, unless
    the cursor sits at an opener's indentation (`if x:` above, same column): then the line needs it."""
    if not cursor.line_before[-1:].isspace() or cursor.wants_indent:
        return completion
    first = rest_of_line(completion)
    return completion[len(first) - len(first.lstrip(" \t")) :] if first.strip() else completion


def strip_trailing_whitespace(completion: str) -> str:
    """No spaces or tabs at the end of any line, no blank lines or whitespace at the end."""
    return _TRAILING_SPACE.sub("", completion).rstrip()


def start_of_answer(completion: str, cursor: Cursor) -> str:
    """Steps 2 and 3: the completion as it should begin at the cursor."""
    return drop_duplicated_whitespace(drop_leading_blank_lines(completion, cursor), cursor)


def postprocess_completion(completion: str, prefix: str, suffix: str, *, language_id: str = "", path: str = "",
                           truncated: bool = False) -> str:
    """The completion to insert at the cursor, given the text before (`prefix`) and after (`suffix`) it,
    the document's language (an LSP language id, else guessed from `path`), and whether generation ran out
    of tokens. Only the lines nearest the cursor matter, so prompt windows may be passed instead of whole
    files."""
    return postprocess_at(completion, cursor_at(prefix, suffix, syntax_for(language_id, path)), suffix,
                          truncated=truncated)


def postprocess_at(completion: str, cursor: Cursor, suffix: str, *, truncated: bool = False) -> str:
    rest = rest_of_line(suffix)
    if rest.strip():
        line = drop_duplicated_whitespace(first_line_only(completion), cursor)
        return strip_trailing_whitespace(drop_retyped_rest_of_line(line, rest))
    if truncated:
        completion = drop_unfinished_line(completion)
    completion = start_of_answer(completion, cursor)
    completion = cut_at_repeated_suffix(completion, cursor.line_before, suffix)
    completion = cut_at_block_end(completion, cursor)
    return strip_trailing_whitespace(completion)


def answer_is_complete(text: str, cursor: Cursor, suffix: str) -> bool:
    """Whether `text`, generated so far for a multi-line completion, already holds its whole answer: it
    has left the enclosing block (past its whole lines, the first non-blank character of a new line shows
    a dedent or a closing bracket), or its complete lines repeat the lines after the cursor."""
    answer = start_of_answer(text, cursor)
    if text.strip() and not answer.strip():
        return True  # its first line is already outside the block (drop_leading_blank_lines left nothing)
    if answer[block_end(answer, cursor) :].strip():
        return True
    expected = _following_lines(suffix)[:_CONFIRM_LINES]
    whole = (cursor.line_before + answer)[: (cursor.line_before + answer).rfind("\n") + 1]
    lines = [line.rstrip() for line in whole.split("\n") if line.strip()]
    return bool(expected) and any(lines[i : i + len(expected)] == expected for i in range(len(lines)))
