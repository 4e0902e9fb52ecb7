"""Turning a chat model's reply to a HumanEval problem into a completion (the text that follows the prompt).

Chat models answer in many shapes: a fenced function followed by an explanation, prose before the block,
a second block with usage examples, test code (`print(...)`, `assert ...`, an `if __name__ == "__main__":`
guard) in the same block, only the body, bare code without fences, a block cut off at the token limit.
The completion is built in two shapes:

- **definitions**, when the reply's code defines the entry point at top level: the reply's imports, function
  and class definitions (but not `def test_...` or `class Test...`) and constant assignments (nothing with a
  call), after a blank line; calls, prints, asserts, loops and `if __name__ == "__main__":` are dropped.
  The program is then `prompt + completion + tests`: the prompt's own function (its docstring is a complete
  body) is replaced by the reply's definition, so a reply that renamed a parameter still runs.
- **body**, when it does not: the code is taken as the function's body, re-indented under the prompt's
  `def` (4 spaces), with top-level code after an indented body (test calls) dropped.

Every step is a small pure function; `tests/test_evals_generate_sanitize.py` runs them on a table of
realistic replies. Nothing here imports a model.
"""

from __future__ import annotations

import ast
import textwrap

from qgpt_code.prompts.edit_reply import extract_code

_KEPT_STATEMENTS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
BODY_INDENT = "    "


def reply_code(reply: str) -> str:
    """The Python code of a reply (the first fitting fenced block, or bare code once prose is removed)."""
    code = extract_code(reply, "python") or ""
    return code.replace("\r\n", "\n").replace("\r", "\n")


def longest_parsable_prefix(code: str) -> tuple[str, ast.Module] | None:
    """The longest run of whole lines from the start of `code` that parses (a reply cut off mid-statement
    loses its broken tail), with its syntax tree; None when no non-empty prefix parses."""
    lines = code.splitlines(keepends=True)
    for end in range(len(lines), 0, -1):
        text = "".join(lines[:end])
        if not text.strip():
            break
        try:
            return text, ast.parse(text)
        except (SyntaxError, ValueError):  # ValueError: a NUL byte
            continue
    return None


def defines(module: ast.Module, name: str) -> bool:
    """Whether the module defines function `name` at top level."""
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in module.body)


def _is_constant_assignment(node: ast.stmt) -> bool:
    """`LIMIT = 10`, `VOWELS: str = "aeiou"`: an assignment that runs nothing (no call anywhere in it)."""
    if not isinstance(node, (ast.Assign, ast.AnnAssign)) or getattr(node, "value", None) is None:
        return False
    return not any(isinstance(child, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)) for child in ast.walk(node))


def is_test_definition(node: ast.stmt) -> bool:
    """`def test_...` (pytest) and `class Test...` (unittest): the model's own tests."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name.startswith("test")
    return isinstance(node, ast.ClassDef) and node.name.startswith("Test")


def kept_statement(node: ast.stmt) -> bool:
    """Definitions stay, except the model's own tests; code that runs at import time (test calls, prints, a
    __main__ guard, loops) goes."""
    if isinstance(node, _KEPT_STATEMENTS):
        return not is_test_definition(node)
    return _is_constant_assignment(node)


def definitions(code: str, module: ast.Module) -> str:
    """The source of the module's kept top-level statements, decorators included, separated by blank lines."""
    lines = code.splitlines()
    pieces = []
    for node in module.body:
        if not kept_statement(node):
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        pieces.append("\n".join(lines[first - 1 : node.end_lineno]).rstrip())
    return "\n\n".join(pieces)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def as_body(code: str) -> str:
    """Code meant as the function's body, indented under the prompt's `def`.

    When the code starts indented, a later line at column 0 begins top-level code (a test call) and ends
    the body. Blank edge lines are dropped; tabs count as 4 columns.
    """
    lines = [line.rstrip() for line in code.expandtabs(4).splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        return ""
    if _indent_of(lines[0]) > 0:
        end = next((i for i, line in enumerate(lines) if line and _indent_of(line) == 0), len(lines))
        lines = lines[:end]
    while lines and not lines[-1]:
        lines.pop()
    body = textwrap.indent(textwrap.dedent("\n".join(lines)), BODY_INDENT) + "\n"
    return longest_parsable_body(body)


def longest_parsable_body(body: str) -> str:
    """The longest run of whole lines from the start of an indented body that parses as a function body
    (a body cut off mid-statement loses its broken tail); the body unchanged when no prefix parses."""
    lines = body.splitlines(keepends=True)
    for end in range(len(lines), 0, -1):
        text = "".join(lines[:end])
        try:
            ast.parse("def _():\n" + text)
        except (SyntaxError, ValueError):
            continue
        return text if text.endswith("\n") else text + "\n"
    return body


def prompt_has_body(prompt: str) -> bool:
    """Whether the prompt is complete Python on its own (HumanEval's are: the docstring is the body)."""
    try:
        ast.parse(prompt)
    except (SyntaxError, ValueError):
        return False
    return True


def sanitize_reply(reply: str, prompt: str, entry_point: str) -> str:
    """The completion a chat reply amounts to for a problem (see the module docstring for the two shapes)."""
    code = reply_code(reply)
    parsed = longest_parsable_prefix(code)
    if parsed is not None and defines(parsed[1], entry_point):
        text, module = parsed
        placeholder = "" if prompt_has_body(prompt) else BODY_INDENT + "pass\n"  # a prompt ending in `def f():`
        return placeholder + "\n" + definitions(text, module) + "\n"
    return as_body(code)


def truncate_at_stops(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Text up to the first occurrence of any stop sequence (servers that ignore `stop` get the same result)."""
    cut = min((i for i in (text.find(stop) for stop in stops if stop) if i >= 0), default=len(text))
    return text[:cut]
