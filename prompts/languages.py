"""How to write a one-line comment in a language, keyed by LSP language identifier.

Prompts label the current file and other open files with a path comment ("# Path: app.py"), written in
the file's own comment syntax so the model reads it as code it has seen before.
"""

from __future__ import annotations

_HASH = ("python", "shellscript", "sh", "bash", "ruby", "perl", "r", "yaml", "toml", "dockerfile",
         "makefile", "cmake", "powershell", "elixir", "julia", "nim", "coffeescript", "ini", "properties")
_SLASHES = ("c", "cpp", "objective-c", "objective-cpp", "csharp", "java", "javascript", "javascriptreact",
            "typescript", "typescriptreact", "go", "rust", "swift", "kotlin", "scala", "dart", "php", "groovy",
            "zig", "jsonc", "proto", "solidity", "verilog", "fsharp")
_DASHES = ("lua", "sql", "haskell", "ada", "elm", "purescript")

_COMMENT_STYLES: dict[str, tuple[str, str]] = {
    **{language: ("# ", "") for language in _HASH},
    **{language: ("// ", "") for language in _SLASHES},
    **{language: ("-- ", "") for language in _DASHES},
    **{language: ("<!-- ", " -->") for language in ("html", "xml", "markdown", "vue", "svelte")},
    **{language: ("/* ", " */") for language in ("css", "scss", "less")},
    **{language: ("% ", "") for language in ("latex", "tex", "erlang", "matlab")},
    **{language: ("; ", "") for language in ("clojure", "lisp", "scheme", "asm")},
    "vim": ('" ', ""),
}
_DEFAULT_STYLE = ("# ", "")  # unknown languages: "#" is a comment in the most file types we do not list


def comment_line(language_id: str, text: str) -> str:
    """`text` as a one-line comment in `language_id`, with its line break."""
    opening, closing = _COMMENT_STYLES.get(language_id.lower(), _DEFAULT_STYLE)
    return f"{opening}{text}{closing}\n"


def path_header(path: str, language_id: str) -> str:
    """The comment line that names a file at the head of its text in a prompt; empty without a path."""
    return comment_line(language_id, f"Path: {path}") if path else ""
