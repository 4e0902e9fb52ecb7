"""The float32 decode step on the CPU with its small operations fused into C (cpu_kernels.c).

Per layer it makes four matrix products (PyTorch's BLAS into preallocated buffers, the C kernels for
weights kept in GGUF's blocks (quant_blocks.py), or the C int8 kernel for weight-only int8 layers)
and three kernel calls (norm with the residual add, attention
with rotary and the cache write, SwiGLU) instead of some forty PyTorch operations, whose dispatch
cost as much as the arithmetic they do. Attention reads and writes the paged cache in place,
through each sequence's block table. The math is model.py's, in float32; tests hold the two to the
same logits.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from qgpt_code.kv_cache import KVCache
from qgpt_code.model import Transformer, projections_of
from qgpt_code.quant_blocks import BlockQuantLinear, FORMAT_IDS
from qgpt_code.quantize import Int8Linear


def _fusable(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return module.bias is None and module.weight.dtype == torch.float32
    if isinstance(module, BlockQuantLinear):
        return True
    return (isinstance(module, Int8Linear) and module.weight.is_contiguous()
            and module.scales.dtype == torch.float32 and module.scales.is_contiguous())


def supports(model: Transformer, cache: KVCache) -> bool:
    """Whether the fused step can run this model: float32 on the CPU, its linear layers float32
    (BLAS), kept in blocks (the block kernels) or weight-only int8 (row-major, float32 scales: the int8 kernel)."""
    weights = model.tok_embeddings.weight
    return (
        weights.device.type == "cpu"
        and weights.dtype == cache.k.dtype == torch.float32
        and all(_fusable(m) for m in projections_of(model))
    )


class FloatProjection:
    """x (B, in) @ W.t() into out (B, out) through BLAS; W.t() is a contiguous view of a column-major weight."""

    def __init__(self, weight: torch.Tensor):
        self.weight_t = weight.t()  # (in, out)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.weight_t, out=out)


class Int8Projection:
    """The same product for an Int8Linear, through the C kernel: the int8 weight is read, not converted."""

    def __init__(self, module: Int8Linear, kernels: ctypes.CDLL):
        self.kernel, self.weight, self.scales = kernels.int8_matmul, module.weight, module.scales

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        (batch, width), outputs = x.shape, out.shape[1]
        self.kernel(x.data_ptr(), self.weight.data_ptr(), self.scales.data_ptr(), out.data_ptr(), batch, width, outputs)
        return out


class BlockProjection:
    """The same product for a BlockQuantLinear, through the block kernels (one call per part, each
    writing its columns of `out`): the blocks are read as stored."""

    def __init__(self, module: BlockQuantLinear, kernels: ctypes.CDLL):
        self.kernel = kernels.quant_matmul
        self.parts = [(FORMAT_IDS[p.fmt], p.data.data_ptr(), p.cols, p.rows) for p in module.parts()]
        self.buffers = [p.data for p in module.parts()]  # keeps the addresses above alive

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch, width = x.shape[0], out.shape[1]
        x_ptr, column = x.data_ptr(), out.data_ptr()
        for fmt, blocks, cols, rows in self.parts:
            if self.kernel(fmt, blocks, x_ptr, column, batch, cols, rows, width, -1, 0) != 0:
                raise RuntimeError("the block kernel refused its arguments")
            column += 4 * rows  # float32 columns
        return out


Projection = FloatProjection | Int8Projection | BlockProjection


def projection(module: nn.Module, kernels: ctypes.CDLL) -> Projection:
    if isinstance(module, BlockQuantLinear):
        return BlockProjection(module, kernels)
    return Int8Projection(module, kernels) if isinstance(module, Int8Linear) else FloatProjection(module.weight)


@dataclass
class LayerWeights:
    """One layer's four projections and the addresses of its norm weights (dim,)."""

    wqkv: Projection
    wo: Projection
    w13: Projection
    w2: Projection
    attention_norm: int
    ffn_norm: int


def _buffer(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32)


