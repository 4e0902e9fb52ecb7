"""Prefix reuse and concurrency of the serving engine on the CPU, with the embedded default model.

1. The editor case: time to first token (TTFT) for a ~1,500-token prompt of real code, cold, then for
   the same prompt plus 8 new tokens (what the next keystrokes send). Reported as the ratio warm/cold
   (target <= 0.15) and the prefix-cache hit rate of the warm request.
2. Aggregate decode throughput with 1, 4 and 8 concurrent streams (different prompts, 64 new tokens
   each, EOS ignored so every stream produces the same count). Target: 8 streams >= 3x one stream.

    python bench/prefix_cpu.py [--model PATH] [--prompt-tokens 1500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def code_tokens(tokenizer, n: int) -> list[int]:
    """At least n tokens of real code: this repository's own Python sources."""
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "qgpt_code").rglob("*.py")))
    tokens = tokenizer.encode(text, bos=getattr(tokenizer, "add_bos", True))
    assert len(tokens) > n + 100, "not enough source text for the prompt"
    return tokens


def ttft(engine, prompt: list[int]) -> tuple[float, int]:
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    start = time.perf_counter()
    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=1, temperature=0)))
    next(iter(handle))
    return time.perf_counter() - start, handle.cached_tokens


def throughput(engine, prompts: list[list[int]], new_tokens: int) -> float:
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    counts = [0] * len(prompts)

    def stream(i: int) -> None:
        counts[i] = sum(1 for e in engine.submit(Request(prompts[i], params)) if e.token_id is not None)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert counts == [new_tokens] * len(prompts), counts
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: $QGPT_MODEL, then the embedded SmolLM2-135M")
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    from qgpt_code.checkpoints import load_model
    from qgpt_code.engine import Engine
    from qgpt_code.models import resolve_model_path

    path = resolve_model_path(opts.model)
    loaded = load_model(path, device="cpu", dtype="float32")
    source = code_tokens(loaded.tokenizer, opts.prompt_tokens + 8 * opts.repeats)
    print(f"model: {path.name} ({loaded.info.args.n_params / 1e6:.0f}M params, float32), "
          f"{torch.get_num_threads()} threads")

    cold, warm, hit_rates = [], [], []
    for r in range(opts.repeats):
        with Engine(loaded, max_batch=8, max_seq_len=2048) as engine:
            prompt = source[r * 8 : r * 8 + opts.prompt_tokens]  # a fresh cache and a new prompt each time
            t_cold, cached = ttft(engine, prompt)
            assert cached == 0
            grown = source[r * 8 : r * 8 + opts.prompt_tokens + 8]  # the user typed 8 more tokens
            t_warm, cached = ttft(engine, grown)
            cold.append(t_cold)
            warm.append(t_warm)
            hit_rates.append(cached / len(grown))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"TTFT cold, {opts.prompt_tokens} tokens:       {c * 1000:8.1f} ms (median of {opts.repeats})")
    print(f"TTFT warm, same + 8 tokens:      {w * 1000:8.1f} ms")
    print(f"ratio warm/cold: {w / c:.3f} (target <= 0.15); cache hit rate {statistics.mean(hit_rates):.1%}")

    rates = {}
    with Engine(loaded, max_batch=8, max_seq_len=2048) as engine:
        for streams in (1, 4, 8):
            prompts = [source[1000 * i : 1000 * i + 100] for i in range(streams)]
            rates[streams] = throughput(engine, prompts, opts.new_tokens)
            print(f"{streams} stream(s): {rates[streams]:7.1f} tok/s aggregate ({opts.new_tokens} new tokens each)")
    print(f"8 streams / 1 stream: {rates[8] / rates[1]:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
