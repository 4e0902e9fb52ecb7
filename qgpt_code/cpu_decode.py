"""The float32 decode step on the CPU with its small operations fused into C (cpu_kernels.c).

Per layer it makes four matrix products (PyTorch's BLAS, into preallocated buffers) and three
kernel calls (norm with the residual add, attention with rotary and the cache write, SwiGLU)
instead of some forty PyTorch operations, whose dispatch cost as much as the arithmetic they do.
The math is model.py's, in float32; tests hold the two to the same logits and greedy tokens.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from qgpt_code.kv_cache import KVCache
from qgpt_code.model import Transformer


def supports(model: Transformer, cache: KVCache) -> bool:
    """Whether the fused step can run this model: float32 on the CPU, plain (unquantized) linears."""
    weights = model.tok_embeddings.weight
    linears = [model.output] if model.output is not None else []
    for layer in model.layers:
        linears += [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2]
    return (
        weights.device.type == "cpu"
        and weights.dtype == cache.k.dtype == torch.float32
        and all(type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32 for m in linears)
    )


@dataclass
class LayerWeights:
    """One layer's matrices as (in, out) for `x @ w` (views: column-major weights make them contiguous)."""

    wqkv: torch.Tensor
    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    attention_norm: int  # addresses of the norm weights (dim,)
    ffn_norm: int


class Activations:
    """Every intermediate of a step at one batch size, allocated once and reused."""

    def __init__(self, model: Transformer, batch: int, max_seq_len: int):
        args = model.args
        qkv_width = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        new = lambda *shape: torch.empty(shape, dtype=torch.float32)  # noqa: E731
        self.h = new(batch, args.dim)  # the residual stream
        self.x = new(batch, args.dim)  # normalised input of the next product
        self.delta = new(batch, args.dim)  # a block's output, added to h by the next norm
        self.qkv = new(batch, qkv_width)
        self.attention = new(batch, args.n_heads * args.head_dim)
        self.gate_up = new(batch, 2 * args.hidden_dim)
        self.hidden = new(batch, args.hidden_dim)
        self.scratch = new(batch * args.n_heads * (args.head_dim + max_seq_len))  # attention's working space


class NativeCpuDecode:
    """A decode step with the same contract as `EagerDecode`: (tokens, positions, rows, kv_len) -> (B, vocab).

    `kv_len` is ignored: each row attends to exactly the positions up to its own."""

    def __init__(self, model: Transformer, cache: KVCache, kernels: ctypes.CDLL):
        self.model, self.cache, self.kernels = model, cache, kernels
        self.layers = [
            LayerWeights(
                layer.attention.wqkv.weight.t(), layer.attention.wo.weight.t(),
                layer.feed_forward.w13.weight.t(), layer.feed_forward.w2.weight.t(),
                layer.attention_norm.weight.data_ptr(), layer.ffn_norm.weight.data_ptr(),
            )
            for layer in model.layers
        ]
        head = model.tok_embeddings.weight if model.output is None else model.output.weight
        self.output = head.t()  # (dim, vocab)
        self.rope = torch.view_as_real(model.rope).contiguous()  # (positions, hd/2, 2): cos, sin
        self.activations: dict[int, Activations] = {}

    @torch.inference_mode()
    def __call__(self, tokens: Sequence[int], positions: Sequence[int], rows: Sequence[int], kv_len: int) -> torch.Tensor:
        args, kernels, batch = self.model.args, self.kernels, len(tokens)
        # The kernels write where they are told: check every index before any write.
        if max(positions) >= min(self.cache.max_seq_len, len(self.rope)) or min(positions) < 0:
            raise IndexError(f"position {max(positions)} is outside the cache's {self.cache.max_seq_len}")
        if max(rows) >= self.cache.n_rows or min(rows) < 0:
            raise IndexError(f"row {max(rows)} is outside the cache's {self.cache.n_rows} rows")
        a = self.activations.get(batch) or self.activations.setdefault(batch, Activations(self.model, batch, self.cache.max_seq_len))
        torch.index_select(self.model.tok_embeddings.weight, 0, torch.tensor(tokens), out=a.h)
        rows_c, positions_c = (ctypes.c_int64 * batch)(*rows), (ctypes.c_int64 * batch)(*positions)
        h, x, delta = a.h.data_ptr(), a.x.data_ptr(), a.delta.data_ptr()
        layer_stride = self.cache.k[0].numel() * self.cache.k.element_size()
        keys, values = self.cache.k.data_ptr(), self.cache.v.data_ptr()
        residual = None  # nothing to add before the first norm
        for i, w in enumerate(self.layers):
            kernels.add_rms_norm(h, residual, w.attention_norm, x, batch, args.dim, args.norm_eps)
            torch.mm(a.x, w.wqkv, out=a.qkv)
            kernels.decode_attention(
                a.qkv.data_ptr(), keys + i * layer_stride, values + i * layer_stride, self.rope.data_ptr(),
                rows_c, positions_c, a.attention.data_ptr(), a.scratch.data_ptr(),
                batch, args.n_heads, args.n_kv_heads, args.head_dim, self.cache.max_seq_len,
            )
            torch.mm(a.attention, w.wo, out=a.delta)
            kernels.add_rms_norm(h, delta, w.ffn_norm, x, batch, args.dim, args.norm_eps)
            torch.mm(a.x, w.w13, out=a.gate_up)
            kernels.swiglu(a.gate_up.data_ptr(), a.hidden.data_ptr(), batch, args.hidden_dim)
            torch.mm(a.hidden, w.w2, out=a.delta)
            residual = delta
        kernels.add_rms_norm(h, delta, self.model.norm.weight.data_ptr(), x, batch, args.dim, args.norm_eps)
        return torch.mm(a.x, self.output)  # (B, vocab), a new tensor: the caller may keep it
