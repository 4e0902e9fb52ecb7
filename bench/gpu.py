"""One prepared run for a lent GPU: where our decode stands against the card, cuBLAS and transformers.

    python bench/gpu.py [--preset llama-2-7b] [--layers N] [--new-tokens 256] [--skip-transformers]
    python bench/gpu.py --smoke            # the same steps on the CPU: tiny preset, float32, seconds
    python bench/gpu.py --smoke --device cuda --skip-transformers   # the GPU code paths, tiny, seconds

Random weights (Llama-2-7B shapes by default, bf16) are generated on the device, so no checkpoint is
needed; the tokenizer is a stand-in that only counts. Prints one table, a row as soon as it is measured
(a step that fails prints an ERROR row with the exception's last line and the rest still runs):

- copy bandwidth: a device-to-device copy of 2 GiB, timed with CUDA events. Convention: GB/s counts
  the bytes read *and* written (a copy of N bytes moves 2N), i.e. the memory system's throughput.
  The decode floor is then floor_s = bytes read per token / that bandwidth, where the bytes read per
  token are every weight except the input embedding table (decode reads one row of it).
- matvec ceiling: the model's bare chain of matrix-vector products at batch 1 (per layer x @ wqkv.T,
  x @ wo.T, x @ w13.T, x @ w2.T, then the output head) in one CUDA graph, replayed: ms per chain,
  tok/s and fraction of the floor. Nothing built on cuBLAS decodes faster than this.
- decode at batch 1 through the serving engine (`Engine`), with and without CUDA graphs: tok/s,
  ms/token, fraction of the floor and of the matvec ceiling. Decode only: (tokens - 1) over the time
  from the first token event to the last (the first token's time is the prefill's).
- prefill: time to first token of a cold 2,048-token prompt, and of 2,016 cached + 32 new tokens.
- int8 (weight-only, per channel, `quantize_int8`): decode tok/s with the decode kernel the code
  chose (`quantize.DECODE_KERNEL`), ratio int8/bf16, the compilations counted after start-up (must be
  0), the distance of int8 logits from bf16 logits on one prompt (max |diff|, cosine, top-1
  agreement), and on a GPU one row per alternative kernel (`--int8-kernels`, default all three), so
  that the choice in quantize.py can be checked against the numbers.
- transformers' LlamaForCausalLM on the same weights with its static cache (`generate(...,
  cache_implementation="static")`, compiled on first use: a warm-up call of the same shape absorbs
  that): decode tok/s measured like ours (a streamer timestamps every new token; (N - 1) over first
  to last), its logits against ours, and the ratio ours/transformers.
- PASS/FAIL lines for the performance targets, each beside the measured numbers it compares (our
  time per token and the floor's), the card, torch/transformers versions and the date.

Progress goes to stderr. Without CUDA (and without --smoke) it exits with a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qgpt_code.config import ModelArgs, preset

from counting_tokenizer import CountingTokenizer  # bench/, beside this script

COPY_BYTES = 2 << 30  # the d2d copy buffer: large enough that launch overhead vanishes
WEIGHT_STD = 0.02  # random weights ~ N(0, 0.02^2), norms 1: activations and logits stay O(1)
MAX_BATCH = 8
TARGETS = (  # (results key, comparison, threshold, what it says)
    ("decode_vs_floor", ">=", 0.72, "bf16 decode >= 72% of the floor"),
    ("decode_vs_ceiling", ">=", 0.90, "bf16 decode >= 90% of the matvec ceiling"),
    ("ours_vs_transformers", ">=", 1.4, "bf16 decode >= 1.4x transformers static cache"),
    ("int8_vs_bf16", ">=", 1.6, "int8 decode >= 1.6x our bf16 decode"),
    ("ttft_warm_vs_cold", "<=", 0.25, "TTFT of cached prefix + 32 new <= 25% of cold prefill"),
)


# -- set-up ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What one run measures on: the device, dtype, architecture and the token counts."""

    device: torch.device
    dtype: torch.dtype
    preset: str
    args: ModelArgs
    prompt_tokens: int  # decode prompt length
    new_tokens: int  # decode tokens timed per row
    prefill_tokens: int  # cold prefill length (2,048)
    fresh_tokens: int  # new tokens after the cached prefix (32)
    copy_bytes: int
    reps: int  # repetitions of the device-timed loops (copy, matvec chain)
    skip_transformers: bool
    int8_kernels: tuple[str, ...] = ()  # alternatives timed on a GPU

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    @property
    def max_seq_len(self) -> int:
        return min(4096, self.args.max_seq_len)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model shapes (default llama-2-7b; tiny with --smoke)")
    parser.add_argument("--layers", type=int, help="fewer layers, for a quick run")
    parser.add_argument("--new-tokens", type=int, help="decode tokens per measurement (default 256; 16 with --smoke)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the transformers rows")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    parser.add_argument("--int8-kernels", default="compiled,int8pack,dequant",
                        help="int8 decode kernels to time on a GPU, comma-separated (quantize.DECODE_KERNEL's choices)")
    parser.add_argument("--smoke", action="store_true",
                        help="exercise every step on a tiny model, float32 on the CPU (no GPU needed)")
    return parser.parse_args(argv)


