"""A running `qgpt serve` as the backend, so several editors share one GPU.

Completions go to `POST /infill` (llama.cpp's shape: input_prefix, input_suffix, input_extra), where the
server builds the same editor-context prompt the in-process backend builds; edits and questions go to
`POST /v1/chat/completions`. Both are streamed, so cancelling the awaiting task closes the connection and
the server cancels the generation (its streams cancel their job when the client goes away). The key is
sent as `Authorization: Bearer KEY`. No tokenizer lives here: edit prompts are sized with
`prompts.estimate_tokens`.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Sequence

from qgpt_code.prompts import EditRequest, Message, edit_dialog_within, estimate_tokens

from qgpt_code.lsp.backend import (
    BackendError,
    CompletionInput,
    Generation,
    GenerationLog,
    GenerationRecord,
    OnTokens,
    Progress,
    finish,
    postprocess,
)
from qgpt_code.lsp.documents import rest_of_line
from qgpt_code.lsp.settings import Settings

MAX_CONTEXT_CHARS = 1_000_000  # the server refuses bodies over 2 MB by default; the prompt uses far less


class HttpBackend:
    def __init__(self, url: str, api_key: str = "", timeout: float = 120.0):
        base = url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        if not base.startswith(("http://", "https://")):
            raise BackendError(f"server URL must start with http:// or https://, got {url!r}")
        self.base = base
        self.api_key = api_key
        self.timeout = timeout
        self.description = base
        self.log = GenerationLog()
        self.client = None
        self.model_id: str | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def start(self, progress: Progress) -> None:
        import httpx

        progress(f"connecting to {self.base}", None)
        self.client = httpx.AsyncClient(base_url=self.base, headers=self._headers(),
                                        timeout=httpx.Timeout(self.timeout, connect=10.0))
        try:
            response = await self.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach {self.base}: {str(exc) or type(exc).__name__}") from None
        if response.status_code != 200:
            raise BackendError(f"{self.base}/v1/models answered {response.status_code}: {_error_message(response)}")
        models = response.json().get("data") or [{}]
        self.model_id = models[0].get("id")
        self.description = f"{self.model_id} at {self.base}"

    # -- generation ------------------------------------------------------------------------------
    async def complete(self, request: CompletionInput, settings: Settings) -> Generation:
        record = self.log.start("complete")
        text = await self._stream("/infill", infill_body(request, settings), record, _infill_piece)
        # the raw text, trimmed here exactly as in process (the server stops it early with the same rule)
        return Generation(postprocess(text, request, record.finish_reason), record.finish_reason)

    async def edit(self, request: EditRequest, settings: Settings, on_tokens: OnTokens) -> Generation:
        dialog = edit_dialog_within(request, estimate_tokens, settings.edit_budget)
        return await self.chat(dialog, settings, on_tokens, kind="edit")

    async def chat(self, dialog: Sequence[Message], settings: Settings, on_tokens: OnTokens,
                   kind: str = "chat") -> Generation:
        body = {
            "messages": [dict(m) for m in dialog],
            "max_tokens": settings.edit_max_tokens,
            "temperature": settings.edit_temperature,
            "top_p": settings.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model_id:
            body["model"] = self.model_id
        record = self.log.start(kind)
        text = await self._stream("/v1/chat/completions", body, record, _chat_piece, on_tokens)
        return Generation(text, record.finish_reason)

    async def _stream(self, route: str, body: dict, record: GenerationRecord, piece,
                      on_tokens: OnTokens | None = None) -> str:
        """POST a streaming request and gather its text. Server-sent events: `data: {json}` lines."""
        import httpx

        if self.client is None:
            raise BackendError("not connected")
        parts: list[str] = []
        try:
            async with self.client.stream("POST", route, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise BackendError(f"{route} answered {response.status_code}: {_error_message(response)}")
                async for chunk in _sse(response.aiter_lines()):
                    if "error" in chunk:
                        raise BackendError(f"{route}: {chunk['error'].get('message', chunk['error'])}")
                    text, done = piece(chunk, record)
                    if text:
                        parts.append(text)
                        record.completion_tokens += 1
                        if on_tokens is not None:
                            on_tokens(record.completion_tokens)
                    if done:
                        break
        except httpx.HTTPError as exc:
            finish(record, "error")
            raise BackendError(f"{self.base}{route}: {str(exc) or type(exc).__name__}") from None
        except BackendError:
            finish(record, "error")
            raise
        except asyncio.CancelledError:  # leaving the `async with` closed the stream: the server cancels
            finish(record, "cancelled")
            raise
        finish(record, "stop" if record.finish_reason == "running" else None)
        return "".join(parts)

    # -- the rest of the protocol ----------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def stats(self, recent: int = 20) -> dict:
        return {**self.log.summary(recent), "server": self.base, "model": self.model_id}

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    def stop(self) -> None:
        """Nothing runs here: the server cancels a generation when its connection closes with the process."""


def infill_body(request: CompletionInput, settings: Settings) -> dict:
    """The /infill request for a completion: the server builds the in-process backend's prompt from it.

    The whole text before the cursor goes in `input_prefix` (`prompt`, which llama.vim uses for the
    cursor's line, stays empty), `path` and `language` (our extensions) are what the in-process backend
    passes to `completion_prompt`, each other file carries its `language` too, and the budget follows
    from `n_predict` as in process (`prompts.completion_budget`; the server's `--infill-budget` stands for
    the `contextBudget` setting, both 2,048 by default)."""
    body = {
        "input_prefix": request.prefix[-MAX_CONTEXT_CHARS:],
        "input_suffix": request.suffix[:MAX_CONTEXT_CHARS],
        "prompt": "",
        "input_extra": [{"filename": f.path, "text": f.text[:MAX_CONTEXT_CHARS], "language": f.language_id}
                        for f in request.other_files],
        "path": request.path,
        "language": request.language_id,
        "n_predict": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "stream": True,
    }
    if rest_of_line(request.suffix).strip():  # one line: stop at its end, as in process
        body["stop"] = ["\n"]
    return body


async def _sse(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            raise BackendError(f"the server sent an unreadable event: {data[:200]!r}") from None


def _infill_piece(chunk: dict, record: GenerationRecord) -> tuple[str, bool]:
    """llama.cpp's /infill stream: {"content", "stop": false} chunks, then one with "stop": true and totals."""
    if chunk.get("stop"):
        record.finish_reason = chunk.get("finish_reason") or ("length" if chunk.get("stop_type") == "limit" else "stop")
        record.prompt_tokens = chunk.get("tokens_evaluated", 0)
        record.cached_tokens = chunk.get("tokens_cached", 0)
        return chunk.get("content", ""), True
    return chunk.get("content", ""), False


def _chat_piece(chunk: dict, record: GenerationRecord) -> tuple[str, bool]:
    """OpenAI's chat stream: choices[0].delta.content, a finish_reason, then a usage-only chunk."""
    usage = chunk.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens", 0)
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        record.completion_tokens = usage.get("completion_tokens", record.completion_tokens)
    choices = chunk.get("choices") or []
    if not choices:
        return "", False
    choice = choices[0]
    if choice.get("finish_reason"):
        record.finish_reason = choice["finish_reason"]
    return (choice.get("delta") or {}).get("content") or "", False


def _error_message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:
        return response.text[:300] or response.reason_phrase
