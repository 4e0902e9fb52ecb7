"""Prefix reuse, concurrency and KV memory of the serving engine on the CPU, with the embedded default model.

1. The editor case: time to first token (TTFT) for a ~1,500-token prompt of real code, cold, then for
   the same prompt plus 8 new tokens (what the next keystrokes send). Reported as the ratio warm/cold
   (target <= 0.15) and the prefix-cache hit rate of the warm request.
2. Aggregate decode throughput with 1, 4 and 8 concurrent streams (different prompts, 64 new tokens
   each, EOS ignored so every stream produces the same count). Target: 8 streams >= 3x one stream.
3. Eight editors, one file: 8 clients (threads) send the same ~1,500-token file cut at 8 different
   cursors, all at once, each asking for 32 greedy tokens with EOS ignored. The cursors are spread
   evenly over the file's last 10% (eight people editing the same region, near the end where code is
   usually being written): cursor i = L - L/10 + (i + 1) * (L/10) / 8 for a file of L tokens, so the
   last one is the end of the file and editor 0 has the shortest prompt. The same run with editor 0
   alone is the one-editor reference. Reported: aggregate tokens/s (wall time from the submissions to
   the last token), tokens the engine computed (prefill and decode) against the sum of the prompts,
   and the PEAK KV memory held by running sequences, sampled every 2 ms by a background thread: for
   the paged engine, the referenced blocks x the bytes of a block (it reserves nothing more, so its
   "reserved" is the same number); for the row design, the tokens the rows in use hold x bytes per
   token, and also what those rows reserve (max_seq_len = 2048 positions each).
   Target: peak KV of 8 editors <= 1.5x one editor's.

Each TTFT repeat and each editors run gets a fresh engine (a cold prefix cache), warmed up first with
short unrelated requests, one alone then 8 at once, so one-off first-call costs stay out of the numbers.

Against the row design, in the same run: unless --no-compare, the same cases then run on the engine of
--compare-with (default 1ef7cb4, the last commit with rows), checked out in a temporary `git worktree`
and imported in a subprocess (its checkout first on PYTHONPATH), one side after the other, never both
at once. Both sides get the same prompts (token ids built here, handed over in a JSON file), and a
table gives ours, the row design's and the ratio.

    python bench/prefix_cpu.py [--model PATH] [--prompt-tokens 1500] [--repeats 3] [--new-tokens 64]
                               [--editor-tokens 32] [--compare-with REV | --no-compare] [--json out.json]
    python bench/prefix_cpu.py --repeats 1 --new-tokens 8 --editor-tokens 8    # a quick check
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import row_design  # bench/, first on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
EDITORS = 8


# -- the workload: token ids only, so both engines get exactly the same prompts ----------------------

def code_tokens(tokenizer, n: int) -> list[int]:
    """At least n tokens of real code: this repository's own Python sources."""
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "qgpt_code").rglob("*.py")))
    tokens = tokenizer.encode(text, bos=getattr(tokenizer, "add_bos", True))
    assert len(tokens) > n + 100, "not enough source text for the prompt"
    return tokens