def make_setup(opts: argparse.Namespace) -> Setup:
    device = torch.device(opts.device or ("cpu" if opts.smoke else "cuda"))
    name = opts.preset or ("tiny" if opts.smoke else "llama-2-7b")
    args = preset(name)
    if opts.layers:
        args = args.replace(n_layers=opts.layers)
    small = opts.smoke  # tiny context (256 positions): short prompts, few tokens
    return Setup(
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        preset=name,
        args=args,
        prompt_tokens=16 if small else 128,
        new_tokens=opts.new_tokens or (16 if small else 256),
        prefill_tokens=128 if small else 2048,
        fresh_tokens=32,
        copy_bytes=(64 << 20) if small else COPY_BYTES,
        reps=5 if small else 20,
        skip_transformers=opts.skip_transformers,
        int8_kernels=tuple(k for k in opts.int8_kernels.split(",") if k),
    )


# -- timing and printing ---------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Stopwatch:
    """Seconds of device time between start() and stop(): CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin_s = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.begin_s


def seconds_per_call(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Mean device time of fn() over `reps` back-to-back calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    watch = Stopwatch(device)
    watch.start()
    for _ in range(reps):
        fn()
    return watch.stop() / reps


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message, with its type: what an ERROR row shows."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"


class Report:
    """The table: rows printed (and flushed) as they are measured, plus the numbers the targets need."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values: dict[str, float] = {}

    def row(self, label: str, result: str, detail: str = "") -> None:
        print(f"{label:<34} {result:<18} {detail}".rstrip(), flush=True)

    def error(self, label: str, exc: BaseException) -> None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        self.row(label, "ERROR", last_line(exc))

    def attempt(self, label: str, fn: Callable, *args):
        """fn(*args), or an ERROR row for `label` (and None) when it raises; the run goes on either way."""
        log(f"{label} ...")
        try:
            return fn(*args)
        except Exception as exc:  # one failed measurement must not cost the others
            self.error(label, exc)
        free_memory(self.device)  # outside the handler: the traceback no longer pins the step's tensors
        return None

    def ratio(self, key: str, numerator: str, denominator: str, invert: bool = False) -> float | None:
        """values[key] = values[numerator] / values[denominator] when both were measured."""
        if numerator not in self.values or denominator not in self.values:
            return None
        a, b = self.values[numerator], self.values[denominator]
        self.values[key] = b / a if invert else a / b
        return self.values[key]


def per_token(seconds: float) -> str:
    return f"{1 / seconds:.1f} tok/s"


