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
With levels 1 and 8 it prints the ratio of their aggregate tokens/s (target: 8 clients >= 3x one).

With --editors, the "8 editors, one file" workload too: 8 clients send, all at once, one streaming
request each whose prompt is the text of the same ~1,500-token file of real code (this repository's
sources) up to a different cursor; the cursors are spread evenly over the file's last 10%, as in
bench/prefix_cpu.py (the last one is the end of the file), and each asks for --editor-tokens greedy
tokens with EOS ignored. Then one client alone (the first cursor) as the reference, on another part of
the sources so the server's prefix cache holds none of it. Reported per run: aggregate completion
tokens/s (wall time from the requests to the last response), p50 TTFT, the prompt tokens and the
cached ones summed over the responses' `usage` (prompt_tokens_details.cached_tokens), and the tokens
the server's engine computed (prefill and decode: `qgpt_tokens_computed_total` of /metrics, before and
after; "-" for a server without it). The prompts are cut from text the tokenizer of --model (default:
the embedded model) decodes, so with --url give the --model the server runs. `--clients ''` skips the
closed-loop levels.

With --compare-with [REV], the same runs then go to `qgpt serve` of REV (default 1ef7cb4, the row
design's last commit) checked out in a temporary git worktree and imported ahead of this checkout
(see bench/row_design.py): one server after the other, and a summary of the ratios.

    python bench/http_load.py [--url http://127.0.0.1:8000] [--model PATH] [--clients 1,8,32]
                              [--duration 20] [--max-tokens 48] [--baseline] [--json results.json]
                              [--editors] [--editor-tokens 32] [--file-tokens 1500] [--compare-with [REV]]
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
from pathlib import Path

import httpx

import row_design  # bench/, first on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]

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
    prompt_tokens: int = 0
    cached_tokens: int = 0


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


def completion_body(prompt: str, max_tokens: int, temperature: float) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


async def one_request(client: httpx.AsyncClient, body: dict) -> Outcome:
    start = time.perf_counter()
    first, usage, done = None, {}, False
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
                    usage = chunk["usage"]
    except httpx.HTTPError:
        return Outcome(False)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Outcome(done and first is not None, first, usage.get("completion_tokens", 0),
                   usage.get("prompt_tokens", 0), cached)


async def run_level(url: str, clients: int, duration: float, max_tokens: int, headers: dict) -> Summary:
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits, headers=headers) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                body = completion_body(prompt_text(next(counter)), max_tokens, temperature=0.7)
                outcomes.append(await one_request(client, body))

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
def local_server(model: str | None, max_batch: int, cwd: Path | None = None, env: dict | None = None):
    """`qgpt serve` on a free loopback port, stopped on exit (run in `cwd` with `env` when given)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "qgpt_code", "serve", "--port", str(port), "--log-level", "warning",
               "--max-batch", str(max_batch)] + (["--model", model] if model else [])
    server = subprocess.Popen(command, cwd=cwd, env=env)
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


# -- 8 editors, one file ---------------------------------------------------------------------------

@dataclass
class EditorsRun:
    clients: int
    completed: int
    failed: int
    prompt_tokens: int  # summed over the responses' usage
    cached_tokens: int  # of those, served from the prefix cache (usage.prompt_tokens_details.cached_tokens)
    completion_tokens: int
    tokens_computed: int | None  # by the server's engine during the run (prefill and decode), from /metrics
    tokens_per_s: float
    ttft_p50_s: float | None
    wall_s: float


def editor_prompts(model: str | None, file_tokens: int) -> tuple[list[str], list[str]]:
    """The texts the editors send: (8 cursors in one file, the first cursor in another file). A file is
    `file_tokens` tokens of this repository's sources, the first file from their start, the second
    right after it (so nothing the first run left in the prefix cache matches it)."""
    from prefix_cpu import editor_cursors  # the same cursors as the engine benchmark's
    from qgpt_code.models import resolve_model_path
    from qgpt_code.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(model))
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "qgpt_code").rglob("*.py")))
    ids = tokenizer.encode(text)  # no BOS: the server adds one where the model wants it
    assert len(ids) >= 2 * file_tokens, "not enough source text for the file"
    cursors = editor_cursors(file_tokens)

    def cut(offset: int, cursor: int) -> str:
        prompt = tokenizer.decode(ids[offset : offset + cursor])
        assert prompt in text, "the tokenizer does not decode the sources back to the same text"
        return prompt

    return [cut(0, c) for c in cursors], [cut(file_tokens, cursors[0])]


async def tokens_computed(client: httpx.AsyncClient) -> int | None:
    """The engine's counter of tokens run through the model, from /metrics (None if it has none)."""
    response = await client.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith("qgpt_tokens_computed_total "):
            return int(float(line.split()[1]))
    return None


async def run_editors(url: str, prompts: list[str], max_tokens: int, headers: dict) -> EditorsRun:
    """One greedy streaming request per prompt, all sent at once."""
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits, headers=headers) as client:
        before = await tokens_computed(client)
        start = time.perf_counter()
        outcomes = await asyncio.gather(
            *(one_request(client, completion_body(p, max_tokens, temperature=0)) for p in prompts))
        wall = time.perf_counter() - start
        after = await tokens_computed(client)
    ok = [o for o in outcomes if o.ok]
    return EditorsRun(
        clients=len(prompts), completed=len(ok), failed=len(outcomes) - len(ok),
        prompt_tokens=sum(o.prompt_tokens for o in ok), cached_tokens=sum(o.cached_tokens for o in ok),
        completion_tokens=sum(o.tokens for o in ok),
        tokens_computed=None if before is None or after is None else after - before,
        tokens_per_s=sum(o.tokens for o in ok) / wall, ttft_p50_s=percentile(sorted(o.ttft for o in ok), 50),
        wall_s=wall)


