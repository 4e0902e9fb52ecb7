"""Completions a programmer would accept (issue 18): every post-processing rule on real snippets in
Python, JavaScript/TypeScript, Go, Rust and C, and the early stop that ends generation where the rules cut."""

from __future__ import annotations

import pytest
from prompt_fixtures import llama_tokenizer

from qgpt_code.prompts import completion_prompt, postprocess_completion
from qgpt_code.prompts.blocks import closers_ahead, cursor_at, open_brackets, syntax_for

# The Neovim case of issue 18: the cursor on the empty, auto-indented line of a function body, two blank
# lines and another function below; what the default model wrote there.
NEOVIM_PREFIX = "import math\n\n\ndef area_of_circle(radius):\n    "
NEOVIM_SUFFIX = "\n\n\ndef main():\n    print(area_of_circle(2.0))\n"
NEOVIM_RAW = ("\n    return math.pi * radius ** 2\n\n\ndef calculate_area_of_circle():\n    radius = 5\n"
              "    return area_of_circle(radius)\n\n\ndef main():\n    print('The area is")


def prompt_for(prefix, suffix, language):
    return completion_prompt(llama_tokenizer(), prefix, suffix, language_id=language)


def complete(raw, prefix, suffix, language, **options):
    return postprocess_completion(raw, prefix, suffix, language_id=language, **options)


def test_the_neovim_case_fills_the_body_and_nothing_else():
    assert complete(NEOVIM_RAW, NEOVIM_PREFIX, NEOVIM_SUFFIX, "python") == "return math.pi * radius ** 2"
    # the same without a language id: the path's extension says Python
    assert postprocess_completion(NEOVIM_RAW, NEOVIM_PREFIX, NEOVIM_SUFFIX, path="shapes.py") == (
        "return math.pi * radius ** 2")