def fractions(report: Report, seconds: float) -> str:
    """'0.74 of floor; 0.93 of matvec ceiling' for a per-token time, as far as both are known."""
    parts = []
    if "floor_s" in report.values:
        parts.append(f"{report.values['floor_s'] / seconds:.3f} of floor")
    if "matvec_s" in report.values:
        parts.append(f"{report.values['matvec_s'] / seconds:.3f} of matvec ceiling")
    return "; ".join(parts)


# -- the model -------------------------------------------------------------------------------------


def random_tensors(args: ModelArgs, device: torch.device, dtype: torch.dtype):
    """Meta-named random tensors for every slot of the architecture, generated on the device."""
    from qgpt_code.model import checkpoint_layout

    generator = torch.Generator(device=device).manual_seed(0)
    for name, slot in checkpoint_layout(args).items():
        if len(slot.shape) == 1:  # norm weights
            tensor = torch.ones(slot.shape, device=device, dtype=dtype)
        else:
            tensor = torch.randn(slot.shape, generator=generator, device=device, dtype=dtype).mul_(WEIGHT_STD)
        yield name, tensor, "random"


def random_model(setup: Setup):
    """A LoadedModel with random weights, assembled by the checkpoint loader's own code path."""
    from qgpt_code.checkpoints.assemble import LoadedModel, ModelInfo, build_model

    model = build_model(setup.args, random_tensors(setup.args, setup.device, setup.dtype), setup.device, setup.dtype)
    info = ModelInfo(path=None, format="random", args=setup.args, name=f"random {setup.preset}")
    return LoadedModel(model, CountingTokenizer(setup.args.vocab_size), info)


def decode_read_bytes(model) -> int:
    """Bytes a batch-1 decode step must read: every weight (float or int8 with its scales) except the
    input embedding table, of which it reads one row (unless the table is also the output head)."""
    state = model.state_dict()  # parameters and persistent buffers (Int8Linear weight/scales)
    skip = set() if model.args.tie_embeddings else {"tok_embeddings.weight"}
    return sum(t.numel() * t.element_size() for name, t in state.items() if name not in skip)


def random_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    """BOS and then random ids (3 and up: clear of the usual special ids)."""
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()


@torch.inference_mode()
def logits_of(model, prompt: list[int]) -> torch.Tensor:
    """Our logits (T, vocab) float32 on the CPU for every prompt position, no cache."""
    device = model.tok_embeddings.weight.device
    tokens = torch.tensor([prompt], device=device)  # (1, T)
    positions = torch.arange(len(prompt), device=device)[None, :]  # (1, T)
    return model(tokens, positions)[0].float().cpu()


def logits_distance(ours: torch.Tensor, reference: torch.Tensor) -> str:
    """max |diff|, the lowest per-position cosine similarity and top-1 agreement of (T, vocab) logits."""
    diff = (ours - reference).abs().max().item()
    cosine = F.cosine_similarity(ours, reference, dim=-1).min().item()  # (T,) -> worst position
    agree = (ours.argmax(-1) == reference.argmax(-1)).sum().item()
    scale = reference.abs().max().item()
    return f"max|diff| {diff:.4f} (logits up to {scale:.2f}); cosine >= {cosine:.5f}; top-1 {agree}/{len(ours)}"


# -- 1. copy bandwidth and the floor ---------------------------------------------------------------


def measure_bandwidth(setup: Setup, report: Report) -> None:
    """Device-to-device copy of `copy_bytes`; bandwidth = (bytes read + bytes written) / time = 2N/t."""
    src = torch.ones(setup.copy_bytes, dtype=torch.uint8, device=setup.device)  # (N,) bytes
    dst = torch.empty_like(src)
    seconds = seconds_per_call(lambda: dst.copy_(src), setup.device, setup.reps)
    bandwidth = 2 * setup.copy_bytes / seconds  # bytes/s, read + written
    report.values["bandwidth"] = bandwidth
    where = "d2d" if setup.is_cuda else "host"
    report.row("copy bandwidth", f"{bandwidth / 1e9:.1f} GB/s",
               f"{where} copy of {setup.copy_bytes / 2**30:.2f} GiB, {seconds * 1e3:.3f} ms; "
               "GB/s counts bytes read + written (2N per copy of N)")


