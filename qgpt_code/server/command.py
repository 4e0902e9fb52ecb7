"""`qgpt serve`: argparse only at import time (`qgpt --help` must not import FastAPI or torch)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import os
import socket
import sys

from qgpt_code.cli_common import API_KEY_ENV, add_engine_options, add_model_options, add_sampling_options, byte_size


def add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP endpoint (completions, chat, /infill, /metrics)",
        description="Serve the model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /infill "
                    "(llama.cpp's shape), /health and /metrics. Sampling options set the defaults for "
                    "fields a request leaves out.")
    add_model_options(serve)
    add_sampling_options(serve)
    add_engine_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require `Authorization: Bearer KEY` on every route but /health (default: ${API_KEY_ENV})")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's file name)")
    serve.add_argument("--max-body-bytes", type=byte_size, default="2M",
                       help="larger request bodies are refused with 413 (default: 2M)")
    serve.add_argument("--request-timeout", type=float, help="seconds a generation may take (default: no limit)")
    serve.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                       help="let browser pages from these origins call the API (CORS), e.g. https://app.example.com, "
                            "or * for any; default: none")
    serve.add_argument("--infill-budget", type=int, default=2048, metavar="TOKENS",
                       help="most prompt tokens /infill spends on the file and its extra context, llama.vim's ring "
                            "buffer included (default: 2048, as the language server's contextBudget)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    check_serve_options(args)  # every flag, before torch, FastAPI or the model
    with listen_socket(args.host, args.port) as sock:  # a busy port is found now, not after the model loaded
        import uvicorn

        from qgpt_code.cli_common import engine_from_args, load_from_args, sampling_from_args
        from qgpt_code.server.app import create_app
        from qgpt_code.server.settings import ServerSettings, default_model_id

        sampling = sampling_from_args(args)
        if not args.api_key and not _is_loopback(args.host):
            print(f"qgpt: warning: serving on {args.host} without an API key: anyone who can reach it can use it "
                  f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
        loaded = load_from_args(args)
        engine = engine_from_args(args, loaded)
        settings = ServerSettings(
            model_id=args.served_model_name or default_model_id(loaded.info.path), api_key=args.api_key or None,
            sampling=sampling, max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
            allowed_origins=tuple(args.allowed_origins), infill_budget=args.infill_budget)
        print(f"qgpt: serving {settings.model_id!r} on http://{_url_host(args.host)}:{args.port}/v1", file=sys.stderr)
        config = uvicorn.Config(create_app(engine, settings), host=args.host, port=args.port,
                                log_level=args.log_level, timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.close()
    return 0


def check_serve_options(args: argparse.Namespace) -> None:
    """One-line errors naming the flag, for everything `qgpt serve` was given."""
    from qgpt_code.cli_common import check_engine_options, check_model_options, check_sampling_options
    from qgpt_code.errors import QGPTError

    check_model_options(args)
    check_sampling_options(args)
    check_engine_options(args)
    if not 1 <= args.port <= 65535:
        raise QGPTError(f"--port must be from 1 to 65535, got {args.port}")
    if args.request_timeout is not None and not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise QGPTError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    if args.infill_budget < 64:
        raise QGPTError(f"--infill-budget must be at least 64 tokens, got {args.infill_budget}")
    if args.max_body_bytes <= 0:
        raise QGPTError(f"--max-body-bytes must be more than 0, got {args.max_body_bytes}")
    for origin in args.allowed_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise QGPTError(f"--allowed-origins {origin!r}: an origin is * or looks like https://example.com")


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, ready for uvicorn; a QGPTError saying why when it cannot be."""
    from qgpt_code.errors import QGPTError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets that say TCP, and with it on,
    # every response written in two parts (headers, body) waits 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise QGPTError(f"--port {port}: {_url_host(host)}:{port} is already in use (another server?); "
                            "choose another port") from None
        if exc.errno == errno.EACCES:
            raise QGPTError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise QGPTError(f"--host {host}: not an address of this machine") from None
        raise QGPTError(f"cannot listen on {_url_host(host)}:{port}: {exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
