"""The embedded default model on the CPU: ours against llama.cpp and transformers, in one run.

All three run the same file (SmolLM2-135M-Instruct, Q4_1 GGUF) with the same token ids, greedy, EOS
ignored, on the same threads:
- ours: weights kept in their GGUF blocks (quant_blocks.py), the fused decode step; with
  `--float` also our float32 path (the blocks dequantized at load, as before);
- llama.cpp: llama-cpp-python built from source on this machine, in a virtual environment of its
  own (created, and the package compiled, on first use: several minutes), driven through its
  low-level API in a worker process the way its server drives 8 slots: one `llama_decode` per step
  with one token of every live sequence;
- transformers: its GGUF loader (the blocks dequantized to float32), `generate`.

Measured for each: first-token latency (a 32-token prompt, prefill plus the first token), decode
tok/s at batch 1, and aggregate decode tok/s of 8 streams decoding together (8 prompts of 32 tokens);
and for ours, `qgpt complete` from a fresh process: time to its first token and to exit.
Decode rates exclude the prefill: the N - 1 tokens per stream after the first, over the time they took.
The sides take turns (ours, llama.cpp, transformers, then again) for --rounds rounds and each keeps
its best, so that a machine whose load drifts slows all alike; ratios are printed against llama.cpp.

    python bench/gguf_cpu.py [--new-tokens 64] [--rounds 3] [--float] [--no-transformers] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [  # 8 streams; each cut to the same number of tokens
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, counting from zero.\"\"\"\n    if n < 2:\n"
    "        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import numpy as np\n\n\ndef normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:\n"
    "    \"\"\"Scale x to unit length along an axis.\"\"\"\n    norm = np.linalg.norm(x, axis=axis, keepdims=True)\n",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Spain is Madrid, "
    "and the capital of Portugal is Lisbon. The capital of Italy is",
    "class Stack:\n    \"\"\"A last-in, first-out list.\"\"\"\n\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, item):\n        self.items.append(item)\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived a young girl who "
    "loved to read books about faraway places, dragons and the sea. One morning she",
    "SELECT customers.name, COUNT(orders.id) AS order_count FROM customers JOIN orders ON customers.id = "
    "orders.customer_id WHERE orders.created_at > '2024-01-01' GROUP BY customers.name",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; i++) {\n"
    "        printf(\"%d: %s\\n\", i, argv[i]);\n    }\n",
    "To install the package, run pip install in a fresh virtual environment, then import it in Python and "
    "call the main function with the path of your configuration file as its only argument.",
]
LLAMA_CPP_PACKAGE = "llama-cpp-python"


def venv_dir() -> Path:
    from qgpt_code.native import cache_dir

    return cache_dir() / "llama-cpp-venv"


def llama_cpp_python() -> str:
    """A Python that can import llama_cpp: this one, or the bench's own venv (made on first use,
    the package compiled from source for this CPU)."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    venv = venv_dir()
    python = venv / "bin" / "python"
    ready = python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ready:
        print(f"installing {LLAMA_CPP_PACKAGE} from source into {venv} (compiles llama.cpp: minutes)",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}
        subprocess.run([str(python), "-m", "pip", "install", "--no-binary", LLAMA_CPP_PACKAGE, LLAMA_CPP_PACKAGE],
                       check=True, env=env)
    return str(python)


# --- llama.cpp, in a worker process ------------------------------------------------------------------