def report_floor(report: Report, weight_bytes: int, label: str, key: str) -> None:
    """floor_s = bytes read per token / bandwidth: decode at batch 1 can go no faster."""
    if "bandwidth" not in report.values:
        report.row(label, "ERROR", "no bandwidth measured")
        return
    floor = weight_bytes / report.values["bandwidth"]
    report.values[key] = floor
    report.row(label, f"{floor * 1e3:.3f} ms/token",
               f"{per_token(floor)}: {weight_bytes / 1e9:.3f} GB read per token / copy bandwidth")


# -- 2. the matrix-vector ceiling ------------------------------------------------------------------


def matvec_weights(model) -> list[torch.Tensor]:
    """The weights a decode step multiplies, in order: per layer wqkv, wo, w13, w2; then the head."""
    from qgpt_code.model import projections_of

    weights = [module.weight for module in projections_of(model)]
    if model.output is None:  # tied: the head is the embedding table
        weights.append(model.tok_embeddings.weight)
    return weights  # each (out, in)


def matvec_chain(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
    for w in weights:  # (out, in)
        F.linear(inputs[w.shape[1]], w)  # (1, in) @ (in, out) -> (1, out)


def graphed(fn: Callable[[], None]) -> Callable[[], None]:
    """fn captured in one CUDA graph, as the engine captures its decode steps; returns replay."""
    from qgpt_code.decode_step import cuda_capture

    replay, _ = cuda_capture()(fn)
    return replay


def measure_matvec(setup: Setup, report: Report, model) -> None:
    weights = matvec_weights(model)
    inputs = {n: torch.randn(1, n, device=setup.device, dtype=setup.dtype) for n in {w.shape[1] for w in weights}}
    chain = functools.partial(matvec_chain, weights, inputs)
    run = graphed(chain) if setup.is_cuda else chain  # no graphs on the CPU: the eager chain
    seconds = seconds_per_call(run, setup.device, setup.reps * 2, warmup=3)
    report.values["matvec_s"] = seconds
    how = "one CUDA graph" if setup.is_cuda else "eager (CPU)"
    floor = f"; {report.values['floor_s'] / seconds:.3f} of floor" if "floor_s" in report.values else ""
    report.row("matvec ceiling", per_token(seconds),
               f"{seconds * 1e3:.3f} ms/chain; {len(weights)} matvecs at batch 1, {how}{floor}")


# -- 3. the serving engine -------------------------------------------------------------------------


def engine_options(setup: Setup, graphs: bool) -> tuple[dict, str]:
    """Engine keyword arguments asking for CUDA graphs or not, and how the decode step will run
    (graphs exist only on a GPU, so the CPU always runs eagerly)."""
    if not graphs:
        return {"eager": True}, "eager"
    if not setup.is_cuda:
        return {"eager": True}, "no graphs on the CPU"
    return {"eager": False}, "CUDA graphs"


def open_engine(setup: Setup, loaded, graphs: bool, max_batch: int = MAX_BATCH, max_seq_len: int | None = None):
    """An Engine with a KV cache of max_batch + 2 rows (room for a full batch and cached prefixes)."""
    from qgpt_code.engine import Engine
    from qgpt_code.kv_cache import KVCache

    options, _ = engine_options(setup, graphs)
    max_seq_len = max_seq_len or setup.max_seq_len
    cache_bytes = (max_batch + 2) * max_seq_len * KVCache.bytes_per_token(setup.args, setup.dtype)
    return Engine(loaded, max_batch=max_batch, max_seq_len=max_seq_len, cache_bytes=cache_bytes, **options)


def decode_seconds(engine, prompt: list[int], new_tokens: int) -> float:
    """Seconds per decoded token at batch 1: (tokens - 1) over the first to the last token event."""
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)))
    stamps = [time.perf_counter() for event in handle if event.token_id is not None]
    if len(stamps) != new_tokens or new_tokens < 2:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(stamps)} "
                           f"(finish {handle.finish_reason}, error {handle.error})")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def first_token_seconds(engine, prompt: list[int], device: torch.device) -> tuple[float, int]:
    """(time from submission to the first token, prompt tokens the prefix cache served)."""
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    sync(device)
    start = time.perf_counter()
    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)))
    first = None
    for event in handle:
        if event.token_id is not None and first is None:
            first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"no token (finish {handle.finish_reason}, error {handle.error})")
    return first, handle.cached_tokens


