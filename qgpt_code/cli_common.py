"""Command-line options shared by every `qgpt` command that runs a model, their checks, and what they build.

Imports only argparse at module level: `qgpt --help` must not pay for torch. The `check_*` functions
refuse a bad value in the flag's own words before anything heavy is imported or loaded, so a typo
costs a fraction of a second, not the seconds torch and the weights take.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from qgpt_code.errors import QGPTError

DEFAULT_SPECULATION = "ngram"  # bench/speculative.py: edits 2x and more, completions no slower
API_KEY_ENV = "QGPT_API_KEY"  # the bearer key of `qgpt serve`, and of clients talking to it


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint: a .gguf file, a Meta or an HF directory "
                        "(default: $QGPT_MODEL, then the embedded SmolLM2-135M)")
    parser.add_argument("--tokenizer", help="tokenizer.model to use instead of the one beside the weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="weight-only quantization of the linear layers after loading: on the CPU GGUF's "
                             "Q8_0 (int8) or Q4_0 (int4) blocks; on a GPU int8 per channel")
    parser.add_argument("--eager", action="store_true",
                        help="run decode steps as plain PyTorch: no CUDA graphs on a GPU, no fused kernels on the CPU")
    parser.add_argument("--speculate", choices=["ngram", "off"], default=DEFAULT_SPECULATION,
                        help="guess tokens from the text itself and verify them in the same step, same output "
                             f"(default: {DEFAULT_SPECULATION}; see docs/engine.md)")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default: 0.6, as Meta)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default: 0.9, as Meta)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0: off")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Serving-engine limits (for long-running commands: serve, lsp)."""
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting beyond the batch; more are refused as overloaded (default: 64)")
    parser.add_argument("--max-seq-len", type=int,
                        help="tokens one sequence may hold, prompt + completion; reserves no memory "
                             "(default: the model's context, at most 4096)")
    parser.add_argument("--cache-bytes", type=byte_size,
                        help="KV-cache block pool, e.g. 2G or 512M (default: the GPU memory left after the weights "
                             "and the largest step's activations, 2G on the CPU)")


def byte_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("IB"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 2G or 512M)") from None


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_model_options(args: argparse.Namespace, model_must_exist: bool = True) -> None:
    """`--device` names a device QGPT runs on; `--tokenizer` (and `--model`, unless the caller
    reports a missing model itself) exist. No torch needed."""
    from qgpt_code.device import check_device_name
    from qgpt_code.models import resolve_model_path

    if args.device is not None:
        check_device_name(args.device, "--device")
    if args.tokenizer and not Path(args.tokenizer).expanduser().is_file():
        raise QGPTError(f"--tokenizer {args.tokenizer}: no such file")
    if model_must_exist:
        resolve_model_path(args.model)


def check_sampling_options(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise QGPTError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise QGPTError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # NaN fails this too
        raise QGPTError(f"--top-p must be more than 0 and at most 1, got {args.top_p}")
    if args.top_k < 0:
        raise QGPTError(f"--top-k must be 0 (off) or more, got {args.top_k}")
    if args.seed is not None and not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise QGPTError(f"--seed must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {args.seed}")
    if any(not stop for stop in args.stop):
        raise QGPTError("--stop must not be empty")


def check_engine_options(args: argparse.Namespace) -> None:
    if args.max_batch < 1:
        raise QGPTError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise QGPTError(f"--max-queue must be 0 (no waiting) or more, got {args.max_queue}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise QGPTError(f"--max-seq-len must be at least 2 (a prompt token and a new one), got {args.max_seq_len}")
    if args.cache_bytes is not None and args.cache_bytes <= 0:
        raise QGPTError(f"--cache-bytes must be more than 0, got {args.cache_bytes}")


def load_from_args(args: argparse.Namespace, progress=None):
    """The model the options name, loaded (progress: a callback(done, total); default a counter on
    stderr), then quantized if asked."""
    from qgpt_code.checkpoints import load_model, stderr_progress
    from qgpt_code.distributed.launch import load_leader, tensor_parallel
    from qgpt_code.models import resolve_model_path

    if tensor_parallel():  # under torchrun: rank 0's slice, leading the other ranks (docs/scale.md)
        return load_leader(args, progress or stderr_progress("qgpt: loading weights"))
    path = resolve_model_path(args.model)
    print(f"qgpt: loading {path}", file=sys.stderr)
    loaded = load_model(path, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                        progress=progress or stderr_progress("qgpt: loading weights"))
    if args.quantize and loaded.device.type == "cpu":  # blocks the fused CPU kernels read (quant_blocks.py)
        from qgpt_code.quant_blocks import QUANTIZE_CHOICES, quantize_model

        quantize_model(loaded.model, QUANTIZE_CHOICES[args.quantize])
    elif args.quantize == "int8":
        from qgpt_code.quantize import quantize_int8

        quantize_int8(loaded.model)
    elif args.quantize:
        raise QGPTError(f"--quantize {args.quantize} runs on the CPU only (a GPU takes int8)")
    return loaded


def sampling_from_args(args: argparse.Namespace):
    """SamplingParams from the sampling options (checked first: a bad value is a QGPTError naming its flag)."""
    from qgpt_code.generation import SamplingParams

    check_sampling_options(args)
    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


def engine_from_args(args: argparse.Namespace, loaded):
    """A serving Engine over `loaded`, sized by the engine options."""
    from qgpt_code.distributed.launch import tensor_parallel
    from qgpt_code.engine import Engine

    # Guesses are not yet verified across tensor-parallel ranks (docs/scale.md).
    speculate = getattr(args, "speculate", "off") == "ngram" and not tensor_parallel()

    engine = Engine(loaded, max_batch=args.max_batch, max_queue=args.max_queue,
                    cache_bytes=args.cache_bytes, max_seq_len=args.max_seq_len,
                    eager=getattr(args, "eager", False), speculate=speculate)
    print(f"qgpt: {engine.describe_cache()}", file=sys.stderr, flush=True)
    return engine
