"""Completion post-processing: each rule on its own, then the whole chain on editor situations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgpt_code.prompts import postprocess_completion
from qgpt_code.prompts.blocks import cursor_at, syntax_for
from qgpt_code.prompts.postprocess import (
    cut_at_block_end,
    cut_at_repeated_suffix,
    drop_retyped_rest_of_line,
    first_line_only,
    indentation,
    rest_of_line,
    strip_trailing_whitespace,
)


@pytest.mark.parametrize(
    ("completion", "line_prefix", "suffix", "expected"),
    [
        # the model writes the body, then the return that is already there
        ("\n    y = x + 1\n    return y", "def f(x):", "\n    return y\n", "\n    y = x + 1"),
        # ... and goes on past it: the repeat is confirmed by the following lines
        ("\n    y = 1\n    return y\n\ndef g():\n    pass", "def f():", "\n    return y\n\ndef g():\n    pass\n",
         "\n    y = 1"),
        # a lone closing brace that the file already has
        ("\n  a();\n}", "function f() {", "\n}\n", "\n  a();"),
        # the inner brace is indented differently: not a repeat
        ("\n  if (x) {\n    a();\n  }", "function f() {", "\n}\n", "\n  if (x) {\n    a();\n  }"),
        # the completion's first line completes the cursor's line into the next line of the file
        ("return x", "    ", "\n    return x\n", ""),
        # truncated mid-repeat (max tokens): the partial last line still counts
        ("\n    y = 2\n    return res", "def f():", "\n    return result\n", "\n    y = 2"),
        # a finished line that merely starts like the next line is not a repeat
        ("\n    y = 2\n    return res\n", "def f():", "\n    return result\n", "\n    y = 2\n    return res\n"),
        # blank lines are ignored on both sides
        ("\n    a = 1\n\n    b = 2", "def f():", "\n\n    b = 2\n    c = 3\n", "\n    a = 1\n"),
        # the same line, followed by different code: the suffix is not being repeated
        ("\n    x += 1\n    log(x)", "def f():", "\n    x += 1\n    return x\n", "\n    x += 1\n    log(x)"),
        # nothing after the cursor
        ("\n    pass", "def f():", "", "\n    pass"),
    ],
)
def test_cut_at_repeated_suffix(completion, line_prefix, suffix, expected):
    assert cut_at_repeated_suffix(completion, line_prefix, suffix) == expected


@pytest.mark.parametrize(
    ("completion", "prefix", "suffix", "language", "expected"),
    [
        # inside a Python function: stop where the model dedents to module level
        ("\n    b = 2\n\ndef other():\n    pass", "def f():\n    a = 1", "\n    return b\n", "python",
         "\n    b = 2\n"),
        # at a block opener: the block is the one it opens
        ("\n        a()\n    else:\n        b()", "def f():\n    if x:", "\n        c()\n", "python",
         "\n        a()"),
        # inside call arguments: the closing bracket already exists
        ("\n    c,\n)", "f(\n    a,", "\n    b,\n)\n", "python", "\n    c,"),
        # module level, nothing written yet: a definition is the answer, not a new one
        ("\n\ndef g():\n    pass", "x = 1", "\ndef h():\n    pass\n", "python", "\n\ndef g():\n    pass"),
        # unknown language: the block is the one the next line after the cursor belongs to; tabs count
        ("\n\tx()\nend", "begin", "\n\ty()\n", "", "\n\tx()"),
        # the first line (the rest of the cursor's line) is never cut
        ("foo()\n    bar()", "        x = ", "\n        baz()\n", "", "foo()"),
    ],
)
def test_cut_at_block_end(completion, prefix, suffix, language, expected):
    assert cut_at_block_end(completion, cursor_at(prefix, suffix, syntax_for(language))) == expected


@pytest.mark.parametrize(
    ("line", "rest", "expected"),
    [
        ("a, b)", ")", "a, b"),  # auto-closed bracket typed again by a prefix-only model
        ("a, b):", "):", "a, b"),
        ("x[0]", "]", "x[0]"),  # the bracket belongs to the completion
        ("item['k']]", "]", "item['k']"),
        ("x = 5", " = 5", "x"),  # the file already has the space too
        ("x+5", "+5", "x"),
        ("1", "1", "1"),  # a completion that is only the rest of the line stays (nothing else to offer)
        ("value", ")", "value"),
        ("a)  ", ")", "a"),
    ],
)
def test_drop_retyped_rest_of_line(line, rest, expected):
    assert drop_retyped_rest_of_line(line, rest) == expected


def test_small_helpers():
    assert first_line_only("abc\ndef") == "abc" and first_line_only("\nabc") == ""
    assert rest_of_line(")\r\nnext") == ")" and rest_of_line("") == ""
    assert indentation("\t  x") == 6 and indentation("x") == 0 and indentation("   ") == 3
    assert strip_trailing_whitespace("a  \nb\t\r\n  c \n\n  ") == "a\nb\r\n  c"


@pytest.mark.parametrize(
    ("completion", "prefix", "suffix", "expected"),
    [
        # mid-line: one line only, minus the retyped closing bracket
        ("a, b)\n    return a", "result = add(", ")\nprint(result)\n", "a, b"),
        # end of line inside a function: multi-line, cut at the repeat and at trailing whitespace
        ("\n    total = sum(xs)  \n    return total\n", "def mean(xs):", "\n    return total / len(xs)\n",
         "\n    total = sum(xs)\n    return total"),
        ("\n    total = sum(xs)\n    return total / len(xs)\n\n\nprint(mean([1]))", "def mean(xs):",
         "\n    return total / len(xs)\n", "\n    total = sum(xs)"),
        # only spaces follow the cursor: that is not "the rest of the line"
        ("x + 1\n", "y = ", "   \n", "x + 1"),
        ("   \n\n", "x = 1", "\n", ""),
    ],
)
def test_postprocess_chain(completion, prefix, suffix, expected):
    assert postprocess_completion(completion, prefix, suffix) == expected


lines = st.lists(st.sampled_from(["", "x = 1", "    y()", "}", "  ", "\treturn z", "def f():"]), max_size=6)


@settings(max_examples=200, deadline=None)
@given(lines.map("\n".join), st.sampled_from(["", "    ", "def g():", "x = ("]), lines.map("\n".join))
def test_postprocessing_only_ever_shortens(completion, prefix, suffix):
    for language in ("python", "c", ""):
        result = postprocess_completion(completion, prefix, suffix, language_id=language)
        assert len(result) <= len(completion) and result == result.rstrip()
        lines = result.split("\n")
        written = [line.rstrip() for line in completion.split("\n")]
        assert lines[0].strip() in completion and all(line in written for line in lines[1:])