@pytest.mark.parametrize(
    ("language", "prefix", "suffix", "raw", "expected"),
    [
        # -- leading blank lines on an empty line: the suggestion starts on the cursor's line
        ("python", "def f(xs):\n    ", "\n", "\n\n    return sorted(xs)\n", "return sorted(xs)"),
        ("go", "func f() int {\n\t", "\n}\n", "\n\treturn 1\n}", "return 1"),
        # ... at column 0 the first line keeps the indentation it was written with
        ("python", "def f(xs):\n", "\n", "\n    return xs\n", "    return xs"),
        # ... and a first line indented less than the cursor is outside the block: nothing to insert
        ("python", "def f(xs):\n    ", "\n\n\ndef g():\n    pass\n", "\ndef h():\n    pass", ""),
        # ... at column 0 inside a function, a first line at column 0 is outside it (what the default model
        # wrote for a HumanEval span)
        ("python", "def f(xs):\n    ys = sorted(xs)\n", "\n    return ys\n", "def g(xs):\n    return xs", ""),
        ("python", "def f(xs):\n    ys = sorted(xs)\n", "\n", "```\n\nThe function sorts", ""),
        ("go", "func f() {\n", "\n}\n", "func g() {\n}", ""),
        # -- whitespace the cursor's line already has (the 5-space indent)
        ("python", "def f(xs):\n    ", "\n", " return len(xs)", "return len(xs)"),
        ("typescript", "const total = ", "\n", " items.length;", "items.length;"),
        # ... unless the line above opens a block at the cursor's column: the body goes deeper
        ("python", "def f(x):\n    if x:\n    ", "\n", "    return 1\n    return 0", "    return 1"),
        # -- a dedent past the enclosing block (indented languages)
        ("python", "class A:\n    def f(self):\n        ", "\n\n    def g(self):\n        pass\n",
         "x = 1\n        return x\n\n    def h(self):\n        pass", "x = 1\n        return x"),
        # -- a closing bracket the file already has: the completion ends before it
        ("javascript", "function add(a, b) {\n  ", "\n}\n", "return a + b;\n}\n\nfunction sub(a, b) {",
         "return a + b;"),
        ("go", "func main() {\n\tfor i := 0; i < 3; i++ {\n\t\t", "\n\t}\n}\n",
         "fmt.Println(i)\n\t}\n}", "fmt.Println(i)"),
        ("rust", "fn area(r: f64) -> f64 {\n    ", "\n}\n", "std::f64::consts::PI * r * r\n}\n\nfn main() {",
         "std::f64::consts::PI * r * r"),
        ("c", "int sum(int *xs, int n) {\n    int s = 0;\n    ", "\n}\n",
         "for (int i = 0; i < n; i++) s += xs[i];\n    return s;\n}\n\nint main(void) {",
         "for (int i = 0; i < n; i++) s += xs[i];\n    return s;"),
        ("python", "total = add(\n    1,\n", "\n)\n", "    2,\n    3,\n)\nprint(total)", "    2,\n    3,"),
        # ... on the completion's line after its own code: ends before the bracket, keeps the code
        ("typescript", "const xs = [\n  1,\n  ", "\n];\n", "2, 3];\nconsole.log(xs);", "2, 3"),
        # -- a closing bracket the file lacks: the block is complete after that line
        ("javascript", "function add(a, b) {\n  ", "\n\nfunction mul(a, b) {\n  return a * b;\n}\n",
         "return a + b;\n}\n\nfunction sub(a, b) {\n  return a - b;\n}", "return a + b;\n}"),
        ("c", "static int twice(int x) {\n    ", "", "return 2 * x;\n}\n\nint main(void) {\n    return 0;\n}",
         "return 2 * x;\n}"),
        # -- brackets in strings and comments do not count
        ("javascript", "function f() {\n  ", "\n}\n", "const s = \"}\"; // {\n  return s;\n}",
         "const s = \"}\"; // {\n  return s;"),
        ("c", "int f(void) {\n    ", "\n}\n", "/* } */ return '}';\n}", "/* } */ return '}';"),
        ("python", "def f():\n    ", "\n", "s = ')'  # (\n    return s\ndef g():", "s = ')'  # (\n    return s"),
        # -- a new top-level definition: at module level, after the first one
        ("python", "import os\n\n", "\n", "def a():\n    return 1\n\n\ndef b():\n    return 2",
         "def a():\n    return 1"),
        ("go", "package main\n\n", "\n", "func a() int {\n\treturn 1\n}\n\nfunc b() int {",
         "func a() int {\n\treturn 1\n}"),
        ("rust", "use std::fmt;\n\n", "\n", "#[derive(Debug)]\nstruct P;\n\nfn main() {}",
         "#[derive(Debug)]\nstruct P;"),
        # ... or inside a block, when the completion starts one without closing the block
        ("typescript", "export function f(): number {\n  ", "\n", "return 1;\nexport const x = 2;", "return 1;"),
        # ... while an indented statement is no definition at all
        ("python", "def f():\n    ", "\n", "for x in y:\n        print(x)\n    return y", "for x in y:\n"
         "        print(x)\n    return y"),
        # -- the cursor's line goes on after the cursor: one line, whitespace and retyped tail dropped
        ("python", "result = add(", ")\n", "a, b)\n    more()", "a, b"),
        ("c", "    int n = ", ";\n", " count(xs);", "count(xs)"),
    ],
)
def test_rules_on_real_snippets(language, prefix, suffix, raw, expected):
    assert complete(raw, prefix, suffix, language) == expected