def print_editors(runs: list[EditorsRun], max_tokens: int) -> None:
    print(f"8 editors, one file (HTTP /v1/completions, streaming, {max_tokens} greedy tokens each, EOS ignored)")
    print(f"{'clients':>7} {'completed':>9} {'failed':>6} {'prompt tok':>10} {'cached tok':>10} {'computed':>8} "
          f"{'TTFT p50 s':>10} {'tok/s':>7} {'wall s':>7}")
    for r in runs:
        computed = "-" if r.tokens_computed is None else str(r.tokens_computed)
        ttft = "-" if r.ttft_p50_s is None else f"{r.ttft_p50_s:.2f}"
        print(f"{r.clients:>7} {r.completed:>9} {r.failed:>6} {r.prompt_tokens:>10} {r.cached_tokens:>10} "
              f"{computed:>8} {ttft:>10} {r.tokens_per_s:>7.1f} {r.wall_s:>7.1f}")
    many, one = runs
    print(f"8 editors / 1 editor: {many.tokens_per_s / one.tokens_per_s:.2f}x tokens/s; "
          f"prompt tokens cached {many.cached_tokens / max(1, many.prompt_tokens):.1%}")


# -- reports -----------------------------------------------------------------------------------------

def print_comparison(ours: tuple[list[Summary], list[EditorsRun]], rows: tuple[list[Summary], list[EditorsRun]],
                     rev: str) -> None:
    print(f"against the row design ({rev}), both through qgpt serve: tokens/s ours / rows")
    for a, b in zip(ours[0], rows[0]):
        print(f"  {a.clients:>2} client(s): {a.tokens_per_s:7.1f} / {b.tokens_per_s:7.1f} = "
              f"{a.tokens_per_s / b.tokens_per_s if b.tokens_per_s else float('nan'):.2f}x")
    for a, b in zip(ours[1], rows[1]):
        print(f"  {a.clients:>2} editor(s): {a.tokens_per_s:7.1f} / {b.tokens_per_s:7.1f} = "
              f"{a.tokens_per_s / b.tokens_per_s if b.tokens_per_s else float('nan'):.2f}x; "
              f"cached prompt tokens {a.cached_tokens} / {b.cached_tokens}")


