"""Turning a raw model completion into what the editor inserts at the cursor.

Each rule is a small pure function; `postprocess_completion` applies them in order:
  - the cursor's line goes on after the cursor: keep the completion's first line only, minus a tail that
    types out again what already follows the cursor on that line;
  - otherwise: cut where the completion starts repeating the lines after the cursor, and, when the cursor
    is inside an indented block, where the completion leaves that block;
  - finally strip trailing whitespace.
"""

from __future__ import annotations

import re

_TRAILING_SPACE = re.compile(r"[ \t]+(?=\r?\n)")
_PAIRS = {")": "(", "]": "[", "}": "{"}
_CONFIRM_LINES = 3  # a repeat of the suffix must match this many lines (or all that there are)


def rest_of_line(suffix: str) -> str:
    """What follows the cursor on its line."""
    return re.split(r"\r\n|\r|\n", suffix, maxsplit=1)[0]


def line_before_cursor(prefix: str) -> str:
    """What precedes the cursor on its line."""
    return prefix[max(prefix.rfind("\n"), prefix.rfind("\r")) + 1 :]


def indentation(line: str) -> int:
    """Width of a line's leading whitespace, tabs counted as 4 columns."""
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip())


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


def cut_at_block_end(completion: str, suffix: str) -> str:
    """When the cursor is inside an indented block, end the completion before a line that leaves it.

    The block is the one the next non-blank line after the cursor belongs to: if that line is indented,
    the block goes on after the cursor, and a completion line indented less than it (a dedent, a closing
    `}` the file already has) is where the model starts writing code outside the block.
    """
    following = _following_lines(suffix)
    if not following or indentation(following[0]) == 0:
        return completion
    block = indentation(following[0])
    lines = _line_offsets(completion)
    for index in range(1, len(lines)):
        line = lines[index][1]
        if line.strip() and indentation(line) < block:
            return completion[: lines[index - 1][0]]
    return completion


def strip_trailing_whitespace(completion: str) -> str:
    """No spaces or tabs at the end of any line, no blank lines or whitespace at the end."""
    return _TRAILING_SPACE.sub("", completion).rstrip()


def postprocess_completion(completion: str, prefix: str, suffix: str) -> str:
    """The completion to insert at the cursor, given the text before (`prefix`) and after (`suffix`) it;
    only the lines nearest the cursor matter, so prompt windows may be passed instead of whole files."""
    rest = rest_of_line(suffix)
    if rest.strip():
        completion = drop_retyped_rest_of_line(first_line_only(completion), rest)
    else:
        completion = cut_at_repeated_suffix(completion, line_before_cursor(prefix), suffix)
        completion = cut_at_block_end(completion, suffix)
    return strip_trailing_whitespace(completion)