def measure_decode(setup: Setup, report: Report, engine, label: str, key: str) -> None:
    prompt = random_prompt(setup.prompt_tokens, setup.args.vocab_size, seed=1)
    decode_seconds(engine, prompt, 8)  # warm-up: kernels, allocator, prefix row
    seconds = decode_seconds(engine, prompt, setup.new_tokens)
    report.values[key] = seconds
    report.row(label, per_token(seconds),
               f"{seconds * 1e3:.3f} ms/token; {fractions(report, seconds)}; "
               f"{setup.new_tokens} new after {setup.prompt_tokens} prompt tokens")


def measure_prefill(setup: Setup, report: Report, engine) -> None:
    """Cold TTFT of `prefill_tokens`, then TTFT of its first (prefill - fresh) tokens cached + fresh new."""
    n, fresh = setup.prefill_tokens, setup.fresh_tokens
    vocab = setup.args.vocab_size
    first_token_seconds(engine, random_prompt(n, vocab, seed=2), setup.device)  # warm-up at the same shapes
    prompt = random_prompt(n, vocab, seed=3)
    cold, reused = first_token_seconds(engine, prompt, setup.device)
    report.values["prefill_s"] = cold
    report.row(f"prefill {n} tokens (cold TTFT)", f"{cold * 1e3:.2f} ms",
               f"{n / cold:.0f} tok/s; {reused} tokens from cache")
    edited = prompt[: n - fresh] + random_prompt(fresh + 1, vocab, seed=4)[1:]
    warm, reused = first_token_seconds(engine, edited, setup.device)
    report.values["ttft_s"] = warm
    ratio = report.ratio("ttft_warm_vs_cold", "ttft_s", "prefill_s")
    report.row(f"TTFT {n - fresh} cached + {fresh} new", f"{warm * 1e3:.2f} ms",
               f"ratio warm/cold {ratio:.3f}; {reused} tokens from cache")


def engine_rows(setup: Setup, report: Report, loaded, graphs: bool, prefill: bool) -> bool:
    """Decode rows (and, if asked, prefill rows) on one engine; True when the prefill rows ran."""
    label = f"decode {setup.dtype_name} ({engine_options(setup, graphs)[1]})"
    key = "decode_s" if graphs else "decode_eager_s"
    engine = report.attempt(label, open_engine, setup, loaded, graphs)
    if engine is None:
        return False
    with engine:
        report.attempt(label, measure_decode, setup, report, engine, label, key)
        if prefill:
            report.attempt("prefill", measure_prefill, setup, report, engine)
    del engine
    free_memory(setup.device)
    return prefill


# -- 4. int8 ---------------------------------------------------------------------------------------