def print_scaling(summaries: list[Summary]) -> None:
    rates = {s.clients: s.tokens_per_s for s in summaries}
    if 1 in rates and 8 in rates and rates[1]:
        print(f"8 clients / 1 client: {rates[8] / rates[1]:.2f}x (target >= 3x)")


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
    parser.add_argument("--editors", action="store_true", help="also run the 8 editors, one file workload")
    parser.add_argument("--editor-tokens", type=int, default=32, help="new tokens per editor (default: 32)")
    parser.add_argument("--file-tokens", type=int, default=1500, help="tokens of the editors' file (default: 1500)")
    parser.add_argument("--compare-with", metavar="REV", nargs="?", const=row_design.DEFAULT_REV,
                        help="then the same on `qgpt serve` of this commit, from a temporary git worktree: the "
                             f"row design (default REV: {row_design.DEFAULT_REV}); not with --url")
    args = parser.parse_args()
    if args.url and args.compare_with:
        parser.error("--compare-with starts its own servers: leave out --url")
    levels = [int(n) for n in args.clients.split(",") if n.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = editor_prompts(args.model, args.file_tokens) if args.editors else None

    def run_all(url: str) -> tuple[list[Summary], list[EditorsRun]]:
        for n in (1, args.max_batch):  # warm-up: first-call costs (a batch of one, a full one) stay out of the numbers
            asyncio.run(run_level(url, n, 1, 4, headers))
        summaries = [asyncio.run(run_level(url, n, args.duration, args.max_tokens, headers)) for n in levels]
        editors = [asyncio.run(run_editors(url, p, args.editor_tokens, headers)) for p in prompts or ()]
        return summaries, editors

    if args.url:
        summaries, editors = run_all(args.url)
    else:
        with local_server(args.model, args.max_batch) as url:
            summaries, editors = run_all(url)
    rows = None
    if args.compare_with:  # after ours, never at the same time
        with row_design.checkout(args.compare_with) as tree:
            print(f"row design ({args.compare_with}): qgpt serve importing {row_design.imported_file(tree)}",
                  flush=True)
            with local_server(args.model, args.max_batch, cwd=tree, env=row_design.environment(tree)) as url:
                rows = run_all(url)
    baseline = direct_baseline(args, levels) if args.baseline and levels else None
    print_results("HTTP (qgpt serve, streaming clients)", summaries, editors, args.editor_tokens, baseline)
    if baseline:
        print_table("direct (Engine in-process, one thread per client)", baseline)
        print_scaling(baseline)
    if rows:
        print_results(f"row design ({args.compare_with}): HTTP (qgpt serve, streaming clients)", *rows,
                      args.editor_tokens)
        print_comparison((summaries, editors), rows, args.compare_with)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"http": [asdict(s) for s in summaries],
                       "direct": [asdict(s) for s in baseline] if baseline else None,
                       "editors": [asdict(r) for r in editors],
                       "rows": None if rows is None else {"rev": args.compare_with,
                                                          "http": [asdict(s) for s in rows[0]],
                                                          "editors": [asdict(r) for r in rows[1]]}},
                      out, indent=2)
    failed = [s.failed for s in summaries] + [r.failed for r in editors]
    return 1 if any(failed) else 0


def print_results(title: str, summaries: list[Summary], editors: list[EditorsRun], editor_tokens: int,
                  baseline: list[Summary] | None = None) -> None:
    if summaries:
        print_table(title, summaries, baseline)
        print_scaling(summaries)
    if editors:
        print_editors(editors, editor_tokens)


def direct_baseline(args: argparse.Namespace, levels: list[int]) -> list[Summary]:
    from qgpt_code.checkpoints import load_model
    from qgpt_code.engine import Engine
    from qgpt_code.models import resolve_model_path

    engine = Engine(load_model(resolve_model_path(args.model)), max_batch=args.max_batch)
    try:
        for n in (1, args.max_batch):  # warm-up, as for HTTP
            run_level_direct(engine, n, 1, 4)
        return [run_level_direct(engine, n, args.duration, args.max_tokens) for n in levels]
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
