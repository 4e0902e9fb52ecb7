"""Load on the HTTP endpoint: N concurrent streaming clients for a fixed time, N = 1, 8, 32 by default.

Each client loops: POST /v1/completions with `stream: true` (a short code prompt that differs per
request, `max_tokens` new tokens with EOS ignored so every request does the same work), read the
server-sent events to `data: [DONE]`, repeat until the time is up; requests in flight then finish.
Reported per N: requests completed and failed, p50/p95 time to first token (request sent to the
first chunk with text), and aggregate completion tokens/s (all tokens over the wall time from the
first request to the last response).

Without --url it starts `qgpt serve` (the embedded default model unless --model) on a free port of
127.0.0.1 in a subprocess, so the clients do not share the server's interpreter. With --baseline the
same closed loop then runs straight on an in-process Engine (threads, no HTTP) with the same model and
batch size, and the table gains the ratio HTTP / direct: the endpoint's own cost, measured side by side.

    python bench/http_load.py [--url http://127.0.0.1:8000] [--model PATH] [--clients 1,8,32]
                              [--duration 20] [--max-tokens 48] [--baseline] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import httpx

PROMPTS = [
    "def parse_config(path):\n    \"\"\"Read a TOML file and return a dict.\"\"\"\n",
    "class LRUCache:\n    def __init__(self, capacity: int):\n",
    "import json\n\n\ndef load_records(path):\n",
    "def binary_search(items, target):\n",
    "async def fetch_all(urls):\n    results = []\n",
]


@dataclass
class Outcome:
    ok: bool
    ttft: float | None = None  # seconds to the first chunk with text
    tokens: int = 0


@dataclass
class Summary:
    clients: int
    completed: int
    failed: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tokens_per_s: float
    wall_s: float


def prompt_text(number: int) -> str:
    return f"# request {number}\n" + PROMPTS[number % len(PROMPTS)]


async def one_request(client: httpx.AsyncClient, number: int, max_tokens: int) -> Outcome:
    body = {"prompt": prompt_text(number), "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome(False)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(False)
                if first is None and any(c.get("text") for c in chunk.get("choices", ())):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return Outcome(False)
    return Outcome(done and first is not None, first, tokens)


async def run_level(url: str, clients: int, duration: float, max_tokens: int, headers: dict) -> Summary:
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits, headers=headers) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                outcomes.append(await one_request(client, next(counter), max_tokens))

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return summarize(clients, outcomes, wall)


def run_level_direct(engine, clients: int, duration: float, max_tokens: int) -> Summary:
    """The same closed loop on the Engine itself: one thread per client, no HTTP."""
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    tokenizer = engine.tokenizer
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.7, ignore_eos=True)
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                number = next(counter)
            sent = time.perf_counter()
            tokens = tokenizer.encode(prompt_text(number), bos=getattr(tokenizer, "add_bos", True))
            handle, first = engine.submit(Request(tokens, params)), None
            for event in handle:
                if first is None and event.text:
                    first = time.perf_counter() - sent
            outcomes.append(Outcome(handle.finish_reason == "length" and first is not None, first,
                                    handle.completion_tokens))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(clients, outcomes, time.perf_counter() - start)


def summarize(clients: int, outcomes: list[Outcome], wall: float) -> Summary:
    ttfts = sorted(o.ttft for o in outcomes if o.ok)
    return Summary(
        clients=clients, completed=sum(o.ok for o in outcomes), failed=sum(not o.ok for o in outcomes),
        ttft_p50_s=percentile(ttfts, 50), ttft_p95_s=percentile(ttfts, 95),
        tokens_per_s=sum(o.tokens for o in outcomes if o.ok) / wall, wall_s=wall)


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(p) - 1]


@contextmanager
def local_server(model: str | None, max_batch: int):
    """`qgpt serve` on a free loopback port, stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "qgpt_code", "serve", "--port", str(port), "--log-level", "warning",
               "--max-batch", str(max_batch)] + (["--model", model] if model else [])
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"qgpt serve exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("qgpt serve did not come up within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def print_table(title: str, summaries: list[Summary], baseline: list[Summary] | None = None) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(title)
    ratio = f" {'tok/s HTTP/direct':>17}" if baseline else ""
    print(f"{'clients':>7} {'completed':>9} {'failed':>6} {'TTFT p50 s':>10} {'TTFT p95 s':>10} {'tok/s':>7} "
          f"{'wall s':>7}{ratio}")
    for i, s in enumerate(summaries):
        ratio = f" {s.tokens_per_s / baseline[i].tokens_per_s:>17.2f}" if baseline else ""
        print(f"{s.clients:>7} {s.completed:>9} {s.failed:>6} {seconds(s.ttft_p50_s):>10} "
              f"{seconds(s.ttft_p95_s):>10} {s.tokens_per_s:>7.1f} {s.wall_s:>7.1f}{ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start qgpt serve with --model)")
    parser.add_argument("--model", help="checkpoint for the server started here (default: the embedded model)")
    parser.add_argument("--api-key", help="for a --url server that wants one")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated (default: 1,8,32)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of new requests per level (default: 20)")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per request (default: 48)")
    parser.add_argument("--max-batch", type=int, default=8, help="--max-batch of the server started here (default: 8)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the same load straight on an in-process Engine (needs --model or the default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def run_all(url: str) -> list[Summary]:
        asyncio.run(run_level(url, 1, 2, 4, headers))  # warm-up: first-call costs stay out of the numbers
        return [asyncio.run(run_level(url, n, args.duration, args.max_tokens, headers)) for n in levels]

    if args.url:
        summaries = run_all(args.url)
    else:
        with local_server(args.model, args.max_batch) as url:
            summaries = run_all(url)
    baseline = direct_baseline(args, levels) if args.baseline else None
    print_table("HTTP (qgpt serve, streaming clients)", summaries, baseline)
    if baseline:
        print_table("direct (Engine in-process, one thread per client)", baseline)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"http": [asdict(s) for s in summaries],
                       "direct": [asdict(s) for s in baseline] if baseline else None}, out, indent=2)
    return 1 if any(s.failed for s in summaries) else 0


def direct_baseline(args: argparse.Namespace, levels: list[int]) -> list[Summary]:
    from qgpt_code.checkpoints import load_model
    from qgpt_code.engine import Engine
    from qgpt_code.models import resolve_model_path

    engine = Engine(load_model(resolve_model_path(args.model)), max_batch=args.max_batch)
    try:
        run_level_direct(engine, 1, 2, 4)  # warm-up, as for HTTP
        return [run_level_direct(engine, n, args.duration, args.max_tokens) for n in levels]
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
