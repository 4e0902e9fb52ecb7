"""The language server's settings: one typed dataclass, a docstring per field.

Settings arrive in `initializationOptions` and `workspace/didChangeConfiguration`, either flat or under a
`qgpt` section, with snake_case or camelCase names (`max_tokens` or `maxTokens`). A value of the wrong
type or out of range is reported (once per change) and the previous value is kept; unknown names are
reported too, so a typo does not go unnoticed. docs/lsp.md lists the fields; a test checks that it and
the VS Code extension's `package.json` list every one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

SECTION = "qgpt"


def _limits(low: float | None = None, high: float | None = None, choices: tuple[str, ...] = ()) -> dict:
    return {"low": low, "high": high, "choices": choices}


@dataclass(frozen=True)
class Settings:
    """What a user can tune from the editor. CLI flags (`qgpt lsp --server URL ...`) give the defaults."""

    max_tokens: int = field(default=64, metadata=_limits(1, 4096))
    """Most new tokens one inline completion may generate (at most half the model's context window)."""

    temperature: float = field(default=0.2, metadata=_limits(0, 2))
    """Sampling temperature for completions; 0 is greedy (the same suggestion every time)."""

    top_p: float = field(default=0.95, metadata=_limits(0.01, 1))
    """Nucleus sampling mass for completions and edits."""

    debounce_ms: int = field(default=150, metadata=_limits(0, 5000))
    """Milliseconds to wait after a completion request before generating. A newer request for the same
    document within that time replaces the older one, which is answered empty without generating."""

    context_budget: int = field(default=2048, metadata=_limits(64, 32768))
    """Most prompt tokens of editor context for a completion (lowered to leave room for the completion
    in the model's context window). With `serverUrl` the server decides (`qgpt serve`'s infill budget)."""

    other_files: int = field(default=2, metadata=_limits(0, 16))
    """How many other open documents (most recently edited first) may be offered as context; they come
    first in the prompt and take at most half the budget (docs/prompts.md). 0 turns this off."""

    cache_size: int = field(default=32, metadata=_limits(0, 1024))
    """Recent completions remembered, so that typing along a suggestion is answered at once without
    generating again. 0 turns the cache off."""

    completion_fallback: str = field(default="auto", metadata=_limits(choices=("auto", "always", "never")))
    """`textDocument/completion` items for clients without inline completion: "auto" answers only
    clients that did not declare inline-completion support, "always" answers every client, "never" none."""

    edit_max_tokens: int = field(default=512, metadata=_limits(1, 8192))
    """Most new tokens for the reply to `qgpt.editSelection` and `qgpt.chat` (at most half the model's
    context window)."""

    edit_temperature: float = field(default=0.2, metadata=_limits(0, 2))
    """Sampling temperature for edits and chat answers."""

    edit_budget: int = field(default=3072, metadata=_limits(64, 32768))
    """Most prompt tokens for an edit or chat request (instruction, selection and surrounding code),
    lowered to leave room for the reply in the model's context window."""

    edit_presets: tuple[str, ...] = ("Add type hints", "Add a docstring", "Simplify this code")
    """Instructions offered as ready-made code actions on a selection, besides "QGPT: Edit selection..."."""

    server_url: str = ""
    """Empty: generate in this process with the model given on the command line. Otherwise the URL of a
    running `qgpt serve` (e.g. http://gpu-box:8000), so several editors share one GPU."""

    api_key: str = ""
    """Bearer key for `serverUrl` (`qgpt serve --api-key`)."""

    request_timeout: float = field(default=120.0, metadata=_limits(1, 3600))
    """Seconds one generation may take before it is abandoned (and cancelled on the server)."""

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _convert(name: str, value: Any) -> Any:
    """The value for field `name`, converted and checked; ValueError with a message otherwise."""
    spec = FIELDS[name]
    default = spec.default
    limits = spec.metadata
    if value is None:
        raise ValueError("expected a value, got null")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"expected an integer, got {value!r}")
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError(f"expected a list of non-empty strings, got {value!r}")
        value = tuple(v.strip() for v in value)
    low, high, choices = limits.get("low"), limits.get("high"), limits.get("choices")
    if low is not None and value < low or high is not None and value > high:
        raise ValueError(f"must be between {low:g} and {high:g}, got {value!r}")
    if choices and value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_settings(data: Any, base: Settings) -> tuple[Settings, list[str]]:
    """`base` updated from a settings object; also the problems found (each kept the previous value).

    `data` may be None, a flat mapping, or a mapping with the settings under "qgpt"."""
    if data is None:
        return base, []
    if not isinstance(data, Mapping):
        return base, [f"settings must be an object, got {type(data).__name__}"]
    if isinstance(data.get(SECTION), Mapping):
        data = data[SECTION]
    changes: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in data.items():
        name = _snake(str(key))
        if name not in FIELDS:
            problems.append(f"{key}: unknown setting")
            continue
        try:
            changes[name] = _convert(name, value)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    return base.replace(**changes), problems


def field_docs() -> list[tuple[str, str, Any]]:
    """(name, docstring, default) for every field, read from this module's source (the docstrings
    under each field are the documentation)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return [(f.name, docs.get(f.name, ""), f.default) for f in dataclasses.fields(Settings)]