def compilations() -> int:
    """Graphs torch.compile has made in this process so far (torch._dynamo's own counter)."""
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def measure_int8(setup: Setup, report: Report, loaded, reference: torch.Tensor | None, prompt: list[int]) -> None:
    from qgpt_code import quantize

    quantize.quantize_int8(loaded.model)
    free_memory(setup.device)
    report_floor(report, decode_read_bytes(loaded.model), "decode floor int8", "floor_int8_s")
    int8_engine_row(setup, report, loaded, quantize.DECODE_KERNEL, main=True)
    if reference is not None:
        report.attempt("int8 logits", report_int8_logits, setup, report, loaded.model, reference, prompt)


def measure_int8_alternatives(setup: Setup, report: Report, loaded) -> None:
    """The other int8 decode kernels, to check the choice in quantize.py against the numbers (GPU only:
    the CPU decodes int8 through its own C kernels). Last in the run: the targets come first."""
    from qgpt_code import quantize

    if setup.is_cuda:
        for kernel in setup.int8_kernels:
            if kernel != quantize.DECODE_KERNEL:
                int8_engine_row(setup, report, loaded, kernel, main=False)


def int8_engine_row(setup: Setup, report: Report, loaded, kernel: str, main: bool) -> None:
    """One int8 decode row with `kernel` as the decode kernel (prepared at the engine's start-up)."""
    from qgpt_code import quantize

    for layer in loaded.model.modules():  # forget kernels and graphs made with another choice
        if isinstance(layer, quantize.Int8Linear):
            layer.decode_kernels.clear()
    loaded.model.decode_runtime = None
    free_memory(setup.device)
    chosen, quantize.DECODE_KERNEL = quantize.DECODE_KERNEL, kernel
    label = f"decode int8 ({engine_options(setup, True)[1]})" if main else f"decode int8 kernel {kernel}"
    try:
        # max_batch 1, short rows: graphs (and int8 kernels to compile) for batch 1 only; the batch-1 step
        # is the very one the bf16 engine replays.
        context = min(setup.max_seq_len, setup.prompt_tokens + setup.new_tokens + 8)
        started = time.perf_counter()
        engine = report.attempt(label, open_engine, setup, loaded, True, 1, context)
        start_up = time.perf_counter() - started
        if engine is not None:
            with engine:
                report.attempt(label, measure_int8_decode, setup, report, engine, label, kernel, main, start_up)
            del engine
    finally:
        quantize.DECODE_KERNEL = chosen
    free_memory(setup.device)


def report_int8_logits(setup: Setup, report: Report, model, reference: torch.Tensor, prompt: list[int]) -> None:
    report.row(f"int8 vs {setup.dtype_name} logits", "distance", logits_distance(logits_of(model, prompt), reference))


def measure_int8_decode(setup: Setup, report: Report, engine, label: str, kernel: str, main: bool,
                        start_up: float) -> None:
    after_start_up = compilations()
    prompt = random_prompt(setup.prompt_tokens, setup.args.vocab_size, seed=1)
    decode_seconds(engine, prompt, 8)  # warm-up
    seconds = decode_seconds(engine, prompt, setup.new_tokens)
    for n in [n for n in (1, 3, 5, 17, 23, 100, 300) if n < engine.max_seq_len]:  # new chunk lengths: no compiling
        first_token_seconds(engine, random_prompt(n, setup.args.vocab_size, seed=10 + n), setup.device)
    compiled = compilations() - after_start_up
    key = "int8_s" if main else f"int8_{kernel}_s"
    report.values[key] = seconds
    ratio = report.ratio("int8_vs_bf16" if main else f"int8_{kernel}_vs_bf16", key, "decode_s", invert=True)
    vs_bf16 = f"{ratio:.2f}x our {setup.dtype_name}" if ratio is not None else f"no {setup.dtype_name} row"
    floor = report.values.get("floor_int8_s")
    of_floor = f"; {floor / seconds:.3f} of int8 floor" if floor else ""
    how = kernel if setup.is_cuda else "cpu_decode"  # the CPU decodes int8 through its own C kernels
    report.row(label, per_token(seconds), f"{seconds * 1e3:.3f} ms/token; {vs_bf16}{of_floor}; kernel {how}; "
               f"engine max_batch 1, start-up {start_up:.1f} s; {compiled} compilations after start-up")