class Activations:
    """Every intermediate of a step at one batch size, allocated once and reused."""

    def __init__(self, model: Transformer, batch: int, max_seq_len: int):
        args = model.args
        qkv_width = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.h = _buffer(batch, args.dim)  # the residual stream
        self.x = _buffer(batch, args.dim)  # normalised input of the next product
        self.delta = _buffer(batch, args.dim)  # a block's output, added to h by the next norm
        self.qkv = _buffer(batch, qkv_width)
        self.attention = _buffer(batch, args.n_heads * args.head_dim)
        self.gate_up = _buffer(batch, 2 * args.hidden_dim)
        self.hidden = _buffer(batch, args.hidden_dim)
        self.scratch = _buffer(batch * args.n_heads * (args.head_dim + max_seq_len))  # attention's working space


class ThreadTuner:
    """Every core or one for the C kernels' parallel loops, chosen per batch size by measured step times.

    On a quiet machine every core wins. On one busy with other work, each of a step's ~120 parallel
    loops (the block products, attention) ends in a fork-join that waits for whichever thread the OS has put aside: measured on the
    2-core machine under a load average of 10, the default model's step took 167 ms on two threads
    and 9 ms on one. So steps are timed both ways (a running average per batch size and choice),
    the faster is used, and the other is retried now and then, less often the further behind it
    is, so that trying costs a few percent and a change in the machine's load is noticed. The choice
    never changes results: every output is computed by one thread, in the same order."""

    RETRY_EVERY = 32  # steps between tries of the slower choice, times how many times slower it was
    RETRY_AT_MOST = 256  # steps: the load here flips within seconds (a step read 400 ms, then 4 ms)

    def __init__(self, kernels: ctypes.CDLL):
        self.set_threads = kernels.quant_set_threads
        self.seconds: dict[tuple[int, int], float] = {}  # (batch, threads: 0 all, 1 one) -> average
        self.next_retry: dict[int, int] = {}
        self.steps, self.retrying = 0, False

    def choose(self, batch: int) -> int | None:
        """The choice for this step (None: a batch size's first step, which allocates: not timed)."""
        self.steps += 1
        if batch not in self.next_retry:
            self.next_retry[batch] = 0
            self.set_threads(0)
            return None
        every, one = self.seconds.get((batch, 0)), self.seconds.get((batch, 1))
        self.retrying = False
        if every is None or one is None:
            choice = 0 if every is None else 1
        else:
            best = 0 if every <= one else 1
            retry = self.retrying = self.steps >= self.next_retry.get(batch, 0)
            choice = 1 - best if retry else best
            if retry:
                slower = max(every, one) / min(every, one)
                self.next_retry[batch] = self.steps + min(int(self.RETRY_EVERY * slower), self.RETRY_AT_MOST)
        self.set_threads(choice)
        return choice

    def record(self, batch: int, choice: int | None, seconds: float) -> None:
        """A retried choice's time replaces its old one (a past spike must not keep it out); the
        choice in use is averaged."""
        if choice is None:
            return
        old = self.seconds.get((batch, choice))
        self.seconds[(batch, choice)] = seconds if old is None or self.retrying else 0.75 * old + 0.25 * seconds


