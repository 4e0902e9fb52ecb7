"""`qgpt serve`: argparse only at import time (`qgpt --help` must not import FastAPI or torch)."""

from __future__ import annotations

import argparse
import ipaddress
import os
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
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qgpt_code.cli_common import engine_from_args, load_from_args, sampling_from_args
    from qgpt_code.errors import QGPTError
    from qgpt_code.server.app import create_app
    from qgpt_code.server.settings import ServerSettings, default_model_id

    if args.request_timeout is not None and args.request_timeout <= 0:
        raise QGPTError("--request-timeout must be positive")
    sampling = sampling_from_args(args)  # bad values fail before the model loads
    if not args.api_key and not _is_loopback(args.host):
        print(f"qgpt: warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    loaded = load_from_args(args)
    engine = engine_from_args(args, loaded)
    settings = ServerSettings(
        model_id=args.served_model_name or default_model_id(loaded.info.path), api_key=args.api_key or None,
        sampling=sampling, max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout)
    print(f"qgpt: serving {settings.model_id!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
