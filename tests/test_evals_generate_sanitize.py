"""Chat replies to completions: a table of realistic reply shapes, each run against the problem's own tests.

The programs here are written by this test (trusted), so they are exec'd in-process, in a fresh namespace.
"""

from __future__ import annotations

import pytest

from qgpt_code.evals.chat_reply import as_body, longest_parsable_prefix, sanitize_reply, truncate_at_stops
from qgpt_code.evals.data import load_problems
from qgpt_code.evals.prompting import CHAT_STOPS, HUMANEVAL_STOPS, chat_message, editor_view, make_request, single_line

PROBLEMS = load_problems()
UNIQUE = PROBLEMS["HumanEval/34"]  # def unique(l: list): sorted unique elements
CLOSE = PROBLEMS["HumanEval/0"]  # def has_close_elements(numbers, threshold)


def passes(problem, completion: str) -> bool:
    try:
        exec(compile(problem.program(completion), problem.task_id, "exec"), {"__name__": "sample"})
    except Exception:  # noqa: BLE001 - any failure is a failed sample
        return False
    return True


FENCED_WITH_PROSE_AFTER = """```python
def unique(l: list):
    return sorted(set(l))
```

This function converts the list to a set to remove duplicates, then sorts it."""

PROSE_BLOCK_AND_USAGE_BLOCK = """Sure! Here is the implementation:

```python
def unique(l: list):
    \"\"\"Return sorted unique elements in a list\"\"\"
    return sorted(set(l))
```

You can use it like this:

```python
print(unique([5, 3, 5, 2, 3, 3, 9, 0, 123]))
```"""

TESTS_IN_THE_SAME_BLOCK = """```python
def unique(l: list):
    return sorted(set(l))


# Test the function
print(unique([5, 3, 5, 2, 3, 3, 9, 0, 123]))
assert unique([1, 1]) == [1, 1]  # a wrong test the model made up: must not fail the sample
result = unique([3, 2])

if __name__ == "__main__":
    import doctest
    doctest.testmod()
```"""

BODY_ONLY_INDENTED = """```python
    seen = set(l)
    return sorted(seen)
```"""

BODY_FLUSH_LEFT = "```python\nreturn sorted(set(l))\n```"

BARE_CODE_AFTER_A_SENTENCE = """Here is the completed function:

def unique(l: list):
    return sorted(set(l))

It returns the sorted unique elements."""

CUT_OFF_AT_THE_TOKEN_LIMIT = """```python
def unique(l: list):
    return sorted(set(l))


def test_unique():
    assert unique([3, 3]) == [3]
    assert unique([5, 1, 5, 9"""

HELPER_AND_IMPORT = """```python
import math


def has_close_elements(numbers, threshold):  # parameters' types dropped
    return any(distance(a, b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])


def distance(a, b):
    return math.fabs(a - b)
```"""

RENAMED_PARAMETER = """```python
def unique(values: list):
    return sorted(set(values))
```"""

CRLF_AND_PY_TAG = "```py\r\ndef unique(l: list):\r\n    return sorted(set(l))\r\n```\r\n"

SHELL_BLOCK_FIRST = """First install nothing:

```bash
python3 -m pip --version
```

```python
def unique(l):
    return sorted(set(l))
```"""

ECHOES_THE_WHOLE_PROMPT = '```python\n' + UNIQUE.prompt.strip() + '\n    return sorted(set(l))\n```'

DECORATED_AND_CONSTANT = """```python
from functools import lru_cache

LIMIT = 10


@lru_cache(maxsize=None)
def unique_tuple(t):
    return tuple(sorted(set(t)))


def unique(l: list):
    return list(unique_tuple(tuple(l)))
```"""

UNITTEST_CLASS = """```python
import unittest


def unique(l: list):
    return sorted(set(l))


class TestUnique(unittest.TestCase):
    def test_wrong(self):
        self.assertEqual(unique([2, 2]), [2, 2])


unittest.main()
```"""

PROSE_ONLY = "I'm sorry, but I cannot help with that request without more context."

WRONG_ANSWER = "```python\ndef unique(l: list):\n    return l\n```"

