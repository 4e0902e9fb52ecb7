"""`textDocument/inlineCompletion`: ghost text at the cursor, with latency discipline.

For each request, in order:
  1. the document's previous request, if still pending, is superseded: it answers empty at once and its
     generation is cancelled in the engine (an edit to the document does the same);
  2. before the backend is ready the answer is empty;
  3. a recent completion that the user is typing along answers at once (`cache.py`);
  4. otherwise the request waits `debounce_ms` (a newer request or an edit within it means no
     generation at all), then generates, post-processes, and remembers the completion.
`$/cancelRequest` cancels the handler's task, and with it the generation (pygls cancels an async
handler at its next await; the engine request is cancelled in `finally`).

When the rest of the line is only auto-closed brackets or quotes, the item replaces them (its `range`
runs to the end of the line and the text ends with them), which is how VS Code shows a suggestion in the
middle of a line and what Neovim overlays.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from lsprotocol import types

from qgpt_code.prompts import ContextFile

from qgpt_code.lsp.backend import CompletionInput
from qgpt_code.lsp.cache import CompletionCache
from qgpt_code.lsp.documents import Snapshot, is_auto_closed, rest_of_line

logger = logging.getLogger(__name__)


class Completer:
    """Completions at a cursor for every document: supersession, debounce, the cache, the counters."""

    def __init__(self, server):
        self.server = server
        self.cache = CompletionCache(server.settings.cache_size)
        self.counters: Counter[str] = Counter()
        self._pending: dict[str, asyncio.Task] = {}

    def supersede(self, uri: str) -> None:
        """Cancel the document's pending completion (its request answers empty)."""
        task = self._pending.pop(uri, None)
        if task is not None and not task.done():
            task.cancel()
            self.counters["superseded"] += 1

    async def complete(self, uri: str, position: types.Position) -> tuple[Snapshot, str] | None:
        """The completion to show at `position`, or None. Raises JSON-RPC errors for bad params."""
        snapshot = self.server.documents.snapshot(uri, position)
        self.counters["requests"] += 1
        self.supersede(uri)
        backend = self.server.runtime.available()
        if backend is None:
            self.counters["not_ready"] += 1
            return None
        cached = self.cache.lookup(uri, snapshot.before, snapshot.after)
        if cached is not None:
            self.counters["cache_hits"] += 1
            return snapshot, cached
        task = asyncio.ensure_future(self._generate(backend, snapshot))
        self._pending[uri] = task
        try:
            text = await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # $/cancelRequest for this very request
                self.counters["cancelled"] += 1
                raise
            return None  # superseded by a newer request or an edit: empty, at once
        except Exception as exc:  # the backend failed: shown once, answered empty
            logger.debug("completion failed", exc_info=True)
            self.counters["failed"] += 1
            self.server.runtime.failed(f"completion failed: {exc}")
            return None
        finally:
            if self._pending.get(uri) is task:
                del self._pending[uri]
        return snapshot, text

    async def _generate(self, backend, snapshot: Snapshot) -> str:
        settings = self.server.settings
        if settings.debounce_ms:
            await asyncio.sleep(settings.debounce_ms / 1000)
        others = tuple(ContextFile(path, text, language) for path, text, language
                       in self.server.documents.others(snapshot.uri, settings.other_files, snapshot.language_id))
        request = CompletionInput(snapshot.before, snapshot.after, snapshot.path, snapshot.language_id, others)
        generation = await backend.complete(request, settings)
        self.server.runtime.succeeded()
        self.cache.store(snapshot.uri, snapshot.before, snapshot.after, generation.text)
        return generation.text

    def stats(self) -> dict:
        return dict(self.counters)


def inline_items(snapshot: Snapshot, completion: str) -> list[types.InlineCompletionItem]:
    """The items for a completion at the snapshot's cursor (none for a blank completion)."""
    if not completion.strip():
        return []
    rest = rest_of_line(snapshot.after)
    if rest and is_auto_closed(rest) and "\n" not in completion:
        span = types.Range(start=snapshot.position(), end=snapshot.position(snapshot.offset + len(rest)))
        return [types.InlineCompletionItem(insert_text=completion + rest, range=span)]
    return [types.InlineCompletionItem(insert_text=completion)]


async def inline_completion(server, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    found = await server.completer.complete(params.text_document.uri, params.position)
    items = inline_items(*found) if found else []
    server.completer.counters["answered" if items else "empty"] += 1
    return types.InlineCompletionList(items=items)


def register(server) -> None:
    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def on_inline_completion(ls, params: types.InlineCompletionParams):
        return await inline_completion(ls, params)
