"""pygls' protocol with two gaps closed.

1. Malformed params. pygls structures each message while parsing it; when a request's params do not fit
   the method's type it logs the error and drops the message, so the client waits forever. Here such a
   request gets a JSON-RPC "invalid params" error (-32602) naming the problem, and the server goes on.
2. `$/cancelRequest` for commands. `workspace/executeCommand` runs the command through a generator, so
   cancelling the request does not reach the command's coroutine. Commands register their task
   (`track_command`) and a cancel notification for that request cancels it too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol

logger = logging.getLogger(__name__)


@dataclass
class MalformedRequest:
    """A request whose params could not be read; answered with `error`."""

    id: Any
    method: str
    error: JsonRpcException
    jsonrpc: str = "2.0"


class QGPTProtocol(LanguageServerProtocol):
    def __init__(self, server, converter):
        super().__init__(server, converter)
        self._command_tasks: dict[Any, asyncio.Task] = {}

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "id" in data and isinstance(data.get("method"), str):
                detail = exc.__cause__ or exc
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {_describe(detail)}")
                return MalformedRequest(data["id"], data["method"], error)
            raise

    def handle_message(self, message):
        if isinstance(message, MalformedRequest):
            logger.warning("malformed %s request %s: %s", message.method, message.id, message.error)
            self._send_response(message.id, None, message.error.to_response_error())
            return
        super().handle_message(message)

    # -- commands and $/cancelRequest --------------------------------------------------------------
    def track_command(self, task: asyncio.Task) -> None:
        """Let `$/cancelRequest` for the current request cancel `task`."""
        msg_id = self.msg_id
        if msg_id is None:
            return
        self._command_tasks[msg_id] = task
        task.add_done_callback(lambda _: self._command_tasks.pop(msg_id, None))

    def _handle_cancel_notification(self, msg_id):
        super()._handle_cancel_notification(msg_id)
        task = self._command_tasks.pop(msg_id, None)
        if task is not None:
            task.cancel()


def _describe(error: BaseException) -> str:
    """A short message from a cattrs validation error (which nests the real causes)."""
    messages = []

    def walk(exc: BaseException) -> None:
        inner = getattr(exc, "exceptions", None)
        if inner:
            for sub in inner:
                walk(sub)
        else:
            note = "; ".join(getattr(exc, "__notes__", []) or [])
            messages.append(f"{exc}" + (f" ({note})" if note else ""))

    walk(error)
    return "; ".join(messages)[:500] or type(error).__name__
