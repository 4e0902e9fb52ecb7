"""LSP positions: UTF-16 columns, every line-break style, clamping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgpt_code.prompts import offset_at, position_at, split_at, split_at_range

TEXT = "a = '🙂x'\r\n名前 = 1\rb\n🙂🙂\n"


@pytest.mark.parametrize(
    ("line", "character", "before_cursor"),
    [
        (0, 0, ""),
        (0, 5, "a = '"),
        (0, 7, "a = '🙂"),  # the emoji is two UTF-16 units
        (0, 8, "a = '🙂x"),
        (0, 6, "a = '"),  # inside the surrogate pair: rounds down, never splits the emoji
        (0, 99, "a = '🙂x'"),  # past the end of the line: end of the line, before its \r\n
        (1, 1, "a = '🙂x'\r\n名"),  # CJK characters are one unit each
        (1, 2, "a = '🙂x'\r\n名前"),
        (2, 1, "a = '🙂x'\r\n名前 = 1\rb"),  # a lone \r ends a line
        (3, 2, "a = '🙂x'\r\n名前 = 1\rb\n🙂"),
        (3, 4, "a = '🙂x'\r\n名前 = 1\rb\n🙂🙂"),
        (4, 0, TEXT),
        (9, 3, TEXT),  # past the last line: end of the document
    ],
)
def test_offsets_count_utf16_units(line, character, before_cursor):
    before, after = split_at(TEXT, line, character)
    assert before == before_cursor and before + after == TEXT


def test_positions_are_the_inverse():
    assert position_at(TEXT, len("a = '🙂")) == (0, 7)
    assert position_at(TEXT, len("a = '🙂x'\r\n名前")) == (1, 2)
    assert position_at(TEXT, len(TEXT)) == (4, 0)
    assert position_at(TEXT, len("a = '🙂x'\r")) == (0, 9)  # between \r and \n: still the end of line 0


def test_negative_positions_are_rejected():
    with pytest.raises(ValueError):
        offset_at(TEXT, -1, 0)


def test_ranges_split_around_a_selection_in_either_order():
    assert split_at_range(TEXT, (1, 0), (1, 2)) == ("a = '🙂x'\r\n", "名前", " = 1\rb\n🙂🙂\n")
    assert split_at_range(TEXT, (1, 2), (1, 0)) == split_at_range(TEXT, (1, 0), (1, 2))


documents = st.lists(st.sampled_from(["a", "名", "🙂", " ", "\n", "\r\n", "\r", "x"]), max_size=30).map("".join)


@settings(max_examples=200, deadline=None)
@given(documents, st.data())
def test_every_offset_round_trips(text, data):
    offset = data.draw(st.integers(0, len(text)))
    if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n":
        offset -= 1  # the middle of a \r\n is not a position
    assert offset_at(text, *position_at(text, offset)) == offset
