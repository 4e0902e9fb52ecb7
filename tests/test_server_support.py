"""Helpers for the HTTP server tests (no tests here): tiny real models and a real uvicorn server.

The server runs in a background thread of the test process on a free 127.0.0.1 port, so tests can
look at the engine behind it (stats, running sequences) while driving it over real HTTP.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from builders import hf_llama, train_sentencepiece, write_hf_dir

from qgpt_code.kv_cache import KVCache


@functools.cache
def infill_model(context: int = 1024):
    """A tiny random Llama with Code Llama's infilling pieces in its SentencePiece vocabulary and a
    1024-token context (long enough that a generation can be interrupted mid-way)."""
    from qgpt_code import load_model

    directory = Path(tempfile.mkdtemp(prefix="qgpt-server-model-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    model = hf_llama({"max_position_embeddings": context}, seed=3)
    write_hf_dir(model, directory, train_sentencepiece(512, infill_pieces=True))
    return load_model(directory, device="cpu", dtype="float32")


def make_engine(loaded, max_batch: int = 4, max_queue: int = 16, max_seq_len: int = 1024, rows: int | None = None):
    from qgpt_code.engine import Engine

    rows = rows or 2 * max_batch + 2
    budget = rows * max_seq_len * KVCache.bytes_per_token(loaded.model.args, loaded.dtype)
    return Engine(loaded, max_batch=max_batch, max_queue=max_queue, cache_bytes=budget, max_seq_len=max_seq_len)


class RunningServer:
    """`create_app(engine, settings)` served by uvicorn on a free port until `close()`."""

    def __init__(self, engine, settings):
        import uvicorn

        from qgpt_code.server.app import create_app

        self.engine, self.settings = engine, settings
        self.app = create_app(engine, settings)
        # IPPROTO_TCP: asyncio disables Nagle only on sockets that say TCP (else each answer waits 40 ms)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def openai(self, api_key: str = "unused", **options):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **options)

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0 when absent)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class ServeProcess:
    """`qgpt serve` as a user runs it: a subprocess on a free 127.0.0.1 port, until `close()`."""

    def __init__(self, model_dir, *flags: str, timeout: float = 120):
        import os
        import subprocess
        import sys

        import httpx

        with socket.socket() as probe:  # a free port (released again for the server to bind)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "QGPT_MODEL"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qgpt_code", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--device", "cpu", "--dtype", "float32", "--log-level", "warning", *flags],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"qgpt serve did not start:\n{self.stderr()}")
            time.sleep(0.1)

    def status(self) -> dict[str, int]:
        """The server process's resident memory (kB) and thread count, from /proc."""
        fields = {}
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "Threads"):
                    fields[name] = int(value.split()[0])
        return fields

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> int:
        """Stop it as Ctrl-C would; its exit status."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
