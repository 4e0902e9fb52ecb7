"""`qgpt serve`: argparse only at import time."""

from __future__ import annotations

import argparse


def add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP endpoint (not built yet)")
    serve.set_defaults(run=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    from qgpt_code.errors import QGPTError

    raise QGPTError("qgpt serve is not built yet")
