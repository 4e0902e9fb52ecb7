"""LSP positions (line, UTF-16 code unit) to and from Python string offsets.

LSP counts a line's characters in UTF-16 code units by default, so an emoji (outside the Basic
Multilingual Plane) counts 2 while a CJK character counts 1. Lines end at "\\n", "\\r\\n" or "\\r".
Out-of-range positions are clamped as the LSP specification asks: a character past the end of its line
means the end of that line, a line past the end of the document means the end of the document.
"""

from __future__ import annotations

import bisect
import itertools
import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# str.splitlines (fast, in C) also breaks at these, which LSP does not count as line ends.
_OTHER_BREAKS = "\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def line_starts(text: str) -> list[int]:
    """The string offset at which each line begins (always at least one line)."""
    if any(char in text for char in _OTHER_BREAKS):
        return [0, *(match.end() for match in _LINE_BREAK.finditer(text))]
    starts = [0, *itertools.accumulate(map(len, text.splitlines(keepends=True)))]
    if text and text[-1] not in "\r\n":
        starts.pop()  # the last line has no break, so nothing starts after it
    return starts


def line_end(text: str, starts: list[int], line: int) -> int:
    """Offset just past the last character of `line`, before its line break."""
    if line + 1 < len(starts):
        end = starts[line + 1]
        return end - 2 if text.startswith("\r\n", end - 2) else end - 1
    return len(text)


def _utf16_units(char: str) -> int:
    return 2 if ord(char) > 0xFFFF else 1


def offset_at(text: str, line: int, character: int) -> int:
    """The string offset of an LSP position. A `character` that falls inside a surrogate pair rounds down
    to the start of that character, so a position never splits an emoji."""
    if line < 0 or character < 0:
        raise ValueError(f"negative position ({line}, {character})")
    starts = line_starts(text)
    if line >= len(starts):
        return len(text)
    offset, end, units = starts[line], line_end(text, starts, line), 0
    while offset < end:
        units += _utf16_units(text[offset])
        if units > character:
            break
        offset += 1
    return offset


def position_at(text: str, offset: int) -> tuple[int, int]:
    """The LSP position (line, UTF-16 character) of a string offset (the inverse of `offset_at`)."""
    offset = max(0, min(offset, len(text)))
    starts = line_starts(text)
    line = bisect.bisect_right(starts, offset) - 1
    line_offset = min(offset, line_end(text, starts, line))
    return line, sum(_utf16_units(char) for char in text[starts[line] : line_offset])


def split_at(text: str, line: int, character: int) -> tuple[str, str]:
    """The document split at the cursor: (text before it, text after it)."""
    offset = offset_at(text, line, character)
    return text[:offset], text[offset:]


def split_at_range(text: str, start: tuple[int, int], end: tuple[int, int]) -> tuple[str, str, str]:
    """The document split around a selection given as LSP positions: (before, selected, after)."""
    first, last = offset_at(text, *start), offset_at(text, *end)
    if last < first:
        first, last = last, first
    return text[:first], text[first:last], text[last:]

