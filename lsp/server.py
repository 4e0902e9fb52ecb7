"""The QGPT language server: state on one `QGPTServer` object, features registered module by module.

  documents       open documents, positions in the negotiated encoding (pygls syncs them incrementally)
  runtime         the backend, started in the background; failures shown once
  inline          textDocument/inlineCompletion (supersession, debounce, cache)
  completion      textDocument/completion fallback for clients without inline completion
  edit            code actions and qgpt.editSelection
  chat            qgpt.chat
  here            lifecycle, settings, document events and qgpt.stats

`initialize` is answered at once; the backend starts after `initialized`. The handlers below are thin:
they call plain functions in the feature modules.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from qgpt_code.lsp import chat, completion, edit, inline
from qgpt_code.lsp.backend import Backend
from qgpt_code.lsp.documents import Documents
from qgpt_code.lsp.protocol import QGPTProtocol
from qgpt_code.lsp.runtime import Runtime
from qgpt_code.lsp.settings import Settings, parse_settings

logger = logging.getLogger(__name__)

STATS_COMMAND = "qgpt.stats"


class QGPTServer(LanguageServer):
    """The language server and everything its features share."""

    def __init__(self, defaults: Settings, make_backend: Callable[[Settings], Backend]):
        from qgpt_code import __version__

        super().__init__("qgpt", __version__, text_document_sync_kind=types.TextDocumentSyncKind.Incremental,
                         protocol_cls=QGPTProtocol)
        self.settings = defaults
        self.documents = Documents(self)
        self.runtime = Runtime(self, make_backend)
        self.completer = inline.Completer(self)

    def apply_settings(self, data: Any) -> None:
        """Settings from the client; problems are shown once per change, valid values still apply."""
        settings, problems = parse_settings(data, self.settings)
        self.settings = settings
        self.completer.cache.resize(settings.cache_size)
        if problems:
            self.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Warning, message="QGPT: ignored settings: " + "; ".join(problems)))
        self.runtime.configure(settings)

    def report_server_error(self, error: Exception, source) -> None:
        """Errors outside a request (a malformed notification, unreadable JSON): logged, never shown per
        keystroke. Request errors are already answered as JSON-RPC errors."""
        logger.error("%s: %s", getattr(source, "__name__", source), error)

    @property
    def exit_code(self) -> int:
        """What the process exits with once the connection ends: 0 after `shutdown`, else 1 (LSP's `exit`)."""
        return self.protocol.exit_code

    def stop(self) -> None:
        """Stop the backend at once, after the event loop has ended: see `Runtime.stop`."""
        self.runtime.stop()

    def stats(self, recent: int = 20) -> dict:
        """`qgpt.stats`: the backend's state and counters, the requests' outcomes, the settings in force."""
        backend = self.runtime.backend
        return {
            "state": self.runtime.state,
            "ready": self.runtime.ready,
            "error": self.runtime.error,
            "backend": backend.description if backend else None,
            "backend_failures": self.runtime.failures,
            "requests": self.completer.stats(),
            "cache_hits": self.completer.cache.hits,
            "settings": {k: v for k, v in vars(self.settings).items() if k != "api_key"},
            **(backend.stats(recent) if backend else {}),
        }


def build_server(defaults: Settings, make_backend: Callable[[Settings], Backend]) -> QGPTServer:
    server = QGPTServer(defaults, make_backend)
    _register_lifecycle(server)
    inline.register(server)
    completion.register(server)
    edit.register(server)
    chat.register(server)
    return server


def _register_lifecycle(server: QGPTServer) -> None:
    @server.feature(types.INITIALIZE)
    def on_initialize(ls: QGPTServer, params: types.InitializeParams):
        ls.apply_settings(params.initialization_options)

    @server.feature(types.INITIALIZED)
    def on_initialized(ls: QGPTServer, params: types.InitializedParams):
        ls.runtime.start()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def on_configuration(ls: QGPTServer, params: types.DidChangeConfigurationParams):
        ls.apply_settings(params.settings)

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def on_open(ls: QGPTServer, params: types.DidOpenTextDocumentParams):
        ls.documents.changed(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    def on_change(ls: QGPTServer, params: types.DidChangeTextDocumentParams):
        ls.documents.changed(params.text_document.uri)
        ls.completer.supersede(params.text_document.uri)  # a pending completion is for the old text

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def on_close(ls: QGPTServer, params: types.DidCloseTextDocumentParams):
        ls.documents.closed(params.text_document.uri)
        ls.completer.supersede(params.text_document.uri)
        ls.completer.cache.forget(params.text_document.uri)

    @server.feature(types.SHUTDOWN)
    async def on_shutdown(ls: QGPTServer, params: None):
        await ls.runtime.close()

    @server.command(STATS_COMMAND)
    def on_stats(ls: QGPTServer, *arguments):
        options = arguments[0] if arguments and isinstance(arguments[0], dict) else {}
        recent = options.get("recent", 20)
        if not isinstance(recent, int) or isinstance(recent, bool) or recent < 0:
            raise JsonRpcInvalidParams(f"qgpt.stats: recent must be a count, got {recent!r}")
        return ls.stats(recent)
