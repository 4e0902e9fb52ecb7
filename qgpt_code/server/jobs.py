"""One HTTP request's generations: submitted together, read as one merged event stream, cancelled together."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from qgpt_code.engine import Engine, Request, RequestHandle
from qgpt_code.errors import QGPTError
from qgpt_code.generation import TokenEvent
from qgpt_code.server.errors import APIError, from_qgpt_error
from qgpt_code.server.metrics import Metrics
from qgpt_code.server.prompting import Prompt


@dataclass
class Choice:
    """One generation of a job, as it accumulates."""

    index: int
    prompt_index: int
    prompt: Prompt
    handle: RequestHandle
    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)  # events that carry a token (for logprobs)
    finish_reason: str | None = None


class Job:
    def __init__(self, engine: Engine, work: Sequence[tuple[Prompt, list[Request]]], metrics: Metrics,
                 prompt_field: str, id_prefix: str = "cmpl"):
        """Submit every request or none: if the engine refuses one (full queue, prompt too long), the
        ones already queued are cancelled and the refusal becomes an APIError."""
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.metrics = metrics
        self.choices: list[Choice] = []
        self.cancelled = False  # by this side (the client went away, the stream ended early), not by a shutdown
        try:
            for prompt_index, (prompt, requests) in enumerate(work):
                for request in requests:
                    handle = engine.submit(request)
                    self.choices.append(Choice(len(self.choices), prompt_index, prompt, handle))
        except QGPTError as exc:
            self.cancel()
            raise from_qgpt_error(exc, prompt_field) from None

    def cancel(self) -> None:
        """Stop every generation still running (the client went away, or the response ended early)."""
        self.cancelled = True
        for choice in self.choices:
            if not choice.handle.done:
                choice.handle.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """Every choice's events, in the order they arrive, until all have finished. Read it once."""
        queue: asyncio.Queue[tuple[Choice, TokenEvent]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for event in choice.handle:
                self._record(choice, event)
                queue.put_nowait((choice, event))

        # Held here because a reader may stop early (client gone): the pumps go on to each handle's
        # final event, which a cancel() brings within one engine step, so every finish is recorded.
        self._pumps = [asyncio.create_task(pump(choice)) for choice in self.choices]
        running = len(self.choices)
        while running:
            choice, event = await queue.get()
            running -= event.finish_reason is not None
            yield choice, event

    async def run(self) -> None:
        """Read every event to the end; an APIError if the engine failed or shut down meanwhile (a job
        this side cancelled just ends)."""
        async for _ in self.events():
            pass
        for choice in self.choices:
            failure = self.failure(choice)
            if failure is not None:
                raise failure

    def failure(self, choice: Choice) -> APIError | None:
        if choice.finish_reason == "error":
            return APIError(500, f"the engine failed: {choice.handle.error}", code="engine_error")
        if choice.finish_reason == "cancelled" and not self.cancelled:
            return APIError(503, "the generation was cancelled: the server is shutting down", code="shutting_down")
        return None

    def usage(self) -> dict:
        """OpenAI's usage block. A prompt sampled n times counts once, with the first choice's cache hits."""
        first = {}
        for choice in self.choices:
            first.setdefault(choice.prompt_index, choice.handle)
        prompt = sum(h.prompt_tokens for h in first.values())
        completion = sum(c.handle.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(h.cached_tokens for h in first.values())}}

    def _record(self, choice: Choice, event: TokenEvent) -> None:
        choice.text += event.text
        if event.token_id is not None:
            choice.tokens.append(event)
        if event.finish_reason:
            choice.finish_reason = event.finish_reason
            self.metrics.generation_finished(choice.handle, event.finish_reason)