TABLE = [
    # (name, problem, reply, passes the problem's tests)
    ("fenced function, prose after", UNIQUE, FENCED_WITH_PROSE_AFTER, True),
    ("prose, answer block, usage block", UNIQUE, PROSE_BLOCK_AND_USAGE_BLOCK, True),
    ("prints, asserts and a main guard in the block", UNIQUE, TESTS_IN_THE_SAME_BLOCK, True),
    ("the body only, indented", UNIQUE, BODY_ONLY_INDENTED, True),
    ("the body only, flush left", UNIQUE, BODY_FLUSH_LEFT, True),
    ("bare code between sentences", UNIQUE, BARE_CODE_AFTER_A_SENTENCE, True),
    ("unclosed block cut off mid-line", UNIQUE, CUT_OFF_AT_THE_TOKEN_LIMIT, True),
    ("a helper after the function, an import", CLOSE, HELPER_AND_IMPORT, True),
    ("a renamed parameter", UNIQUE, RENAMED_PARAMETER, True),
    ("CRLF line ends, py tag", UNIQUE, CRLF_AND_PY_TAG, True),
    ("a shell block before the python block", UNIQUE, SHELL_BLOCK_FIRST, True),
    ("the whole prompt echoed", UNIQUE, ECHOES_THE_WHOLE_PROMPT, True),
    ("decorator and a constant kept", UNIQUE, DECORATED_AND_CONSTANT, True),
    ("a unittest class and unittest.main()", UNIQUE, UNITTEST_CLASS, True),
    ("prose only", UNIQUE, PROSE_ONLY, False),
    ("a wrong answer stays wrong", UNIQUE, WRONG_ANSWER, False),
]


@pytest.mark.parametrize("name, problem, reply, expected", TABLE, ids=[row[0] for row in TABLE])
def test_sanitized_reply_runs_against_the_tests(name, problem, reply, expected):
    completion = sanitize_reply(reply, problem.prompt, problem.entry_point)
    assert passes(problem, completion) is expected, completion
    # nothing of the reply's prose, fences, test calls or main guard survives
    for leftover in ("```", "print(", "assert", "__main__", "Sure!", "This function", "install", "Test", "main()"):
        assert leftover not in completion, (leftover, completion)


def test_shapes_of_the_completion():
    # definitions: a blank line, then the reply's definitions (the prompt's function is replaced)
    assert sanitize_reply(FENCED_WITH_PROSE_AFTER, UNIQUE.prompt, "unique") == (
        "\ndef unique(l: list):\n    return sorted(set(l))\n"
    )
    # body: re-indented under the prompt's def; the test call after an indented body is dropped
    reply = "    y = sorted(set(l))\n    return y\nprint(unique([1]))\n"
    assert sanitize_reply(reply, UNIQUE.prompt, "unique") == "    y = sorted(set(l))\n    return y\n"
    assert sanitize_reply(PROSE_ONLY, UNIQUE.prompt, "unique") == ""
    # a prompt that is not complete Python on its own (no docstring) gets a placeholder body first
    assert sanitize_reply(FENCED_WITH_PROSE_AFTER, "def unique(l: list):\n", "unique").startswith("    pass\n\n")


def test_helpers():
    assert longest_parsable_prefix("x = 1\ny = (2,\n")[0] == "x = 1\n"
    assert longest_parsable_prefix("    indented\n") is None
    assert as_body("\treturn 1\n") == "    return 1\n"
    assert as_body("    x = 1\n    return (x,\n") == "    x = 1\n"  # a body cut off mid-statement
    assert as_body("    if x:\n        return (1,\n") == "    if x:\n        return (1,\n"  # nothing parses: as it is
    assert truncate_at_stops("    return 1\n\ndef g():\n", HUMANEVAL_STOPS) == "    return 1\n"
    assert truncate_at_stops("    return 1\n", HUMANEVAL_STOPS) == "    return 1\n"
    assert truncate_at_stops("a\n# c\nprint(1)", HUMANEVAL_STOPS) == "a"
    assert truncate_at_stops("```python\nx\n```\n\nThis", CHAT_STOPS) == "```python\nx\n"


def test_prompts():
    message = chat_message(UNIQUE)
    assert message.startswith("Please provide a self-contained Python script") and UNIQUE.prompt.strip() in message
    assert message.endswith("\n```\n")
    from qgpt_code.evals.infill_tasks import load_tasks

    task = load_tasks("single-line")["SingleLineInfilling/HumanEval/0/L0"]
    prefix, suffix = editor_view(task)
    # the cursor sits on an empty line where the masked line was: canonical line + that line break = the middle
    assert prefix == task.prompt and suffix == "\n" + task.suffix
    assert prefix + task.canonical_solution.rstrip("\n") + suffix == task.prompt + task.canonical_solution + task.suffix
    # the language server's single-line rule: a line break ends generation only when the cursor's line goes on
    assert single_line("x)\nmore") and not single_line("\n    return y\n") and not single_line("")
    request = make_request(task, 0, "infill", max_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    assert request.stop == () and (request.prefix, request.suffix) == (prefix, suffix)


def test_generation_over_http_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, qgpt_code.evals.generate, qgpt_code.evals.backends, qgpt_code.evals.cli; "
            "print(sorted(m for m in ('torch', 'sentencepiece', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
