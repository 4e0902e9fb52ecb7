"""One prepared run for a lent GPU: the serving engine at Llama-2-7B shapes, random bf16 weights.

Prints, side by side from one run on one card:
- cold prefill time-to-first-token for 2,048 tokens, and TTFT for the same 2,016-token prefix cached
  plus 32 new tokens (ratio warm/cold);
- decode tokens/s at batch 1 and batch 8 (EOS ignored, 128 new tokens per stream), greedy and, at
  batch 8, sampled (temperature 0.8, top-p 0.95, top-k 50, seeded: the batched device sampler's cost);
- eight editors, one file (bench/prefix_cpu.py's workload: a 1,500-token file cut at 8 cursors over
  its last 10%, 32 new tokens each, all at once) against one editor: aggregate tokens/s, tokens
  computed, peak KV memory held by running sequences;
- the start-up plan of the KV block pool (how many tokens the default --cache-bytes holds).

    python bench/gpu_engine.py [--preset llama-2-7b] [--layers N]

Needs CUDA; exits with a message otherwise. Random weights are generated on the device (no
checkpoint needed); the tokenizer is a stand-in that only counts tokens.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

from counting_tokenizer import CountingTokenizer  # bench/, beside this script


def random_model(args, device, dtype):
    from qgpt_code.checkpoints.assemble import LoadedModel, ModelInfo
    from qgpt_code.model import Transformer

    with torch.device(device):
        torch.manual_seed(0)
        model = Transformer(args).to(dtype)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        model.init_rope()  # .to(dtype) cast the complex rotary table to a real one: rebuild it
    model.eval().requires_grad_(False)
    info = ModelInfo(path=None, format="random", args=args, name="random")
    return LoadedModel(model, CountingTokenizer(args.vocab_size), info)


def timed_first_token(engine, prompt) -> float:
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    torch.cuda.synchronize()
    start = time.perf_counter()
    next(iter(engine.submit(Request(prompt, SamplingParams(max_new_tokens=1, temperature=0)))))
    return time.perf_counter() - start


def decode_rate(engine, batch: int, new_tokens: int = 128, sampled: bool = False) -> float:
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    handles = [engine.submit(Request([1] + [100 + i] * 16, params if not sampled else SamplingParams(
        max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, top_k=50, seed=i, ignore_eos=True)))
        for i in range(batch)]
    threads = [threading.Thread(target=h.result) for h in handles]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return batch * new_tokens / (time.perf_counter() - start)


def editors_case(engine, args, generator, editors: int, file_tokens: int = 1500, new_tokens: int = 32) -> str:
    """The first `editors` of prefix_cpu.py's cursors over a fresh random file (nothing of it cached)."""
    from prefix_cpu import PeakKV, editor_cursors, run_clients  # bench/, beside this script

    from qgpt_code.generation import SamplingParams

    file = torch.randint(3, args.vocab_size, (file_tokens,), generator=generator).tolist()
    prompts = [file[:cursor] for cursor in editor_cursors(file_tokens)[:editors]]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    before = engine.stats().tokens_computed
    with PeakKV(engine) as peak:
        elapsed, _ = run_clients(engine, prompts, params)
    computed = engine.stats().tokens_computed - before
    return (f"{editors} editor(s), one file: {editors * new_tokens / elapsed:.1f} tok/s aggregate, "
            f"{computed} tokens computed for {sum(map(len, prompts))} prompt tokens, "
            f"peak KV held {peak.held / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-2-7b")
    parser.add_argument("--layers", type=int, help="fewer layers for a quick smoke run")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_engine.py needs a CUDA device")

    from qgpt_code.config import preset
    from qgpt_code.engine import Engine

    args = preset(opts.preset)
    if opts.layers:
        args = args.replace(n_layers=opts.layers)
    loaded = random_model(args, torch.device("cuda"), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: {opts.preset} shapes, {args.n_params / 1e9:.2f}B params, bf16")
    with Engine(loaded, max_batch=8, max_seq_len=4096) as engine:
        print(engine.describe_cache())
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, args.vocab_size, (2048,), generator=g).tolist()
        timed_first_token(engine, prompt[:64])  # warm-up (kernels, allocator)
        cold = timed_first_token(engine, prompt)
        other = torch.randint(3, args.vocab_size, (32,), generator=g).tolist()
        warm = timed_first_token(engine, prompt[:2016] + other)
        print(f"TTFT cold 2,048 tokens: {cold * 1000:.1f} ms; 2,016 cached + 32 new: {warm * 1000:.1f} ms; "
              f"ratio {warm / cold:.3f}")
        for batch in (1, 8):
            decode_rate(engine, batch, 8)  # warm-up
            print(f"decode batch {batch}: {decode_rate(engine, batch):.1f} tok/s aggregate")
        print(f"decode batch 8 sampled (T 0.8, top-p 0.95, top-k 50): {decode_rate(engine, 8, sampled=True):.1f} "
              "tok/s aggregate")
        for editors in (1, 8):
            print(editors_case(engine, args, g, editors))
        print(engine.stats())


if __name__ == "__main__":
    main()
