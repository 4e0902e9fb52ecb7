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
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch

from qgpt_code.kv_cache import KVCache, blocks_for
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

    if eager:
        return EagerDecode(model, cache)
    if model.tok_embeddings.weight.device.type == "cuda":
        return GraphedDecode(model, cache, max_batch, max_seq_len, progress=_stderr_progress)
    if cpu_decode.supports(model, cache) and (kernels := cpu_kernels()) is not None:
        return cpu_decode.NativeCpuDecode(model, cache, kernels, max_seq_len)
    return EagerDecode(model, cache)


def _stderr_progress(done: int, total: int) -> None:
    end = "\n" if done == total else "\r"
    print(f"qgpt: capturing decode graphs: {done}/{total}", end=end, file=sys.stderr, flush=True)