def editor_cursors(file_tokens: int, editors: int = EDITORS) -> list[int]:
    """Cursor positions spread evenly over the file's last 10%; the last one is the end of the file."""
    span = file_tokens // 10
    return [file_tokens - span + (i + 1) * span // editors for i in range(editors)]


def build_workload(tokenizer, opts: argparse.Namespace) -> dict:
    source = code_tokens(tokenizer, max(opts.prompt_tokens + 8 * opts.repeats, 8000))
    n = opts.prompt_tokens
    return {
        "warmup": [source[-40 * (i + 1) :][:40] for i in range(8)],  # the sources' end: no prefix of the prompts
        "ttft": [{"cold": source[r * 8 : r * 8 + n], "grown": source[r * 8 : r * 8 + n + 8]}
                 for r in range(opts.repeats)],  # a new prompt each repeat; the user then typed 8 more tokens
        "streams": {k: [source[1000 * i : 1000 * i + 100] for i in range(k)] for k in (1, 4, 8)},
        "file": source[:n],
        "cursors": editor_cursors(n),
        "new_tokens": opts.new_tokens,
        "editor_tokens": opts.editor_tokens,
        "repeats": opts.repeats,
    }


# -- measurements on one engine (the API both the paged and the row engine have) ---------------------

def new_engine(loaded):
    from qgpt_code.engine import Engine
    from qgpt_code.generation import SamplingParams

    gc.collect()  # the previous engine's cache, before allocating another
    engine = Engine(loaded, max_batch=8, max_seq_len=2048)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    for clients in (1, 8):  # first-call costs of a batch of one and of a full batch
        run_clients(engine, WORKLOAD["warmup"][:clients], params)
    return engine


def ttft(engine, prompt: list[int]) -> tuple[float, int]:
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    start = time.perf_counter()
    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=1, temperature=0)))
    next(iter(handle))
    return time.perf_counter() - start, handle.cached_tokens


def run_clients(engine, prompts: list[list[int]], params) -> tuple[float, list]:
    """One thread per prompt, all submitting at once; (seconds to the last token, handles)."""
    from qgpt_code.engine import Request

    handles: list = [None] * len(prompts)
    counts = [0] * len(prompts)
    go = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        go.wait()
        handles[i] = engine.submit(Request(prompts[i], params))
        counts[i] = sum(1 for e in handles[i] if e.token_id is not None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert counts == [params.max_new_tokens] * len(prompts), counts
    return elapsed, handles


def kv_now(engine) -> tuple[int, int]:
    """(bytes of keys/values held by running sequences, bytes reserved for them) right now."""
    pool = getattr(engine, "pool", None)
    if pool is not None:  # paged: every block is free, cached and unreferenced, or referenced
        used = len(pool.blocks) - len(pool.free) - len(pool.evictable)
        held = used * pool.cache.block_bytes
        return held, held
    store = engine.store  # rows: a running sequence owns a row of max_seq_len positions
    rows = [r for r, busy in enumerate(store.in_use) if busy]
    held = sum(len(store.tokens[r]) for r in rows) * store.bytes_per_token
    return held, len(rows) * store.cache.max_seq_len * store.bytes_per_token


class PeakKV:
    """Samples `kv_now` from a background thread while in use; keeps the peaks."""

    def __init__(self, engine, interval: float = 0.002):
        self.engine, self.interval = engine, interval
        self.held = self.reserved = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            held, reserved = kv_now(self.engine)
            self.held, self.reserved = max(self.held, held), max(self.reserved, reserved)
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> "PeakKV":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure_ttft(loaded) -> dict:
    cold, warm, hit_rates = [], [], []
    for case in WORKLOAD["ttft"]:
        engine = new_engine(loaded)  # a fresh cache each time
        try:
            t_cold, cached = ttft(engine, case["cold"])
            assert cached == 0
            t_warm, cached = ttft(engine, case["grown"])
        finally:
            engine.close()
        cold.append(t_cold)
        warm.append(t_warm)
        hit_rates.append(cached / len(case["grown"]))
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
            "hit_rate": statistics.mean(hit_rates)}


def measure_streams(loaded) -> dict:
    from qgpt_code.generation import SamplingParams

    n = WORKLOAD["new_tokens"]
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    engine = new_engine(loaded)
    try:
        rates = {}
        for streams, prompts in WORKLOAD["streams"].items():
            elapsed, _ = run_clients(engine, prompts, params)
            rates[streams] = len(prompts) * n / elapsed
    finally:
        engine.close()
    return rates


