"""pygls' protocol with the gaps the specification and a hostile client expose closed.

1. The lifecycle (LSP 3.17, "Lifecycle Messages"). A request before `initialize` is answered with
   ServerNotInitialized (-32002) and a notification then is dropped (`exit` excepted); after
   `shutdown`, a request gets InvalidRequest (-32600) instead of pygls' silence. `exit_code` is what
   the process should exit with: 0 once `shutdown` was received, 1 otherwise (pygls computes the same
   but its `start_io` swallows the SystemExit that carries it).
2. Bad messages. A request whose id is neither a number nor a string gets InvalidRequest with a null id
   (JSON-RPC 2.0); one whose params do not fit the method's type gets "invalid params" (-32602) naming
   the problem (pygls would drop it and leave the client waiting); a notification with bad params is
   logged in one line and dropped. No traceback is logged or sent for any of these, nor for a handler
   that refuses a request with a JSON-RPC error (a document that is not open): the client is told.
3. `$/cancelRequest` for commands. `workspace/executeCommand` runs the command through a generator, so
   cancelling the request does not reach the command's coroutine. Commands register their task
   (`track_command`) and a cancel notification for that request cancels it too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol

logger = logging.getLogger(__name__)


@dataclass
class MalformedRequest:
    """A request that cannot be handled as sent; answered with `error`."""

    id: Any
    method: str
    error: JsonRpcException
    jsonrpc: str = "2.0"


@dataclass
class MalformedNotification:
    """A notification whose params could not be read; logged and dropped."""

    method: str
    problem: str
    jsonrpc: str = "2.0"


class QGPTProtocol(LanguageServerProtocol):
    def __init__(self, server, converter):
        super().__init__(server, converter)
        self._command_tasks: dict[Any, asyncio.Task] = {}
        self.initialize_received = False

    @property
    def shutdown_received(self) -> bool:
        return self._shutdown

    @property
    def exit_code(self) -> int:
        """0 after an orderly `shutdown`, 1 when the client exited or went away without one."""
        return 0 if self._shutdown else 1

    # -- reading messages ----------------------------------------------------------------------------
    def structure_message(self, data: dict[str, Any]):
        """Called by pygls' JSON reader for every JSON object; only whole messages are structured."""
        if not isinstance(data, dict) or "jsonrpc" not in data or not isinstance(data.get("method"), str):
            return super().structure_message(data)  # a nested object, or a response from the client
        method = data["method"]
        if "id" in data and not _valid_id(data["id"]):
            error = JsonRpcInvalidRequest(f"{method}: a request id must be an integer or a string")
            return MalformedRequest(None, method, error)
        kind = self.get_message_type(method)
        if kind is None:  # an unknown method: pygls answers "method not found" or ignores the notification
            return super().structure_message(data)
        try:
            return self._converter.structure(data, kind)
        except Exception as exc:  # cattrs' validation errors, or anything a hostile value provokes
            problem = f"invalid params for {method}: {_describe(exc)}"
            if "id" in data:
                return MalformedRequest(data["id"], method, JsonRpcInvalidParams(problem))
            return MalformedNotification(method, problem)

    def handle_message(self, message):
        if isinstance(message, MalformedNotification):
            logger.warning("%s (notification dropped)", message.problem)
            return
        method = getattr(message, "method", None)
        is_request = method is not None and hasattr(message, "id")
        refusal = self._refusal(method) if method is not None else None
        if refusal is not None:
            if is_request:
                self._send_response(message.id, None, refusal.to_response_error())
            logger.info("%s: %s", method, refusal.message)
            return
        if isinstance(message, MalformedRequest):
            logger.warning("request %r refused: %s", message.id, message.error.message)
            self._send_response(message.id, None, message.error.to_response_error())
            return
        if method == types.INITIALIZE:
            self.initialize_received = True
        super().handle_message(message)

    def _refusal(self, method: str) -> JsonRpcException | None:
        """Why a message may not be handled in the current lifecycle state, or None."""
        if method == types.EXIT:
            return None
        if not self.initialize_received and method != types.INITIALIZE:
            return JsonRpcServerNotInitialized("the server is not initialized: send `initialize` first")
        if self._shutdown:
            return JsonRpcInvalidRequest("the server is shutting down: only `exit` is accepted")
        return None

    # -- answering -----------------------------------------------------------------------------------
    def _send_response(self, msg_id, result=None, error=None):
        if msg_id is None and error is not None:  # JSON-RPC: a request whose id could not be read gets id null
            self._send_data({"jsonrpc": self.VERSION, "id": None, "error": self._converter.unstructure(error)})
            return
        super()._send_response(msg_id, result, error)

    def _send_handler_result(self, future, *, msg_id):
        """A handler that refused its request with a JSON-RPC error (invalid params, a document that is
        not open) is the client's mistake: answered and logged in one line, without pygls' traceback."""
        error = None if future.cancelled() else future.exception()
        if isinstance(error, JsonRpcException):
            self._request_futures.pop(msg_id, None)
            logger.info("request %r refused: %s", msg_id, error.message)
            self._send_response(msg_id, error=error.to_response_error())
            return
        super()._send_handler_result(future, msg_id=msg_id)

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


def _valid_id(value: Any) -> bool:
    """JSON-RPC ids are strings or integers (JSON numbers without a fraction; not booleans)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


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
