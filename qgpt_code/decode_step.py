"""The decode step: one new token for each running sequence, run eagerly, replayed from CUDA graphs,
or (float32 on the CPU) through the fused kernels of cpu_decode.py.

Decoding one token at a small batch reads every weight once and does little arithmetic, so on a GPU
the time goes to launching a few hundred small kernels unless the whole step is captured once in a
CUDA graph and replayed. A graph fixes every shape and address, so `GraphedDecode` keeps:
- static input buffers (tokens, positions, block tables) per batch bucket, which each call fills;
- one graph per (batch bucket, key-length bucket): batch buckets are powers of two up to max_batch,
  key-length buckets are `KV_BUCKET` positions times powers of two up to max_seq_len, so a short
  sequence does not attend over a whole sequence's worth of blocks;
- rows beyond the real batch repeat the last real row (same token, position and block table), so
  they write the same keys and values to the same place and change nothing.
All graphs share one memory pool; each call's logits are valid until the next call.

Graphs record the cache's addresses, so a cache and the decode step built on it go together: a
`DecodeRuntime`, kept on the model (`acquire_runtime`). Every later `generate()` call and Engine whose
needs it covers reuses it, so graphs and compiled kernels are made once per loaded model.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qgpt_code.kv_cache import BLOCK_SIZE, KVCache, blocks_for
from qgpt_code.model import Transformer

KV_BUCKET = 256  # attend over the cache in steps of this many positions, not all of it every step
WARMUP_RUNS = 3  # eager runs on a side stream before a capture (lazy initialisation, autotuning)


def power_of_two_buckets(smallest: int, largest: int) -> list[int]:
    """smallest, 2*smallest, 4*smallest ... and `largest` itself as the last bucket."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    return buckets + [largest]


def padded_tables(tables: Sequence[Sequence[int]], width: int) -> list[list[int]]:
    """Each table cut or padded (with block 0, never read: attention stops at the row's position) to `width`."""
    return [[*t[:width], *[0] * (width - len(t))] for t in tables]


class EagerDecode:
    """The decode step as plain PyTorch calls (the CPU path without the fused kernels, and `--eager`)."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (B, vocab) float32 for token b at `positions[b]` of the sequence whose blocks are `tables[b]`."""
        length = max(positions) + 1
        width = blocks_for(length, self.cache.block_size)
        token_ids = torch.tensor([[t] for t in tokens], device=self.device)  # (B, 1)
        where = torch.tensor([[p] for p in positions], device=self.device)  # (B, 1)
        blocks = torch.tensor(padded_tables(tables, width), device=self.device)  # (B, W)
        return self.model(token_ids, where, self.cache, tables=blocks, kv_len=length)[:, -1]