def measure_editors(loaded, editors: int) -> dict:
    """The first `editors` cursors of the workload, on a fresh engine; medians over the repeats."""
    from qgpt_code.generation import SamplingParams

    n = WORKLOAD["editor_tokens"]
    params = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    prompts = [WORKLOAD["file"][:c] for c in WORKLOAD["cursors"][:editors]]
    runs = []
    for _ in range(WORKLOAD["repeats"]):
        engine = new_engine(loaded)
        try:
            before = engine.stats().tokens_computed
            with PeakKV(engine) as peak:
                elapsed, handles = run_clients(engine, prompts, params)
            computed = engine.stats().tokens_computed - before
        finally:
            engine.close()
        runs.append({"tokens_per_s": editors * n / elapsed, "wall_s": elapsed, "tokens_computed": computed,
                     "cached_tokens": sum(h.cached_tokens for h in handles),
                     "peak_kv_held_bytes": peak.held, "peak_kv_reserved_bytes": peak.reserved,
                     "samples": peak.samples})
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {"clients": editors, "prompt_tokens": sum(map(len, prompts)), "new_tokens": editors * n, **median}


def measure_all(loaded) -> dict:
    import qgpt_code
    import qgpt_code.kv_cache

    results = {"qgpt_code": qgpt_code.__file__,
               "design": "paged" if hasattr(qgpt_code.kv_cache, "BlockPool") else "rows"}
    results["ttft"] = measure_ttft(loaded)
    results["streams"] = measure_streams(loaded)
    results["editors"] = {k: measure_editors(loaded, k) for k in (1, EDITORS)}
    return results


WORKLOAD: dict = {}  # set by main (built here, or read from --workload in the row design's subprocess)


# -- reports -----------------------------------------------------------------------------------------

def report(r: dict) -> None:
    t, s, e = r["ttft"], r["streams"], r["editors"]
    one, many = e[1], e[EDITORS]
    n = len(WORKLOAD["ttft"][0]["cold"])
    print(f"[{r['design']} engine: {r['qgpt_code']}]")
    print(f"TTFT cold, {n} tokens:       {t['cold_s'] * 1000:8.1f} ms (median of {WORKLOAD['repeats']})")
    print(f"TTFT warm, same + 8 tokens:      {t['warm_s'] * 1000:8.1f} ms")
    print(f"ratio warm/cold: {t['warm_s'] / t['cold_s']:.3f} (target <= 0.15); cache hit rate {t['hit_rate']:.1%}")
    for streams, rate in s.items():
        print(f"{streams} stream(s): {rate:7.1f} tok/s aggregate ({WORKLOAD['new_tokens']} new tokens each)")
    print(f"8 streams / 1 stream: {s[8] / s[1]:.2f}x (target >= 3x)")
    for run in (one, many):
        print(f"{run['clients']} editor(s), one file: {run['tokens_per_s']:7.1f} tok/s aggregate, "
              f"computed {run['tokens_computed']} tokens for prompts of {run['prompt_tokens']} + "
              f"{run['new_tokens']} new ({run['cached_tokens']} cached); peak KV held "
              f"{run['peak_kv_held_bytes'] / MIB:.1f} MiB, reserved {run['peak_kv_reserved_bytes'] / MIB:.1f} MiB")
    print(f"8 editors / 1 editor: peak KV held {many['peak_kv_held_bytes'] / one['peak_kv_held_bytes']:.2f}x "
          f"(target <= 1.5x), reserved {many['peak_kv_reserved_bytes'] / one['peak_kv_reserved_bytes']:.2f}x; "
          f"throughput {many['tokens_per_s'] / one['tokens_per_s']:.2f}x")


