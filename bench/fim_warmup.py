"""llama.vim's warm-up against `qgpt serve`: FIM latency with and without it, in one run.

llama.vim keeps a ring buffer of code chunks (from yanks, buffer switches, saves) and sends them as
`input_extra` with every completion. Each time the buffer changes it sends a warm-up (`n_predict: 0`,
empty prefix and suffix, the chunks) so that the server computes them while the user is not waiting;
the next completion then pays only for the file around the cursor. This script replays both request
shapes, field for field, against a real `qgpt serve` subprocess:

  cold  a completion whose ring buffer the server has never seen
  warm  the warm-up, answered; then the same completion (only the completion is timed)

Every trial uses chunks no earlier trial used (a trial number in each chunk), so nothing is cached
across trials. The two cases alternate, so the machine's other load falls on both alike.

    python bench/fim_warmup.py                       # default model, 2,000-token ring buffer
    python bench/fim_warmup.py --ring-tokens 4000 --prefix-lines 256 --trials 3
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str | None, budget: int, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "qgpt_code", "serve", "--port", str(port), "--infill-budget", str(budget),
               "--log-level", "warning", "--max-seq-len", str(budget + 512)]
    if model:
        command += ["--model", model]
    log = tempfile.TemporaryFile()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    log.seek(0)
    sys.exit(f"qgpt serve did not start:\n{log.read().decode(errors='replace')}")


def source_lines() -> list[str]:
    """Real Python to fill the ring buffer and the edited file: the standard library's own code."""
    import argparse as first
    import json.decoder as second
    import textwrap as third

    return [line for module in (first, second, third) for line in inspect.getsource(module).splitlines()]


def ring_buffer(lines: list[str], tokens: int, trial: int, count_tokens) -> list[dict]:
    """Chunks of 32 lines (what llama.vim's pick_chunk takes), marked with the trial, until `tokens`."""
    chunks, start, total = [], (trial * 97) % max(1, len(lines) - 64), 0
    while total < tokens:
        text = f"# trial {trial} chunk {len(chunks)}\n" + "\n".join(lines[start : start + 32]) + "\n"
        chunks.append({"text": text, "time": [int(time.time()), 0], "filename": f"lib/part_{len(chunks)}.py"})
        total += count_tokens(text)
        start = (start + 32) % max(1, len(lines) - 32)
    return chunks


def warm_up(chunks: list[dict]) -> dict:
    return {"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
            "temperature": 0.0, "stream": False, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 1,
            "t_max_predict_ms": 1, "response_fields": [""]}


def completion(prefix: str, middle: str, suffix: str, chunks: list[dict], n_predict: int) -> dict:
    return {"input_prefix": prefix, "input_suffix": suffix, "input_extra": chunks, "prompt": middle,
            "n_predict": n_predict, "n_indent": len(middle) - len(middle.lstrip()), "top_k": 40, "top_p": 0.99,
            "temperature": 0.0, "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
            "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/predicted_n",
                                "timings/predicted_ms", "tokens_cached"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded default model)")
    parser.add_argument("--ring-tokens", type=int, default=2000, help="tokens of extra chunks (default 2000)")
    parser.add_argument("--prefix-lines", type=int, default=40, help="lines before the cursor (llama.vim: up to 256)")
    parser.add_argument("--suffix-lines", type=int, default=10, help="lines after the cursor (llama.vim: up to 64)")
    parser.add_argument("--n-predict", type=int, default=16)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from qgpt_code.checkpoints import load_tokenizer
    from qgpt_code.models import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model))
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    lines = source_lines()
    port = free_port()
    budget = 2 * args.ring_tokens + 512  # the chunks may take half of the budget (prompts/context.py)
    server = start_server(args.model, budget, port)
    url = f"http://127.0.0.1:{port}/infill"
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    try:
        with httpx.Client(timeout=600) as client:
            for trial in range(args.trials):
                for case in ("cold", "warm") if trial % 2 == 0 else ("warm", "cold"):
                    chunks = ring_buffer(lines, args.ring_tokens, 2 * trial + (case == "warm"), count)
                    cursor = 400 + 50 * trial
                    prefix = "\n".join(lines[cursor - args.prefix_lines : cursor]) + "\n"
                    suffix = "\n" + "\n".join(lines[cursor + 1 : cursor + 1 + args.suffix_lines]) + "\n"
                    middle = lines[cursor][: len(lines[cursor]) - len(lines[cursor].lstrip())]
                    if case == "warm":
                        client.post(url, json=warm_up(chunks)).raise_for_status()
                    started = time.perf_counter()
                    response = client.post(url, json=completion(prefix, middle, suffix, chunks, args.n_predict))
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    results[case].append({"seconds": elapsed, **response.json()})
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)

    def median(case: str, key: str) -> float:
        return statistics.median(r[key] for r in results[case])

    print(f"ring buffer {args.ring_tokens} tokens, {args.prefix_lines}+{args.suffix_lines} lines around the cursor, "
          f"n_predict {args.n_predict}, {args.trials} trials each; {os.cpu_count()} CPUs")
    print(f"{'case':<6} {'latency s':>10} {'prompt tokens computed':>23} {'tokens cached':>14} {'generated':>10}")
    for case in ("cold", "warm"):
        print(f"{case:<6} {median(case, 'seconds'):>10.3f} {median(case, 'timings/prompt_n'):>23.0f} "
              f"{median(case, 'tokens_cached'):>14.0f} {median(case, 'timings/predicted_n'):>10.0f}")
    ratio = median("warm", "seconds") / median("cold", "seconds")
    print(f"warm / cold latency: {ratio:.2f}x (target <= 0.30x): {'PASS' if ratio <= 0.30 else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results, "ratio": ratio}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
