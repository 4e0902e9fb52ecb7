"""What the features need from a model, as one small protocol with two implementations:

  EngineBackend (engine_backend.py)  the model in this process, through the shared serving Engine
  HttpBackend   (http_backend.py)    a running `qgpt serve`: /infill and /v1/chat/completions

Cancellation is asyncio's: cancelling the task awaiting `complete`, `edit` or `chat` stops the
generation where it runs (the engine request is cancelled; the HTTP stream is closed, which the server
turns into a cancelled job). Every generation is recorded in a `GenerationLog`, which `qgpt.stats` and
the tests read: generations started, how they ended, prompt tokens served from the prefix cache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from qgpt_code.errors import QGPTError
from qgpt_code.prompts import ContextFile, EditRequest, Message, postprocess_completion

from qgpt_code.lsp.settings import Settings

Progress = Callable[[str, int | None], None]  # (message, percentage or None)
OnTokens = Callable[[int], None]  # completion tokens so far


class BackendError(QGPTError):
    """The backend could not generate (unreachable server, HTTP error, engine failure, overload)."""


@dataclass(frozen=True)
class CompletionInput:
    """The text around the cursor, and other documents offered as context."""

    prefix: str
    suffix: str
    path: str = ""
    language_id: str = ""
    other_files: tuple[ContextFile, ...] = ()


@dataclass
class GenerationRecord:
    """One generation: what it was for and how it went. `finish_reason` is "running" until it ends;
    for the engine it is the engine's own verdict ("stop", "length", "cancelled", ...)."""

    id: int
    kind: str  # "complete", "edit" or "chat"
    started_at: float
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    completion_tokens: int = 0
    finish_reason: str = "running"
    seconds: float | None = None
    source: Any = field(default=None, repr=False)  # e.g. the engine's RequestHandle, read when reporting

    def refresh(self) -> None:
        handle = self.source
        if handle is not None:
            self.cached_tokens = handle.cached_tokens
            self.completion_tokens = handle.completion_tokens
            if handle.finish_reason is not None:
                self.finish_reason = handle.finish_reason
                self.source = None  # final: let the handle go

    def as_dict(self) -> dict:
        self.refresh()
        return {"id": self.id, "kind": self.kind, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "seconds": self.seconds}


class GenerationLog:
    """Every generation a backend started: totals, plus the most recent records."""

    def __init__(self, keep: int = 256):
        self.keep = keep
        self.records: deque[GenerationRecord] = deque()
        self.started = 0
        self._retired = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}
        self._retired_reasons: dict[str, int] = {}

    def start(self, kind: str, prompt_tokens: int = 0, source: Any = None) -> GenerationRecord:
        self.started += 1
        record = GenerationRecord(self.started, kind, time.monotonic(), prompt_tokens, source=source)
        self.records.append(record)
        if len(self.records) > self.keep:  # fold the oldest into the totals
            old = self.records.popleft().as_dict()
            for key in self._retired:
                self._retired[key] += old[key]
            self._retired_reasons[old["finish_reason"]] = self._retired_reasons.get(old["finish_reason"], 0) + 1
        return record

    def summary(self, recent: int = 20) -> dict:
        records = [r.as_dict() for r in self.records]
        totals = dict(self._retired)
        reasons = dict(self._retired_reasons)
        for r in records:
            reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
            for key in totals:
                totals[key] += r[key]
        return {"generations_started": self.started, "finish_reasons": reasons, **totals,
                "recent": records[-recent:] if recent > 0 else []}


def finish(record: GenerationRecord, finish_reason: str | None = None) -> None:
    record.seconds = time.monotonic() - record.started_at
    if finish_reason is not None:
        record.finish_reason = finish_reason


def postprocess(text: str, request: CompletionInput, finish_reason: str) -> str:
    """The editor's trimming of a completion, the same call in both backends: over the whole document's
    text (the rules read only the lines near the cursor), so it does not depend on where a backend's
    prompt windows begin; `finish_reason` "length" means the last line may be unfinished."""
    return postprocess_completion(text, request.prefix, request.suffix, language_id=request.language_id,
                                  path=request.path, truncated=finish_reason == "length")


@dataclass(frozen=True)
class Generation:
    text: str  # for completions: already post-processed for insertion at the cursor
    finish_reason: str


class Backend(Protocol):
    """A model the features can use. Methods are coroutines; cancel the awaiting task to stop one."""

    description: str  # for messages: "SmolLM2-135M-Instruct.Q4_1 (in process)", "http://host:8000"
    log: GenerationLog

    async def start(self, progress: Progress) -> None:
        """Load the model or reach the server. Raises QGPTError with a message for the user."""

    async def complete(self, request: CompletionInput, settings: Settings) -> Generation:
        """An inline completion at the cursor, post-processed for insertion."""

    async def edit(self, request: EditRequest, settings: Settings, on_tokens: OnTokens) -> Generation:
        """The model's raw reply to an edit request (the caller parses the code out of it)."""

    async def chat(self, dialog: Sequence[Message], settings: Settings, on_tokens: OnTokens) -> Generation:
        """The model's reply to a dialog."""

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` (exact in process; an estimate over HTTP)."""

    def stats(self, recent: int = 20) -> dict:
        """Counters for `qgpt.stats`: the generation log (with the `recent` newest records), plus the
        engine's own statistics if local."""

    async def close(self) -> None:
        """Stop generating and free the model or the connection."""

    def stop(self) -> None:
        """Stop generating at once, without an event loop: the process is about to exit."""