# -- 5. transformers, static cache, same weights ---------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def hf_config(args: ModelArgs):
    from transformers import LlamaConfig

    head_dim = {} if args.head_dim == args.dim // args.n_heads else {"head_dim": args.head_dim}
    return LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
        max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0, **head_dim,
    )


@torch.no_grad()
def hf_copy(model, setup: Setup):
    """transformers' LlamaForCausalLM holding a copy of our weights (HF names, HF's rotary row order)."""
    from transformers import LlamaForCausalLM

    from qgpt_code.checkpoints.hf import our_name, permute_rotary
    from qgpt_code.model import checkpoint_tensors

    args = setup.args
    with setup.device, default_dtype(setup.dtype):
        hf = LlamaForCausalLM(hf_config(args))
    hf.eval().requires_grad_(False)
    ours = checkpoint_tensors(model)  # Meta name -> view into our fused weights
    ours.setdefault("output.weight", ours["tok_embeddings.weight"])  # tied models
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads}
    for hf_name, target in hf.state_dict().items():  # tensors sharing the parameters' storage
        name = our_name(hf_name)
        if name is None:
            raise KeyError(f"transformers tensor {hf_name!r} has no counterpart in our model")
        source = ours[name]
        kind = name.split(".")[-2]
        target.copy_(permute_rotary(source, heads[kind]) if kind in heads else source)
    return hf


