"""The decode step: one new token for each running sequence, run eagerly, replayed from CUDA graphs,
or (float32 on the CPU) through the fused kernels of cpu_decode.py.

Decoding one token at a small batch reads every weight once and does little arithmetic, so on a GPU
the time goes to launching a few hundred small kernels unless the whole step is captured once in a
CUDA graph and replayed. A graph fixes every shape and address, so `GraphedDecode` keeps:
- static input buffers (tokens, positions, cache rows) per batch bucket, which each call fills;
- one graph per (batch bucket, key-length bucket): batch buckets are powers of two up to max_batch,
  key-length buckets are the scheduler's `KV_BUCKET` times powers of two up to the cache length, so
  a short sequence does not attend over the whole cache;
- rows beyond the real batch repeat the last real row (same token, position and cache row), so
  they write the same keys and values to the same place and change nothing.
All graphs share one memory pool; each call's logits are valid until the next call.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch

from qgpt_code.kv_cache import KVCache
from qgpt_code.model import Transformer

KV_BUCKET = 256  # attend over the cache in steps of this many positions, not all of it every step
WARMUP_RUNS = 3  # eager runs on a side stream before a capture (lazy initialisation, autotuning)


def kv_bucket(length: int, limit: int) -> int:
    """Keys attended for `length` cached positions: the next multiple of KV_BUCKET, at most `limit`."""
    return min(limit, -(-length // KV_BUCKET) * KV_BUCKET)


def power_of_two_buckets(smallest: int, largest: int) -> list[int]:
    """smallest, 2*smallest, 4*smallest ... and `largest` itself as the last bucket."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    return buckets + [largest]


class EagerDecode:
    """The decode step as plain PyTorch calls (the CPU path, and `--eager` on a GPU)."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int], kv_len: int) -> torch.Tensor:
        """Logits (B, vocab) float32 for token b at `positions[b]` of cache row `rows[b]`."""
        token_ids = torch.tensor([[t] for t in tokens], device=self.device)  # (B, 1)
        where = torch.tensor([[p] for p in positions], device=self.device)  # (B, 1)
        return self.model(token_ids, where, self.cache, rows=list(rows), kv_len=kv_len)[:, -1]


class StaticInputs:
    """The buffers a captured graph reads: (batch, 1) tokens and positions and (batch,) cache rows.
    They start at token 0, position 0, row 0, so warm-up runs only touch row 0's first position."""

    def __init__(self, batch: int, device: torch.device):
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.rows = torch.zeros(batch, dtype=torch.long, device=device)
        # Staged in pinned memory on a GPU: a copy from pageable memory would first wait for the device.
        # Rewriting it next step is safe: each step's sampling waits for the device, copy included.
        self.staging = torch.zeros(3, batch, dtype=torch.long, pin_memory=torch.device(device).type == "cuda")

    def fill(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int]) -> None:
        """Copy one step's inputs in, padding by repeating the last real row."""
        pad = len(self.rows) - len(tokens)
        self.staging.copy_(torch.tensor(
            [[*tokens, *[tokens[-1]] * pad], [*positions, *[positions[-1]] * pad], [*rows, *[rows[-1]] * pad]]
        ))  # (3, batch): one transfer for all three
        values = self.staging.to(self.rows.device, non_blocking=True)
        self.tokens.copy_(values[0, :, None])
        self.positions.copy_(values[1, :, None])
        self.rows.copy_(values[2])


class GraphedDecode:
    """The decode step replayed from CUDA graphs captured once, before the cache holds anything.

    `capture` is how a step is recorded: `cuda_capture` on a GPU; tests on the CPU pass a recorder
    that re-runs the step on the static buffers (what a replay does), to check the buffer logic.
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        max_batch: int,
        capture: Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device
        self.batch_buckets = power_of_two_buckets(1, max_batch)
        self.kv_buckets = power_of_two_buckets(min(KV_BUCKET, cache.max_seq_len), cache.max_seq_len)
        self.inputs = {b: StaticInputs(b, self.device) for b in self.batch_buckets}
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        capture = capture or cuda_capture()
        shapes = [(b, s) for b in self.batch_buckets for s in self.kv_buckets]
        with torch.inference_mode():
            for done, (batch, keys) in enumerate(shapes, 1):
                self.graphs[batch, keys] = capture(self._step_fn(batch, keys))
                if progress:
                    progress(done, len(shapes))
        cache.k.zero_()  # the warm-up runs wrote into row 0
        cache.v.zero_()

    def _step_fn(self, batch: int, keys: int) -> Callable[[], torch.Tensor]:
        inputs = self.inputs[batch]

        def step() -> torch.Tensor:  # (batch, vocab) float32
            logits = self.model(inputs.tokens, inputs.positions, self.cache, rows=inputs.rows, kv_len=keys)
            return logits[:, -1]

        return step

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int], kv_len: int) -> torch.Tensor:
        """Logits (B, vocab) float32, as EagerDecode; a view into the graph's output, valid until the next call."""
        batch = next(b for b in self.batch_buckets if b >= len(tokens))
        keys = next(s for s in self.kv_buckets if s >= kv_len)
        self.inputs[batch].fill(tokens, positions, rows)
        replay, logits = self.graphs[batch, keys]
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


def make_decode(model: Transformer, cache: KVCache, max_batch: int, eager: bool = False):
    """The fastest decode step for this model: CUDA graphs on a GPU, the fused kernels for a float32
    model on the CPU (when a C compiler can build them), else plain PyTorch; `eager` forces the last."""
    from qgpt_code import cpu_decode
    from qgpt_code.native import cpu_kernels

    if eager:
        return EagerDecode(model, cache)
    if model.tok_embeddings.weight.device.type == "cuda":
        return GraphedDecode(model, cache, max_batch, progress=_stderr_progress)
    if cpu_decode.supports(model, cache) and (kernels := cpu_kernels()) is not None:
        return cpu_decode.NativeCpuDecode(model, cache, kernels)
    return EagerDecode(model, cache)


def _stderr_progress(done: int, total: int) -> None:
    end = "\n" if done == total else "\r"
    print(f"qgpt: capturing decode graphs: {done}/{total}", end=end, file=sys.stderr, flush=True)