@pytest.mark.parametrize(
    ("language", "prefix", "raw", "expected"),
    [
        ("python", "def f(xs):\n    ", "total = 0\n    for x in xs:\n        total += x\n    return tot",
         "total = 0\n    for x in xs:\n        total += x"),
        ("rust", "fn f() -> u32 {\n    ", "let a = 1;\n    let b = a + 2;\n    a.checked_", "let a = 1;\n    let b = a + 2;"),
        ("go", "func f() {\n\t", "x := compu", "x := compu"),  # the cursor's line alone stays: it is typed along
    ],
)
def test_ran_out_of_tokens_keeps_whole_lines(language, prefix, raw, expected):
    assert complete(raw, prefix, "\n", language, truncated=True) == expected
    assert complete(raw, prefix, "\n", language, truncated=False).startswith(expected)


def test_the_cursor_analysis():
    python, c = syntax_for("python"), syntax_for("c")
    assert syntax_for("", "a/b.rs").name == "rust" and syntax_for("TypeScriptReact").name == "javascript"
    assert syntax_for("cobol").name == ""  # unknown: the generic rules
    assert open_brackets("int f(void) {\n  if (x) {\n    g(\"{\");\n", c) == ["{", "{"]
    assert closers_ahead("\n  }\n}\nint g() { return 0; }\n", c) == ["}", "}"]
    neovim = cursor_at(NEOVIM_PREFIX, NEOVIM_SUFFIX, python)
    assert (neovim.block_indent, neovim.in_block, neovim.wants_indent, neovim.closers) == (4, True, False, ())
    opener = cursor_at("def f(x):\n    if x:\n    ", "\n", python)
    assert (opener.block_indent, opener.wants_indent) == (5, True)
    module = cursor_at("import os\n\n", "\n", python)
    assert (module.block_indent, module.in_block) == (None, False)


def engine_checks(text: str):
    """The lengths at which the engine calls `stop_when` for `text`, as SamplingParams documents: after a
    line break, and after the first non-blank character of a new line (character by character here,
    which is the finest tokenization)."""
    line_start = 0
    for end in range(1, len(text) + 1):
        char = text[end - 1]
        if char == "\n":
            line_start = end
            yield end
        elif not char.isspace() and not text[line_start : end - 1].strip():
            yield end


@pytest.mark.parametrize(
    ("language", "prefix", "suffix", "raw", "stops_before"),
    [
        ("python", NEOVIM_PREFIX, NEOVIM_SUFFIX, NEOVIM_RAW, "ef calculate"),
        # what the default model wrote for HumanEval/0's body: nothing inside the function at all
        ("python", NEOVIM_PREFIX, NEOVIM_SUFFIX, "\n\n# Example usage:\nprint(area_of_circle(1.0))", " Example"),
        ("javascript", "function add(a, b) {\n  ", "\n}\n", "return a + b;\n}\n\nfunction sub(a, b) {", "\n\nfunction"),
        ("go", "func f() {\n\t", "\n", "x := 1\n\tuse(x)\n}\n\nfunc g() {\n}", "func g"),
        ("c", "int f(void) {\n    ", "\n}\n", "return 0;\n}\nint g(void) {", "\nint g"),
        # the completion retypes the function's last lines, which the file already has
        ("python", "def f(a, b):\n    ", "\n    c = a + b\n    return c\n",
         "d = a * b\n    c = a + b\n    return c\n\nprint(f(1, 2))", "\n\nprint"),
    ],
)
def test_stop_when_ends_generation_where_the_answer_is_complete(language, prefix, suffix, raw, stops_before):
    prompt = prompt_for(prefix, suffix, language)
    stop_at = next(end for end in engine_checks(raw) if prompt.stop_when(raw[:end]))
    assert stop_at <= raw.index(stops_before) + 1  # at the first character that shows the block is done
    assert prompt.postprocess(raw[:stop_at]) == prompt.postprocess(raw) == complete(raw, prefix, suffix, language)
    assert not any(prompt.stop_when(raw[:end]) for end in engine_checks(raw) if end < stop_at)


def test_single_line_completions_leave_stopping_to_the_line_break():
    prompt = prompt_for("x = add(", ")\n", "python")
    assert prompt.single_line and not prompt.stop_when("1, 2)\n\ndef g():")