class TokenClock:
    """A generate() streamer that timestamps each new token (the first put() is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            self.stamps.append(time.perf_counter())  # transformers moved the token to the host: synced

    def end(self) -> None:
        pass


def hf_generate(hf, prompt: list[int], new_tokens: int, streamer=None):
    device = hf.device
    input_ids = torch.tensor([prompt], device=device)  # (1, T)
    return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                       pad_token_id=0, streamer=streamer)


def measure_transformers(setup: Setup, report: Report, hf, reference: torch.Tensor | None,
                         logits_prompt: list[int]) -> None:
    import transformers

    label = "transformers static cache"
    prompt = random_prompt(setup.prompt_tokens, setup.args.vocab_size, seed=1)
    started = time.perf_counter()
    hf_generate(hf, prompt, setup.new_tokens)  # warm-up, same shapes: absorbs compilation
    warmup = time.perf_counter() - started
    clock = TokenClock()
    hf_generate(hf, prompt, setup.new_tokens, clock)
    if len(clock.stamps) != setup.new_tokens:
        raise RuntimeError(f"streamer saw {len(clock.stamps)} tokens, expected {setup.new_tokens}")
    seconds = (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)
    report.values["transformers_s"] = seconds
    parity = ""
    if reference is not None:
        with torch.inference_mode():
            theirs = hf(torch.tensor([logits_prompt], device=hf.device)).logits[0].float().cpu()  # (T, vocab)
        parity = f"; logits vs ours: {logits_distance(theirs, reference)}"
    report.row(label, per_token(seconds),
               f"{seconds * 1e3:.3f} ms/token; {fractions(report, seconds)}; transformers "
               f"{transformers.__version__}, streamer-timed, warm-up call {warmup:.1f} s{parity}")
    ratio = report.ratio("ours_vs_transformers", "transformers_s", "decode_s")
    if ratio is not None:
        report.row("ours / transformers", f"{ratio:.2f}x", f"decode at batch 1, {setup.dtype_name}")


# -- targets and the run ---------------------------------------------------------------------------


def derive_ratios(report: Report) -> None:
    report.ratio("decode_vs_floor", "floor_s", "decode_s")
    report.ratio("decode_vs_ceiling", "matvec_s", "decode_s")


# What each target compares, printed beside it: (results key, label), times in seconds
TARGET_BASIS = {
    "decode_vs_floor": (("decode_s", "ours"), ("floor_s", "floor")),
    "decode_vs_ceiling": (("decode_s", "ours"), ("matvec_s", "matvec ceiling"), ("floor_s", "floor")),
    "ours_vs_transformers": (("decode_s", "ours"), ("transformers_s", "transformers"), ("floor_s", "floor")),
    "int8_vs_bf16": (("int8_s", "int8"), ("decode_s", "bf16"), ("floor_int8_s", "int8 floor")),
    "ttft_warm_vs_cold": (("ttft_s", "warm TTFT"), ("prefill_s", "cold prefill")),
}


def basis(report: Report, key: str) -> str:
    """'; ours 4.310 ms, floor 3.205 ms' for the numbers behind a target, as far as measured."""
    parts = [f"{label} {report.values[name] * 1e3:.3f} ms" for name, label in TARGET_BASIS.get(key, ())
             if name in report.values]
    return "; " + ", ".join(parts) if parts else ""


def print_targets(report: Report) -> None:
    print("targets:", flush=True)
    for key, op, threshold, text in TARGETS:
        value = report.values.get(key)
        if value is None:
            print(f"FAIL  {text}: not measured", flush=True)
            continue
        met = value >= threshold if op == ">=" else value <= threshold
        print(f"{'PASS' if met else 'FAIL'}  {text}: {value:.3f} (target {op} {threshold}){basis(report, key)}",
              flush=True)


def header(setup: Setup) -> str:
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    card = torch.cuda.get_device_name(setup.device) if setup.is_cuda else "cpu"
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    args = setup.args
    return (f"card {card}; torch {torch.__version__}; transformers {hf_version}; {date}\n"
            f"model: {setup.preset} shapes ({args.n_layers} layers), {args.n_params / 1e6:.1f}M params, "
            f"random weights, {setup.dtype_name}, batch 1")


def run(setup: Setup) -> None:
    report = Report(setup.device)
    print(header(setup), flush=True)
    print(f"{'measurement':<34} {'result':<18} detail", flush=True)
    report.attempt("copy bandwidth", measure_bandwidth, setup, report)
    loaded = report.attempt("model", random_model, setup)
    if loaded is None:
        print_targets(report)
        return
    report_floor(report, decode_read_bytes(loaded.model), f"decode floor {setup.dtype_name}", "floor_s")
    report.attempt("matvec ceiling", measure_matvec, setup, report, loaded.model)
    # 32 positions: a prompt-sized forward (int8 decode-sized products compile kernels per shape).
    logits_prompt = random_prompt(32, setup.args.vocab_size, seed=5)
    reference = report.attempt("reference logits", logits_of, loaded.model, logits_prompt)
    prefilled = engine_rows(setup, report, loaded, graphs=True, prefill=True)
    engine_rows(setup, report, loaded, graphs=False, prefill=not prefilled)
    derive_ratios(report)
    hf = None
    if setup.skip_transformers:
        report.row("transformers static cache", "skipped", "--skip-transformers")
    else:  # copied now, while our weights are still bf16; measured last (its compile is the slow, risky part)
        hf = report.attempt("transformers static cache", hf_copy, loaded.model, setup)
    report.attempt("int8", measure_int8, setup, report, loaded, reference, logits_prompt)
    if hf is not None:
        report.attempt("transformers static cache", measure_transformers, setup, report, hf, reference, logits_prompt)
        del hf
        free_memory(setup.device)
    report.attempt("int8 kernels", measure_int8_alternatives, setup, report, loaded)
    del loaded
    free_memory(setup.device)
    if setup.is_cuda:
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(setup.device) / 2**30:.1f} GiB", flush=True)
    print_targets(report)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    setup = make_setup(opts)
    if setup.is_cuda and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU, or use --smoke for the CPU walk-through",
              file=sys.stderr)
        return 1
    torch.manual_seed(0)
    started = time.perf_counter()
    run(setup)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
