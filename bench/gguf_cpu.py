"""The embedded default model on the CPU: load time and decode speed, ours against transformers.

Both sides load the same file (SmolLM2-135M-Instruct, Q4_1 GGUF) and dequantize it to the same
float32 weights (tests/test_gguf_default.py shows their logits agree to ~5e-5): ours with the gguf
package's numpy dequantizers, transformers with its own GGUF loader (which needs `accelerate`).
The file is read once beforehand so both load from a warm page cache. Decoding is greedy with EOS
ignored on both sides, so both produce exactly --new-tokens tokens; each side's best of --repeats
runs (after a warm-up, the two sides alternating) is kept. Prints both numbers and the ratios.

    python bench/gguf_cpu.py [--prompt "def fibonacci(n):"] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def best_times(fns, repeats: int):
    """Best time and last output of each function; runs alternate (ABAB...) so that a machine whose
    load drifts during the benchmark slows both sides alike."""
    for fn in fns:
        fn()  # warm-up
    runs = [[timed(fn) for fn in fns] for _ in range(repeats)]
    return [(min(r[i][0] for r in runs), runs[-1][i][1]) for i in range(len(fns))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    from qgpt_code.checkpoints import load_model
    from qgpt_code.checkpoints.gguf import GGUFFile, read_info
    from qgpt_code.generation import SamplingParams, generate_text
    from qgpt_code.gguf_tokenizer import tokenizer_from_metadata
    from qgpt_code.models import INSTALL_DEFAULT_MODEL, default_model_path

    path = default_model_path()
    if path is None:
        raise SystemExit(f"the default model is not installed: {INSTALL_DEFAULT_MODEL}")
    path.read_bytes()  # warm the page cache for both loaders

    t_header, file = timed(lambda: GGUFFile(path))
    t_info, info = timed(lambda: read_info(file))
    t_tokenizer, _ = timed(lambda: tokenizer_from_metadata(file.metadata, str(path)))
    t_ours, ours = timed(lambda: load_model(path, device="cpu", dtype="float32"))
    t_theirs, theirs = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval())

    prompt = ours.tokenizer.encode(opts.prompt, bos=ours.tokenizer.add_bos)
    params = SamplingParams(max_new_tokens=opts.new_tokens, temperature=0.0, ignore_eos=True)

    def run_ours() -> list[int]:
        return generate_text(ours, prompt, params).tokens

    @torch.inference_mode()
    def run_transformers() -> list[int]:
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=opts.new_tokens,
                              min_new_tokens=opts.new_tokens, do_sample=False)
        return out[0, len(prompt):].tolist()

    (d_ours, tokens_ours), (d_theirs, tokens_theirs) = best_times([run_ours, run_transformers], opts.repeats)
    agree = next((i for i, (a, b) in enumerate(zip(tokens_ours, tokens_theirs)) if a != b), len(tokens_ours))

    print(f"model: {path.name} ({info.args.n_params / 1e6:.1f}M params, {info.quantization} -> float32), "
          f"CPU, {torch.get_num_threads()} threads, transformers {transformers.__version__}")
    print(f"load   ours:         {t_ours:6.2f} s  (header {t_header:.2f} s, info {t_info:.3f} s, "
          f"tokenizer {t_tokenizer:.2f} s, the rest dequantizing and placing weights)")
    print(f"load   transformers: {t_theirs:6.2f} s")
    print(f"load   ratio transformers/ours: {t_theirs / t_ours:.1f}x (higher: ours loads faster)")
    print(f"decode ours:         {opts.new_tokens / d_ours:6.1f} tok/s  (prompt {len(prompt)} tokens, "
          f"{opts.new_tokens} new, greedy, prefill included)")
    print(f"decode transformers: {opts.new_tokens / d_theirs:6.1f} tok/s")
    print(f"decode ratio ours/transformers: {d_theirs / d_ours:.2f}x")
    print(f"greedy tokens agree for {agree} of {opts.new_tokens}")


if __name__ == "__main__":
    main()
