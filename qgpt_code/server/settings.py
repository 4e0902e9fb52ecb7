"""What `create_app` needs besides the engine: the served name, the key, the defaults and the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qgpt_code.generation import SamplingParams


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    """The name clients pass as `model`; `GET /v1/models` lists it and any other name is a 404."""
    api_key: str | None = None
    """When set, every route but `/health` needs `Authorization: Bearer <api_key>`."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Defaults for the sampling fields a request leaves out (`qgpt serve`'s sampling options)."""
    max_body_bytes: int = 2 << 20
    """Larger request bodies are refused with 413 before they are parsed."""
    max_choices: int = 16
    """Completions one request may ask for: prompts × n."""
    request_timeout: float | None = None
    """Seconds a generation may run from submission; past it, it ends with finish_reason "timeout"."""
    infill_budget: int = 2048
    """Most prompt tokens `/infill` spends on editor context (less when the context window is smaller)."""
    allowed_origins: tuple[str, ...] = ()
    """Origins whose browser pages may call the API (CORS); `*` for any. None by default."""


def default_model_id(path: Path) -> str:
    """A file's stem or a directory's name: `SmolLM2-135M-Instruct.Q4_1`, `CodeLlama-7b-hf`."""
    path = Path(path)
    return path.stem if path.is_file() else path.name
