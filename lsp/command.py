"""`qgpt lsp` (and `python -m qgpt_code.lsp`): argparse only at import time, so `qgpt --help` stays instant;
pygls, torch and the model load when the command runs.

stdout belongs to the protocol. Before anything else runs, the real stdout is kept for pygls and file
descriptor 1 is pointed at stderr, so a stray `print`, a progress bar or a C library writing to fd 1
lands in the log instead of corrupting the JSON-RPC stream.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from qgpt_code.cli_common import API_KEY_ENV, add_engine_options, add_model_options

SERVER_ENV = "QGPT_SERVER"


def add_lsp_command(commands) -> None:
    """Register `qgpt lsp` on the `qgpt` command's subparsers."""
    parser = commands.add_parser(
        "lsp", help="language server over stdio (inline completions, chat edits) for VS Code and Neovim",
        description="Language server over stdio: inline completions (textDocument/inlineCompletion), a "
                    "completion fallback, and chat-driven edits (qgpt.editSelection, qgpt.chat). The model "
                    "runs in this process unless --server names a running `qgpt serve`. Editor settings "
                    "(initializationOptions, workspace/didChangeConfiguration) override the defaults; "
                    "see docs/lsp.md.")
    add_lsp_options(parser)
    parser.set_defaults(run=run_lsp)


def add_lsp_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", default=os.environ.get(SERVER_ENV, ""),
                        help="use a running `qgpt serve` at URL instead of loading a model here "
                             f"(default: ${SERVER_ENV})")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, ""),
                        help=f"bearer key for --server (default: ${API_KEY_ENV})")
    add_model_options(parser)
    add_engine_options(parser)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="pygls and server logging on stderr (default: warning)")


def run_lsp(args: argparse.Namespace) -> int:
    from qgpt_code.cli_common import check_engine_options, check_model_options

    # Bad flags end the command at once; a missing model does not: the editor's settings may point the
    # server at a `qgpt serve` instead, and a model that cannot load is shown in the editor.
    check_model_options(args, model_must_exist=False)
    check_engine_options(args)
    protocol_out = _claim_stdout()
    import logging

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="qgpt lsp %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_without_tracebacks_for_unreadable_input)
    from qgpt_code.lsp.server import build_server
    from qgpt_code.lsp.settings import Settings

    defaults = Settings(server_url=args.server or "", api_key=args.api_key or "")
    server = build_server(defaults, backend_factory(args))
    print("qgpt lsp: listening on stdio", file=sys.stderr, flush=True)
    try:
        server.start_io(sys.stdin.buffer, protocol_out)  # until `exit`, or stdin closes
    finally:
        server.stop()
    return server.exit_code


def _without_tracebacks_for_unreadable_input(record) -> bool:
    """pygls logs a message body that is not JSON (or not UTF-8) with a traceback; its reason is enough."""
    import json

    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        record.msg, record.args = f"{record.getMessage()}: {error}", ()
        record.exc_info, record.exc_text = None, None
    return True


def backend_factory(args: argparse.Namespace):
    """settings -> backend: the HTTP backend when `server_url` is set, else the in-process engine."""

    def make_backend(settings):
        if settings.server_url.strip():
            from qgpt_code.lsp.http_backend import HttpBackend

            return HttpBackend(settings.server_url, settings.api_key, settings.request_timeout)
        from qgpt_code.lsp.engine_backend import EngineBackend

        return EngineBackend(args)

    return make_backend


def _claim_stdout():
    """The protocol's own handle on stdout; fd 1 (and sys.stdout) then write to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "wb")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qgpt_code.lsp", description="QGPT language server over stdio.")
    add_lsp_options(parser)
    parser.set_defaults(run=run_lsp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from qgpt_code.errors import QGPTError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QGPTError as exc:
        print(f"qgpt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
