"""The Llama 2 transformer, read top-down: parts first, then the model.

Weights use Meta's names and layouts (`layers.0.attention.wq.weight`, rotary pairs interleaved), except
that q/k/v and w1/w3 are fused for speed; `checkpoint_layout` says where each Meta-named tensor goes,
and the other formats are converted to Meta names first. `forward` takes token ids,
their positions and an optional paged `KVCache` with each row's block table; every row of a batch may
sit at its own position, which is what continuous batching needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from qgpt_code.config import ModelArgs
from qgpt_code.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op: same math in fp32
        # Normalise in float32 whatever the activations' dtype, then scale in theirs, as Meta does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(head_dim: int, max_seq_len: int, theta: float, device=None, scaling: float = 1.0) -> torch.Tensor:
    """Every position's rotations as unit complex numbers, (max_seq_len, head_dim // 2) complex64.
    `scaling` > 1 is linear position interpolation (HF rope_scaling type "linear"): position p turns
    as p / scaling did, so a context `scaling` times longer spans the angles the model was trained on."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32) / scaling
    angles = torch.outer(positions, inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by rotations (B, T, 1, hd/2) complex.

    Meta's formulation: each pair is one complex number, so the rotation is one complex product
    (a handful of ops where the cos/sin form needs a dozen; decode is bound by op count)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
    return torch.view_as_real(pairs * rotations).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (n_kv_heads <= n_heads).

    The q, k and v projections are one fused weight `wqkv` (rows: q heads, then k heads, then v
    heads), so a decode step reads them in one matrix-vector product; checkpoints still speak of
    wq/wk/wv, and `checkpoint_layout` maps those names onto row ranges of the fused weight.
    """

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, dim)
        rotations: torch.Tensor,  # (B, T, 1, hd/2) complex: each token's rotary angles
        mask: torch.Tensor | CausalBias | None,  # (B, 1, T, S) additive (0: may attend, -inf: may not),
        # a causal bias for a prompt chunk, or None: every query sees every key
        cache: KVCache | None,
        tables: torch.Tensor | None,  # (B, W) each row's cache blocks, in order
        slots: tuple[torch.Tensor, torch.Tensor] | None,  # (block ids, offsets), (B, T) each: where k, v go
        kv_len: int,  # keys attended: the first kv_len positions of the blocks laid end to end
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv_heads], rotations)  # q and k heads in one go
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)  # (B, T, H, hd), (B, T, n_kv, hd)
        v = qkv[:, :, self.n_heads + self.n_kv_heads :]  # (B, T, n_kv, hd)
        if cache is not None:
            cache.write(self.layer_id, *slots, k, v)
            keys, values = cache.gather(self.layer_id, tables)  # (B, n_kv, W * bs, hd)
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]  # (B, n_kv, S, hd): views
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_kv, T, hd)
        if T == 1:
            # One query per row: the query heads sharing a KV head become that head's queries, so
            # attention runs on the KV heads as they are (no repeat) and the mask broadcasts.
            group = self.n_heads // self.n_kv_heads
            out = F.scaled_dot_product_attention(
                q.view(B, self.n_kv_heads, group, self.head_dim), keys, values, attn_mask=mask
            )  # (B, n_kv, group, hd): heads in q's order
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
            ).transpose(1, 2)  # (B, T, H, hd)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one weight `w13` (w1's rows first)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), *attn_args)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass(frozen=True)
class CheckpointSlot:
    """Where a checkpoint tensor lives in our parameters: rows [start, stop) of `param`."""

    param: str
    start: int
    stop: int
    shape: tuple[int, ...]  # the checkpoint tensor's shape


def checkpoint_layout(args: ModelArgs) -> dict[str, CheckpointSlot]:
    """Every tensor of a Meta-named checkpoint mapped onto our (partly fused) parameters."""
    q, kv, hidden, dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim, args.dim
    layout = {"tok_embeddings.weight": CheckpointSlot("tok_embeddings.weight", 0, args.vocab_size, (args.vocab_size, dim)),
              "norm.weight": CheckpointSlot("norm.weight", 0, dim, (dim,))}
    if not args.tie_embeddings:
        layout["output.weight"] = CheckpointSlot("output.weight", 0, args.vocab_size, (args.vocab_size, dim))
    for i in range(args.n_layers):
        attn, ffn = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        layout.update({
            f"{attn}.wq.weight": CheckpointSlot(f"{attn}.wqkv.weight", 0, q, (q, dim)),
            f"{attn}.wk.weight": CheckpointSlot(f"{attn}.wqkv.weight", q, q + kv, (kv, dim)),
            f"{attn}.wv.weight": CheckpointSlot(f"{attn}.wqkv.weight", q + kv, q + 2 * kv, (kv, dim)),
            f"{attn}.wo.weight": CheckpointSlot(f"{attn}.wo.weight", 0, dim, (dim, q)),
            f"{ffn}.w1.weight": CheckpointSlot(f"{ffn}.w13.weight", 0, hidden, (hidden, dim)),
            f"{ffn}.w3.weight": CheckpointSlot(f"{ffn}.w13.weight", hidden, 2 * hidden, (hidden, dim)),
            f"{ffn}.w2.weight": CheckpointSlot(f"{ffn}.w2.weight", 0, dim, (dim, hidden)),
            f"layers.{i}.attention_norm.weight": CheckpointSlot(f"layers.{i}.attention_norm.weight", 0, dim, (dim,)),
            f"layers.{i}.ffn_norm.weight": CheckpointSlot(f"layers.{i}.ffn_norm.weight", 0, dim, (dim,)),
        })
    return layout


def checkpoint_tensors(model: "Transformer") -> dict[str, torch.Tensor]:
    """The model's weights under Meta checkpoint names (views into our fused parameters)."""
    params = dict(model.named_parameters())
    return {name: params[slot.param][slot.start : slot.stop] for name, slot in checkpoint_layout(model.args).items()}


def projections_of(model: "Transformer") -> list[nn.Module]:
    """Every module that multiplies activations by a weight in a decode step, in order: per layer
    wqkv, wo, w13, w2, then the output head (none for a tied model, which uses the embedding table)."""
    modules = []
    for layer in model.layers:
        modules += [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2]
    return modules + ([model.output] if model.output is not None else [])


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Embedding's own init (normal_) on the meta device costs seconds the first time it runs (it
        # loads Python decompositions); checkpoints overwrite it anyway, so initialise only real weights.
        embedding = torch.empty(args.vocab_size, args.dim)
        if embedding.device.type != "meta":
            nn.init.normal_(embedding)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=embedding)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied models project with tok_embeddings.weight and have no output weight of their own.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", torch.empty(0, dtype=torch.complex64), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_rope()

    def init_rope(self, max_seq_len: int | None = None) -> None:
        """(Re)build the rotary tables on the weights' device; called after weights are assigned."""
        length = max(max_seq_len or 0, self.args.max_seq_len)
        self.rope = rope_table(self.args.head_dim, length, self.args.rope_theta, self.tok_embeddings.weight.device,
                               self.args.rope_scaling_factor)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor,  # (B, T) int64: each token's position in its sequence
        cache: KVCache | None = None,
        tables: torch.Tensor | None = None,  # (B, W) int64: each row's cache blocks (with a cache)
        kv_len: int | None = None,  # attend to positions [0, kv_len); None: all W * block_size
        last_index: torch.Tensor | None = None,  # (B,) compute logits only at tokens[b, last_index[b]]
        causal_from: int | None = None,  # every row's tokens sit at positions causal_from, causal_from+1, ...
    ) -> torch.Tensor:
        """Logits (B, T, vocab) float32, or (B, 1, vocab) when `last_index` is given.

        With a cache, each token's keys/values are written at its position of its row's blocks, and
        attention reads the blocks back through `tables` (a gather: the reference path; the fused CPU
        decode step reads them in place). Every tensor argument may be a static buffer of a captured
        CUDA graph: no host work depends on their values. `causal_from` (kv_len = causal_from + T) lets
        attention use the causal kernels (flash attention on a GPU) instead of an explicit mask: a
        prompt chunk.
        """
        B, T = tokens.shape
        rotations = self.rope[positions][:, :, None, :]  # (B, T, 1, hd/2) complex
        if cache is None:
            kv_len, slots = T, None
            key_positions = positions[:, None, :]  # (B, 1, T)
        else:
            kv_len = kv_len or tables.shape[1] * cache.block_size
            slots = cache.slots(tables, positions)
            key_positions = torch.arange(kv_len, device=tokens.device)[None, None, :]  # (1, 1, S)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if cache is not None and causal_from is not None:
            if kv_len != causal_from + T:
                raise ValueError(f"causal_from={causal_from} needs kv_len={causal_from + T}, got {kv_len}")
            mask = None if T == 1 else causal_lower_right(T, kv_len)  # one query sees every key
        else:
            # Additive, built once for all layers (SDPA would convert a boolean mask in every layer).
            hidden = (key_positions > positions[:, :, None]).unsqueeze(1)  # (B, 1, T, S): keys a query may not see
            mask = torch.zeros(hidden.shape, dtype=h.dtype, device=h.device).masked_fill_(hidden, float("-inf"))
        for layer in self.layers:
            h = layer(h, rotations, mask, cache, tables, slots, kv_len)
        if last_index is not None:
            h = h[torch.arange(B, device=h.device), last_index][:, None, :]  # (B, 1, dim)
        h = self.norm(h)
        logits = F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        return logits.float()
