"""Cutting text at line boundaries to fit a token budget, keeping the part nearest the cursor.

`count` is any function from text to a token count (the caller passes the encoding its prompt uses).
Lines are counted one at a time or a block at a time, then every window is checked with an exact count
of its whole text before it is returned, so a window never exceeds its budget. A single line longer than
the whole budget is cut inside the line, keeping the characters nearest the cursor.
"""

from __future__ import annotations

from typing import Callable, Iterator

from qgpt_code.prompts.positions import line_starts

Count = Callable[[str], int]


def longest_fitting_tail(count: Count, text: str, budget: int) -> int:
    """The smallest offset `s` with `count(text[s:]) <= budget` (binary search; the count of a tail
    grows with its length up to tokenization noise, and the returned offset is always one that fits)."""
    low, high = 0, len(text)  # text[high:] == "" always fits
    while low < high:
        middle = (low + high) // 2
        if count(text[middle:]) <= budget:
            high = middle
        else:
            low = middle + 1
    return high


def longest_fitting_head(count: Count, text: str, budget: int) -> int:
    """The largest offset `e` with `count(text[:e]) <= budget` (the mirror of `longest_fitting_tail`)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def head_window_end(count: Count, text: str, budget: int, *, allow_partial_line: bool = True) -> int:
    """Where a window over the start of `text` ends: after as many whole lines as fit in `budget`.

    Used for the text after the cursor (its first line is the rest of the cursor's line) and for other
    files. When not even the first line fits, the window keeps the first line's head, or nothing when
    `allow_partial_line` is False.
    """
    starts = [*line_starts(text)[1:], len(text)]  # where each line (with its break) ends
    end, used = 0, 0
    for line_end in starts:
        if line_end == end:
            break
        cost = count(text[end:line_end])
        if used + cost > budget:
            break
        end, used = line_end, used + cost
    while end > 0 and count(text[:end]) > budget:  # per-line counts can undercount the joined text
        end = max(start for start in (0, *starts) if start < end)
    if end == 0 and allow_partial_line:
        first_line = text[: starts[0]]
        return longest_fitting_head(count, first_line, budget)
    return end


def tail_window_start(count: Count, text: str, budget: int, block_chars: int, line_allowance: int = 0) -> int:
    """Where a window over the end of `text` (the text before the cursor) begins.

    Two rules keep the window's first line put while the user types, so each prompt shares its beginning
    with the previous one (what the engine's prefix cache reuses):
      - the window begins at the first line of a block, a block being the lines that start within the same
        `block_chars`-long stretch of the text; block boundaries are fixed in the document, so the window
        gives up a whole block at a time instead of one line every few keystrokes;
      - the line being typed is charged `line_allowance` tokens (or its real count once it outgrows that),
        so typing within a line never moves the window; only finishing lines does.
    When not even the block holding the cursor fits, smaller blocks are tried (halving down to single
    lines), then a cut inside the cursor's line that keeps the characters nearest the cursor.
    """
    starts = line_starts(text)
    cursor_line = len(starts) - 1
    typed = count(text[starts[cursor_line] :])
    if typed > budget:
        return starts[cursor_line] + longest_fitting_tail(count, text[starts[cursor_line] :], budget)
    line_cost = max(typed, min(line_allowance, budget))
    size = max(1, block_chars)
    while True:
        blocks = _block_first_lines(starts, cursor_line, size)
        taken = [next(blocks)]
        used = count(text[starts[taken[0]] : starts[cursor_line]]) + line_cost
        if used <= budget:
            for above in blocks:
                cost = count(text[starts[above] : starts[taken[-1]]])
                if used + cost > budget:
                    break
                taken.append(above)
                used += cost
            while taken and count(text[starts[taken[-1]] :]) > budget:  # separate counts can undercount
                taken.pop()
            if taken:
                return starts[taken[-1]]
        size //= 2  # at 1, the cursor's line alone is a block, and it fits


def _block_first_lines(starts: list[int], line: int, size: int) -> Iterator[int]:
    """The first line of the block holding `line`, then of each block above it, upwards."""
    while line >= 0:
        block = starts[line] // size
        while line > 0 and starts[line - 1] // size == block:
            line -= 1
        yield line
        line -= 1
