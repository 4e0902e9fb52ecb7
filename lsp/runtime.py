"""The backend in use: started in the background once the client is initialized, swapped when the
backend settings change, and its failures shown to the user once rather than on every keystroke.

Until the backend is ready, features answer empty (no error storm while a model loads). A failure is
shown with `window/showMessage` the first time; later failures go only to `window/logMessage` and
stderr until a generation succeeds again. A server backend that could not be reached is tried again
on demand, at most every RETRY_SECONDS; a model that failed to load is not reloaded until the
settings change.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable

from lsprotocol import types

from qgpt_code.lsp.backend import Backend
from qgpt_code.lsp.progress import WorkDone
from qgpt_code.lsp.settings import Settings

logger = logging.getLogger(__name__)

RETRY_SECONDS = 10.0


class Runtime:
    def __init__(self, server, make_backend: Callable[[Settings], Backend]):
        self.server = server
        self.make_backend = make_backend
        self.backend: Backend | None = None
        self.state = "idle"  # idle -> starting -> ready | failed
        self.error: str | None = None
        self._key: tuple | None = None
        self._task: asyncio.Task | None = None
        self._starting: Backend | None = None  # made, not yet ready (for `stop`)
        self._failed_at = 0.0
        self._failure_shown = False
        self.failures = 0

    @staticmethod
    def key(settings: Settings) -> tuple:
        """The settings that choose and configure the backend; a change restarts it."""
        url = settings.server_url.strip()
        return (url, settings.api_key, settings.request_timeout) if url else ("",)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self) -> None:
        """(Re)start the backend for the current settings, in the background."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.state = "starting"
        self._task = asyncio.ensure_future(self._start(self.server.settings))

    def configure(self, settings: Settings) -> None:
        """Settings changed: restart the backend if the ones that choose it changed."""
        if self.state != "idle" and self.key(settings) != self._key:
            self.start()

    def available(self) -> Backend | None:
        """The backend when it is ready, else None (retrying an unreachable server now and then)."""
        if self.state == "ready":
            return self.backend
        if (self.state == "failed" and self._key and self._key[0]
                and time.monotonic() - self._failed_at > RETRY_SECONDS):
            self.start()
        return None

    async def _start(self, settings: Settings) -> None:
        old, self.backend = self.backend, None
        if old is not None:
            await old.close()
        self._key = self.key(settings)
        progress = WorkDone(self.server, "QGPT")
        try:
            backend = self._starting = self.make_backend(settings)
            await progress.begin(f"starting {backend.description}", 0)
            await backend.start(progress.report)
        except asyncio.CancelledError:
            progress.end("restarting")
            raise
        except Exception as exc:
            self.state, self.error, self._failed_at = "failed", str(exc), time.monotonic()
            progress.end("failed")
            self.failed(f"could not start the backend: {exc}")
            return
        self.backend, self.state, self.error = backend, "ready", None
        self._starting = None
        self._failure_shown = False
        progress.end("ready")
        self.log(f"QGPT: ready ({backend.description})")

    def failed(self, message: str) -> None:
        """A backend failure: shown to the user once, then only logged until a success."""
        self.failures += 1
        self.log(f"QGPT: {message}", types.MessageType.Error)
        if not self._failure_shown:
            self._failure_shown = True
            self.server.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Error, message=f"QGPT: {message}"))

    def succeeded(self) -> None:
        self._failure_shown = False

    def log(self, message: str, kind: types.MessageType = types.MessageType.Info) -> None:
        print(message, file=sys.stderr, flush=True)
        try:
            self.server.window_log_message(types.LogMessageParams(type=kind, message=message))
        except Exception:  # no client connected (unit tests)
            logger.debug("could not send window/logMessage", exc_info=True)

    def stop(self) -> None:
        """Stop every backend now, from outside the event loop, when the connection has ended.

        Without this the engine's thread may still be inside torch when the interpreter finalizes;
        CPython then ends such a daemon thread with pthread_exit, whose unwinding through torch's
        C++ frames calls std::terminate ("terminate called without an active exception", SIGABRT)."""
        for backend in (self.backend, self._starting):
            if backend is not None:
                backend.stop()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.backend is not None:
            backend, self.backend = self.backend, None
            self.state = "idle"
            await backend.close()