def rows_of(r: dict) -> list[tuple[str, float]]:
    t, s, e = r["ttft"], r["streams"], r["editors"]
    one, many = e[1], e[EDITORS]
    return [
        ("TTFT cold, ms", t["cold_s"] * 1000),
        ("TTFT warm (+8 tokens), ms", t["warm_s"] * 1000),
        ("warm/cold (target <= 0.15)", t["warm_s"] / t["cold_s"]),
        *((f"{k} stream(s), tok/s", v) for k, v in s.items()),
        ("8 streams / 1 stream (target >= 3x)", s[8] / s[1]),
        ("1 editor, tok/s", one["tokens_per_s"]),
        ("8 editors, tok/s", many["tokens_per_s"]),
        ("8 editors, sum of the prompts, tokens", many["prompt_tokens"]),
        ("8 editors, tokens computed (prefill + decode)", many["tokens_computed"]),
        ("1 editor, peak KV held, MiB", one["peak_kv_held_bytes"] / MIB),
        ("8 editors, peak KV held, MiB", many["peak_kv_held_bytes"] / MIB),
        ("8 editors, peak KV reserved, MiB", many["peak_kv_reserved_bytes"] / MIB),
        ("8 / 1 editor, peak KV held (target <= 1.5x)", many["peak_kv_held_bytes"] / one["peak_kv_held_bytes"]),
        ("8 / 1 editor, peak KV reserved", many["peak_kv_reserved_bytes"] / one["peak_kv_reserved_bytes"]),
    ]


def compare_table(ours: dict, theirs: dict, rev: str) -> None:
    def number(value: float) -> str:
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"

    print(f"\n{'':45} {'paged (ours)':>13} {'rows (' + rev + ')':>15} {'ours/rows':>10}")
    for (label, a), (_, b) in zip(rows_of(ours), rows_of(theirs)):
        print(f"{label:45} {number(a):>13} {number(b):>15} {a / b if b else float('nan'):10.2f}")


# -- the row design, in a subprocess on a worktree of --compare-with ---------------------------------

def run_row_design(rev: str, model: Path, workload_path: Path) -> dict:
    """measure_all on the engine of `rev`: this script again, in a subprocess importing its worktree."""
    with row_design.checkout(rev) as tree, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--engine-only", "--model", str(model),
                   "--workload", str(workload_path), "--json", str(out)]
        print(f"\n--- row design ({rev}), in a subprocess on {tree} ---", flush=True)
        subprocess.run(command, cwd=tree, env=row_design.environment(tree), check=True)
        theirs = json.loads(out.read_text(), object_hook=int_keys)
        row_design.check_imports_from(tree, theirs["qgpt_code"])
    return theirs


def int_keys(d: dict) -> dict:
    """JSON turns the int keys (stream and editor counts) into strings; turn them back."""
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: $QGPT_MODEL, then the embedded SmolLM2-135M")
    parser.add_argument("--prompt-tokens", type=int, default=1500, help="the TTFT prompt and the editors' file")
    parser.add_argument("--new-tokens", type=int, default=64, help="per stream in the 1/4/8 streams case")
    parser.add_argument("--editor-tokens", type=int, default=32, help="per editor in the editors case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-with", default=row_design.DEFAULT_REV, metavar="REV", help="the row design's commit")
    parser.add_argument("--no-compare", action="store_true", help="only this checkout's engine")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # the comparison's child
    parser.add_argument("--workload", help=argparse.SUPPRESS)  # the child's prompts, from the parent
    opts = parser.parse_args()

    from qgpt_code.checkpoints import load_model
    from qgpt_code.models import resolve_model_path

    path = resolve_model_path(opts.model)
    loaded = load_model(path, device="cpu", dtype="float32")
    if opts.workload:
        WORKLOAD.update(json.loads(Path(opts.workload).read_text(), object_hook=int_keys))
    else:
        WORKLOAD.update(build_workload(loaded.tokenizer, opts))
    if not opts.engine_only:
        print(f"model: {path.name} ({loaded.info.args.n_params / 1e6:.0f}M params, float32), "
              f"{torch.get_num_threads()} threads; editors' cursors {WORKLOAD['cursors']} of {len(WORKLOAD['file'])}")

    ours = measure_all(loaded)
    report(ours)
    if opts.engine_only:
        Path(opts.json).write_text(json.dumps(ours))
        return
    del loaded  # the weights of this side; the row design loads its own
    results = {"ours": ours}
    if not opts.no_compare:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as workload:
            json.dump(WORKLOAD, workload)
            workload.flush()
            results["rows"] = run_row_design(opts.compare_with, path, Path(workload.name))
        compare_table(ours, results["rows"], opts.compare_with)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