def llama_worker(request: dict) -> dict:
    """Runs in the llama-cpp-python venv: the measurements for llama.cpp, as JSON-able numbers."""
    import llama_cpp as L
    import numpy as np

    prompts, new_tokens, threads = request["prompts"], request["new_tokens"], request["threads"]
    L.llama_backend_init()
    model = L.llama_model_load_from_file(request["model"].encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    per_sequence = len(prompts[0]) + new_tokens + 16
    params.n_ctx, params.n_batch, params.n_ubatch = len(prompts) * per_sequence, 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = len(prompts), threads, threads
    ctx = L.llama_init_from_model(model, params)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(512, 0, len(prompts))

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, logits?)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits
        batch.n_tokens = len(entries)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def run(streams: list[list[int]], steps: int) -> tuple[float, float, list[list[int]]]:
        """Prefill every stream in one batch, then `steps` greedy tokens each, one decode per step:
        (seconds to the first tokens, seconds for the rest, tokens)."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start = time.perf_counter()
        entries = [(t, p, s, p == len(tokens) - 1) for s, tokens in enumerate(streams) for p, t in enumerate(tokens)]
        decode(entries)
        outputs = [[argmax(i)] for i, e in enumerate(entries) if e[3]]
        first = time.perf_counter()
        for step in range(1, steps):
            decode([(out[-1], len(tokens) + step - 1, s, True) for s, (tokens, out) in enumerate(zip(streams, outputs))])
            for s, out in enumerate(outputs):
                out.append(argmax(s))
        return first - start, time.perf_counter() - first, outputs

    run(prompts[:1], 4)  # warm-up
    first, one, tokens = run(prompts[:1], new_tokens)
    _, eight, _ = run(prompts, new_tokens)
    return {"first": first, "one": one, "eight": eight, "tokens": tokens[0], "version": L.__version__}


def run_llama_cpp(python: str, model: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    request = json.dumps({"model": str(model), "prompts": prompts, "new_tokens": new_tokens, "threads": threads})
    result = subprocess.run([python, __file__, "--llama-worker"], input=request, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- ours and transformers, in process -------------------------------------------------------------------


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_ours(loaded, prompts: list[list[int]], new_tokens: int) -> dict:
    from qgpt_code.generation import SamplingParams, generate

    def run(streams: list[list[int]], n: int) -> tuple[float, float, list[int]]:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        start, first, tokens = time.perf_counter(), None, []
        for events in generate(loaded.model, loaded.tokenizer, streams, params):
            first = first or time.perf_counter()
            tokens += [event.token_id for i, event in events if i == 0 and event.token_id is not None]
        return first - start, time.perf_counter() - first, tokens

    run(prompts[:1], 4)  # warm-up
    first, one, tokens = run(prompts[:1], new_tokens)
    _, eight, _ = run(prompts, new_tokens)
    return {"first": first, "one": one, "eight": eight, "tokens": tokens}


def run_transformers(model, prompts: list[list[int]], new_tokens: int) -> dict:
    import torch

    class Clock:  # a streamer: generate() hands it the prompt, then each step's tokens
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    @torch.inference_mode()
    def run(streams: list[list[int]], n: int) -> tuple[float, float, list[int]]:
        clock, start = Clock(), time.perf_counter()
        out = model.generate(torch.tensor(streams), attention_mask=torch.ones(len(streams), len(streams[0]), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             streamer=clock if len(streams) == 1 else None)
        end = time.perf_counter()
        first = clock.times[1] if clock.times else None  # [0]: the prompt
        return (first or end) - start, end - (first or start), out[0, len(streams[0]):].tolist()

    run(prompts[:1], 4)
    first, one, tokens = run(prompts[:1], new_tokens)
    eight_first, _, _ = run(prompts, 1)  # (streamers take one row only): prefill of 8 timed apart
    _, eight, _ = run(prompts, new_tokens)
    return {"first": first, "one": one, "eight": eight - eight_first, "tokens": tokens}


def cold_start(prompt: str, new_tokens: int) -> tuple[float, float, float]:
    """`qgpt complete` from a fresh process: seconds to its first line on stderr, to the first bytes
    of the completion on stdout (the time to first token a user sees), and from the last bytes to exit."""
    import select

    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "qgpt_code", "complete", prompt, "--max-tokens",
                                str(new_tokens), "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_err = first_out = last_out = None
    streams = {process.stdout, process.stderr}
    while streams:
        for stream in select.select(list(streams), [], [])[0]:
            now = time.perf_counter() - start
            if not os.read(stream.fileno(), 1 << 16):
                streams.discard(stream)
            elif stream is process.stdout:
                first_out, last_out = first_out or now, now
            else:
                first_err = first_err or now
    process.wait()
    if first_out is None:
        raise RuntimeError(f"qgpt complete printed nothing (exit status {process.returncode})")
    return first_err, first_out, time.perf_counter() - start - last_out


def rates(run: dict, new_tokens: int, streams: int) -> dict:
    return {"first_ms": 1000 * run["first"], "decode_1": (new_tokens - 1) / run["one"],
            "decode_8": streams * (new_tokens - 1) / run["eight"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--float", action="store_true", help="also our float32 path (weights dequantized at load)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--cold-starts", type=int, default=3, help="runs of `qgpt complete` from a fresh process")
    parser.add_argument("--threads", type=int, help="threads for every side (default: PyTorch's, the cores); "
                        "1 measures the kernels alone, apart from how threads fare on a busy machine")
    parser.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.llama_worker:
        print(json.dumps(llama_worker(json.loads(sys.stdin.read()))))
        return

    import platform

    import torch

    from qgpt_code.checkpoints import load_model
    from qgpt_code.models import INSTALL_DEFAULT_MODEL, default_model_path
    from qgpt_code.quant_blocks import best_isa

    path = default_model_path()
    if path is None:
        raise SystemExit(f"the default model is not installed: {INSTALL_DEFAULT_MODEL}")
    path.read_bytes()  # a warm page cache for every loader
    if opts.threads:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    llama_python = None if opts.no_llama_cpp else llama_cpp_python()

    sides: dict[str, callable] = {}
    load_s, ours = timed(lambda: load_model(path, device="cpu", dtype="float32"))
    prompts = [ours.tokenizer.encode(text)[: opts.prompt_tokens] for text in PROMPTS]
    if min(map(len, prompts)) < opts.prompt_tokens:
        raise SystemExit(f"a prompt is shorter than {opts.prompt_tokens} tokens")
    sides["ours"] = lambda: run_ours(ours, prompts, opts.new_tokens)
    loads = {"ours": load_s}
    if opts.float:
        loads["ours float32"], floats = timed(lambda: load_model(path, device="cpu", dtype="float32", keep_quantized=False))
        sides["ours float32"] = lambda: run_ours(floats, prompts, opts.new_tokens)
    if llama_python:
        sides["llama.cpp"] = lambda: run_llama_cpp(llama_python, path, prompts, opts.new_tokens, threads)
    if not opts.no_transformers:
        import transformers
        from transformers import AutoModelForCausalLM

        loads[f"transformers {transformers.__version__}"], hf = timed(lambda: AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval())
        sides[f"transformers {transformers.__version__}"] = lambda: run_transformers(hf, prompts, opts.new_tokens)

    colds = [cold_start("def add(a, b):", 16) for _ in range(opts.cold_starts)]
    best: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}
    for round_ in range(opts.rounds):
        for name, side in sides.items():
            run = side()
            tokens[name] = run["tokens"]
            r = rates(run, opts.new_tokens, len(prompts))
            print(f"round {round_ + 1} {name:24s} first token {r['first_ms']:7.1f} ms  decode {r['decode_1']:6.1f} tok/s  "
                  f"8 streams {r['decode_8']:6.1f} tok/s", file=sys.stderr, flush=True)
            if name not in best:
                best[name] = r
            else:
                best[name] = {"first_ms": min(best[name]["first_ms"], r["first_ms"]),
                              "decode_1": max(best[name]["decode_1"], r["decode_1"]),
                              "decode_8": max(best[name]["decode_8"], r["decode_8"])}

    load1 = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {threads} threads, kernels: {best_isa()}, load average {load1:.2f}")
    print(f"model {path.name}, prompt {opts.prompt_tokens} tokens, {opts.new_tokens} new tokens, greedy, "
          f"best of {opts.rounds} rounds")
    peer = best.get("llama.cpp")
    print(f"{'side':26s} {'load s':>7s} {'first ms':>9s} {'tok/s @1':>9s} {'tok/s @8':>9s}" +
          ("   vs llama.cpp: first, @1, @8" if peer else ""))
    for name, r in best.items():
        line = (f"{name:26s} {loads.get(name, float('nan')):7.2f} {r['first_ms']:9.1f} {r['decode_1']:9.1f} "
                f"{r['decode_8']:9.1f}")
        if peer:
            line += (f"   {peer['first_ms'] / r['first_ms']:.2f}x {r['decode_1'] / peer['decode_1']:.2f}x "
                     f"{r['decode_8'] / peer['decode_8']:.2f}x")
        print(line)
    if colds:
        print(f"qgpt complete from a fresh process (best of {len(colds)}): first stderr line "
              f"{min(c[0] for c in colds):.2f} s, first token {min(c[1] for c in colds):.2f} s "
              f"(target <= 3 s), exit {min(c[2] for c in colds):.2f} s after the last token")
    reference = tokens["ours"]
    for name, toks in tokens.items():
        if name != "ours":
            agree = next((i for i, (a, b) in enumerate(zip(reference, toks)) if a != b), min(len(reference), len(toks)))
            print(f"greedy tokens, ours vs {name}: the first {agree} of {opts.new_tokens} agree")
    if peer:
        ok1, ok8 = best["ours"]["decode_1"] >= peer["decode_1"], best["ours"]["decode_8"] > peer["decode_8"]
        print(f"target decode @1 >= 1.0x llama.cpp: {'PASS' if ok1 else 'FAIL'}; "
              f"8 streams ahead of llama.cpp: {'PASS' if ok8 else 'FAIL'}")


if __name__ == "__main__":
    main()