class StaticInputs:
    """The buffers a captured graph reads, views of one (batch, 2 + max_blocks) tensor: tokens and
    positions (batch, 1) and block tables (batch, max_blocks). They start all zero, so warm-up runs
    only touch block 0's first position."""

    def __init__(self, batch: int, max_blocks: int, device: torch.device):
        self.values = torch.zeros(batch, 2 + max_blocks, dtype=torch.long, device=device)
        self.tokens, self.positions, self.tables = self.values[:, :1], self.values[:, 1:2], self.values[:, 2:]
        # Staged in pinned memory on a GPU: a copy from pageable memory would first wait for the device.
        # Rewriting it next step is safe: each step's sampling waits for the device, copy included.
        self.staging = torch.zeros(self.values.shape, dtype=torch.long, pin_memory=torch.device(device).type == "cuda")

    def fill(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> None:
        """Copy one step's inputs in (one transfer), padding by repeating the last real row."""
        pad = len(self.values) - len(tokens)
        rows = [[t, p, *table] for t, p, table in zip(tokens, positions, padded_tables(tables, self.tables.shape[1]))]
        self.staging.copy_(torch.tensor(rows + rows[-1:] * pad))
        self.values.copy_(self.staging, non_blocking=True)


class GraphedDecode:
    """The decode step replayed from CUDA graphs captured once, before the cache holds anything.

    One graph per (batch bucket, key bucket): batch buckets are powers of two up to max_batch, key
    buckets are KV_BUCKET positions times powers of two up to max_seq_len, counted in blocks; a graph
    attends over its bucket's first blocks of each table (block tables are graph inputs, so any
    blocks can be read). `capture` is how a step is recorded: `cuda_capture` on a GPU; tests on the
    CPU pass a recorder that re-runs the step on the static buffers (what a replay does).
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        max_batch: int,
        max_seq_len: int,
        capture: Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device
        max_blocks = blocks_for(max_seq_len, cache.block_size)
        self.batch_buckets = power_of_two_buckets(1, max_batch)
        self.block_buckets = power_of_two_buckets(min(blocks_for(KV_BUCKET, cache.block_size), max_blocks), max_blocks)
        self.inputs = {b: StaticInputs(b, max_blocks, self.device) for b in self.batch_buckets}
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        capture = capture or cuda_capture()
        shapes = [(b, w) for b in self.batch_buckets for w in self.block_buckets]
        with torch.inference_mode():
            for done, (batch, width) in enumerate(shapes, 1):
                self.graphs[batch, width] = capture(self._step_fn(batch, width))
                if progress:
                    progress(done, len(shapes))
        cache.k[:, 0].zero_()  # the warm-up runs wrote into block 0
        cache.v[:, 0].zero_()

    def _step_fn(self, batch: int, width: int) -> Callable[[], torch.Tensor]:
        inputs = self.inputs[batch]

        def step() -> torch.Tensor:  # (batch, vocab) float32
            return self.model(inputs.tokens, inputs.positions, self.cache, tables=inputs.tables[:, :width])[:, -1]

        return step

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (B, vocab) float32, as EagerDecode; a view into the graph's output, valid until the next call."""
        batch = next(b for b in self.batch_buckets if b >= len(tokens))
        width = next(w for w in self.block_buckets if w * self.cache.block_size > max(positions))
        self.inputs[batch].fill(tokens, positions, tables)
        replay, logits = self.graphs[batch, width]
        replay()
        return logits[: len(tokens)]


def cuda_capture() -> Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]:
    """A recorder of steps into CUDA graphs that share one memory pool."""
    pool = torch.cuda.graph_pool_handle()

    def capture(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = step()
        return graph.replay, output

    return capture


def make_decode(model: Transformer, cache: KVCache, max_batch: int, max_seq_len: int, eager: bool = False):
    """The fastest decode step for this model: CUDA graphs on a GPU, the fused kernels for a float32
    model on the CPU (when a C compiler can build them), else plain PyTorch; `eager` forces the last."""
    from qgpt_code import cpu_decode
    from qgpt_code.native import cpu_kernels
    from qgpt_code.quantize import DECODE_KERNEL, int8_layers, prepare_decode_kernels

    if eager:
        return EagerDecode(model, cache)
    if model.tok_embeddings.weight.device.type == "cuda":
        # int8 kernels for exactly the rows the graphs will run, made now and captured with them
        buckets = power_of_two_buckets(1, max_batch)
        if int8_layers(model) and DECODE_KERNEL != "dequant":
            print(f"qgpt: preparing int8 decode kernels ({DECODE_KERNEL}) for batch {', '.join(map(str, buckets))}",
                  file=sys.stderr, flush=True)
        prepare_decode_kernels(model, buckets)
        return GraphedDecode(model, cache, max_batch, max_seq_len, progress=_stderr_progress)
    if cpu_decode.supports(model, cache) and (kernels := cpu_kernels()) is not None:
        return cpu_decode.NativeCpuDecode(model, cache, kernels, max_seq_len)
    return EagerDecode(model, cache)


def _stderr_progress(done: int, total: int) -> None:
    end = "\n" if done == total else "\r"
    print(f"qgpt: capturing decode graphs: {done}/{total}", end=end, file=sys.stderr, flush=True)


@dataclass(eq=False)
class DecodeRuntime:
    """A KV cache and the decode step bound to it, kept on the model for every caller it fits."""

    cache: KVCache
    decode: Callable[[Sequence[int], Sequence[int], Sequence[Sequence[int]]], torch.Tensor]
    max_batch: int
    max_seq_len: int
    eager: bool
    in_use: bool = False  # by one generate() call or Engine: the cache's contents are theirs meanwhile

    def covers(self, blocks: int, max_batch: int, max_seq_len: int, eager: bool, exact: bool) -> bool:
        enough = self.cache.n_blocks == blocks if exact else self.cache.n_blocks >= blocks
        return self.eager == eager and enough and self.max_batch >= max_batch and self.max_seq_len >= max_seq_len

    def release(self) -> None:
        with _runtime_lock:
            self.in_use = False


_runtime_lock = threading.Lock()


def acquire_runtime(model: Transformer, blocks: int, max_batch: int, max_seq_len: int, eager: bool = False,
                    make_cache: Callable[..., KVCache] = KVCache, build: Callable | None = None,
                    exact: bool = False) -> DecodeRuntime:
    """A cache of at least `blocks` blocks with its decode step, for the caller's use until it calls
    `release()`: the model's own when free and large enough; otherwise a new one, which becomes the
    model's (replacing an idle one, freed first) unless the model's is in use elsewhere. `build`
    (cache, max_batch, max_seq_len, eager) -> step replaces `make_decode` (a tensor-parallel model's
    own, which every rank must run together): such a runtime is never shared. `exact`: the cache must
    hold exactly `blocks` (an Engine's pool is sized by its plan; more blocks would change its behaviour)."""
    if build is not None:
        weights = model.tok_embeddings.weight
        cache = make_cache(model.args, blocks, BLOCK_SIZE, weights.device, weights.dtype)
        return DecodeRuntime(cache, build(cache, max_batch, max_seq_len, eager), max_batch, max_seq_len, eager, True)
    with _runtime_lock:
        current: DecodeRuntime | None = getattr(model, "decode_runtime", None)
        if current is not None and not current.in_use and current.covers(blocks, max_batch, max_seq_len, eager, exact):
            current.in_use = True
            return current
        keep = current is None or not current.in_use
        if keep and current is not None:
            model.decode_runtime = current = None  # its memory goes before the new cache is allocated
    weights = model.tok_embeddings.weight
    cache = make_cache(model.args, blocks, BLOCK_SIZE, weights.device, weights.dtype)
    runtime = DecodeRuntime(cache, make_decode(model, cache, max_batch, max_seq_len, eager), max_batch,
                            max_seq_len, eager, in_use=True)
    with _runtime_lock:
        if keep and getattr(model, "decode_runtime", None) is None:
            model.decode_runtime = runtime
    return runtime
