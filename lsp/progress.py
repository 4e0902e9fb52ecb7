"""Work-done progress (`$/progress`) for long work: loading the model, generating an edit or an answer.

The token is the one the client sent with its request (`workDoneToken`) or one the server creates with
`window/workDoneProgress/create` when the client declared `window.workDoneProgress`; a client with
neither simply sees no progress. A cancellable progress calls `on_cancel` when the user presses cancel
(`window/workDoneProgress/cancel`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable

from lsprotocol import types

logger = logging.getLogger(__name__)

CREATE_TIMEOUT = 5.0  # seconds to wait for the client to accept a progress token


class WorkDone:
    def __init__(self, server, title: str, *, token: types.ProgressToken | None = None, cancellable: bool = False):
        self.server = server
        self.title = title
        self.token = token
        self.cancellable = cancellable
        self.active = False
        self._cancel_callbacks: list[Callable[[], None]] = []

    def _client_supports_progress(self) -> bool:
        window = self.server.client_capabilities.window
        return bool(window and window.work_done_progress)

    async def begin(self, message: str | None = None, percentage: int | None = None) -> "WorkDone":
        progress = self.server.work_done_progress
        if self.token is None:
            if not self._client_supports_progress():
                return self
            self.token = f"qgpt-{uuid.uuid4().hex[:12]}"
            try:
                await asyncio.wait_for(progress.create_async(self.token), CREATE_TIMEOUT)
            except Exception as exc:  # the client refused or did not answer: go on without progress
                logger.info("window/workDoneProgress/create failed: %s", exc)
                self.token = None
                return self
        progress.begin(self.token, types.WorkDoneProgressBegin(
            title=self.title, cancellable=self.cancellable, message=message, percentage=percentage))
        self.active = True
        future = progress.tokens.get(self.token)
        if future is not None and self.cancellable:
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda f: f.cancelled() and loop.call_soon_threadsafe(self._cancelled))
        return self

    def _cancelled(self) -> None:
        for callback in self._cancel_callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        self._cancel_callbacks.append(callback)

    def report(self, message: str | None = None, percentage: int | None = None) -> None:
        if self.active:
            self.server.work_done_progress.report(self.token, types.WorkDoneProgressReport(
                message=message, percentage=percentage, cancellable=self.cancellable or None))

    def end(self, message: str | None = None) -> None:
        if self.active:
            self.active = False
            self.server.work_done_progress.end(self.token, types.WorkDoneProgressEnd(message=message))
            self.server.work_done_progress.tokens.pop(self.token, None)