class NativeCpuDecode:
    """A decode step on the paged cache: (tokens, positions, tables) -> logits (B, vocab) float32.

    Token b sits at position positions[b] of the sequence whose block table is tables[b]; its keys and
    values are written there and it attends to positions 0..positions[b], read from the blocks where
    they lie. `max_seq_len` bounds the positions (one sequence's length) and sizes attention's scratch."""

    def __init__(self, model: Transformer, cache: KVCache, kernels: ctypes.CDLL, max_seq_len: int):
        self.model, self.cache, self.kernels, self.max_seq_len = model, cache, kernels, max_seq_len
        self.layers = [
            LayerWeights(
                projection(layer.attention.wqkv, kernels), projection(layer.attention.wo, kernels),
                projection(layer.feed_forward.w13, kernels), projection(layer.feed_forward.w2, kernels),
                layer.attention_norm.weight.data_ptr(), layer.ffn_norm.weight.data_ptr(),
            )
            for layer in model.layers
        ]
        # A tied model projects with its (float32) embedding table.
        self.output = (FloatProjection(model.tok_embeddings.weight) if model.output is None
                       else projection(model.output, kernels))
        self.rope = torch.view_as_real(model.rope).contiguous()  # (positions, hd/2, 2): cos, sin
        layer_bytes = cache.k[0].numel() * cache.k.element_size()  # keys of one layer; values alike
        self.layer_caches = [(cache.k.data_ptr() + i * layer_bytes, cache.v.data_ptr() + i * layer_bytes)
                             for i in range(model.args.n_layers)]
        self.activations: dict[int, Activations] = {}
        self.threads = ThreadTuner(kernels)

    def _tables(self, positions: Sequence[int], tables: Sequence[Sequence[int]]) -> tuple[ctypes.Array, int]:
        """The block tables as one (B, W) int64 array, checked: the kernel writes where they say."""
        length, n_blocks, bs = min(self.max_seq_len, len(self.rope)), self.cache.n_blocks, self.cache.block_size
        if bad := [p for p in positions if not 0 <= p < length]:
            raise IndexError(f"position {bad[0]} is outside the {length} positions a sequence may hold")
        for b, (position, table) in enumerate(zip(positions, tables)):
            if len(table) <= position // bs:
                raise IndexError(f"table {b} has {len(table)} blocks: position {position} needs {position // bs + 1}")
            if table and not (0 <= min(table) and max(table) < n_blocks):  # every step: the cheap check first
                bad = next(block for block in table if not 0 <= block < n_blocks)
                raise IndexError(f"block {bad} (table {b}) is outside the cache's {n_blocks} blocks")
        # Only the blocks up to each position are read: the rest of a table need not travel.
        used = [list(table[: position // bs + 1]) for position, table in zip(positions, tables)]
        width = max(len(blocks) for blocks in used)
        flat = [block for blocks in used for block in blocks + [0] * (width - len(blocks))]  # 0: never read
        return (ctypes.c_int64 * len(flat))(*flat), width

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        choice, start = self.threads.choose(len(tokens)), time.perf_counter()
        logits = self._step(tokens, positions, tables)
        self.threads.record(len(tokens), choice, time.perf_counter() - start)
        return logits

    @torch.inference_mode()
    def _step(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        args, kernels, batch = self.model.args, self.kernels, len(tokens)
        if not batch == len(positions) == len(tables):
            raise ValueError(f"{batch} tokens, {len(positions)} positions, {len(tables)} tables")
        tables_c, width = self._tables(positions, tables)  # checked before any write
        a = self.activations.get(batch)
        if a is None:
            a = self.activations[batch] = Activations(self.model, batch, self.max_seq_len)
        torch.index_select(self.model.tok_embeddings.weight, 0, torch.tensor(tokens), out=a.h)
        positions_c = (ctypes.c_int64 * batch)(*positions)
        h, x, delta = a.h.data_ptr(), a.x.data_ptr(), a.delta.data_ptr()
        residual = None  # nothing to add before the first norm
        for w, (keys, values) in zip(self.layers, self.layer_caches):
            kernels.add_rms_norm(h, residual, w.attention_norm, x, batch, args.dim, args.norm_eps)
            w.wqkv(a.x, a.qkv)
            kernels.decode_attention(
                a.qkv.data_ptr(), keys, values, self.rope.data_ptr(), tables_c, width, positions_c,
                a.attention.data_ptr(), a.scratch.data_ptr(), batch, args.n_heads, args.n_kv_heads,
                args.head_dim, self.cache.block_size, self.max_seq_len,
            )
            w.wo(a.attention, a.delta)
            kernels.add_rms_norm(h, delta, w.ffn_norm, x, batch, args.dim, args.norm_eps)
            w.w13(a.x, a.gate_up)
            kernels.swiglu(a.gate_up.data_ptr(), a.hidden.data_ptr(), batch, args.hidden_dim)
            w.w2(a.hidden, a.delta)
            residual = delta
        kernels.add_rms_norm(h, delta, self.model.norm.weight.data_ptr(), x, batch, args.dim, args.norm_eps)
        logits = torch.empty(batch, self.model.args.vocab_size)  # new each step: the caller may keep it
        return self.output(a.x, logits)
