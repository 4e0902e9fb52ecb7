"""The collectives of a tensor-parallel forward pass, added to our `Transformer` from outside.

A rank's model is model.py's `Transformer` built with the rank's own head counts and feed-forward width
(`TPLayout.local_args`), then changed in four places (gpt-fast's way: the model code stays single-device):
- each attention block and each feed-forward block ends with an all-reduce (sum) of its output: wo and w2
  are row-parallel, so every rank holds a partial sum of the whole (B, T, dim) output;
- `tok_embeddings` becomes a `ParallelEmbedding` (this rank's columns of the table, all-gathered);
- the output head becomes a `VocabParallelHead` (this rank's rows of the vocabulary, logits all-gathered)
  or, for a model whose output shares the embedding, a `TiedParallelHead` (the rank's columns of the
  embedding times its slice of h, all-reduced).
Every collective is a plain `torch.distributed` call on the default stream, so on CUDA a captured decode
graph records it like any other kernel (NCCL supports capture); on the CPU they run over gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qgpt_code.distributed.layout import TPLayout
from qgpt_code.model import Transformer


def all_gather_last(x: torch.Tensor, world: int) -> torch.Tensor:
    """(..., d) on each rank -> (..., world * d): the ranks' parts side by side, in rank order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


class ParallelEmbedding(nn.Module):
    """fairscale's ParallelEmbedding: this rank holds columns [r*D/N, (r+1)*D/N) of the (V, D) table."""

    def __init__(self, vocab_size: int, local_dim: int, world: int):
        super().__init__()
        self.world = world
        self.weight = nn.Parameter(torch.empty(vocab_size, local_dim))  # (V, D/N)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last(F.embedding(tokens, self.weight), self.world)  # (B, T, D/N) -> (B, T, D)


class VocabParallelHead(nn.Module):
    """The output projection split on the vocabulary: `proj` (V/N rows) gives this rank's logits, gathered."""

    def __init__(self, proj: nn.Module, world: int):
        super().__init__()
        self.proj, self.world = proj, world  # proj: nn.Linear(D, V/N) or its int8 form

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.proj(h), self.world)  # (B, T, V/N) -> (B, T, V)


class TiedParallelHead(nn.Module):
    """Logits with the (V, D/N) embedding slice: h's matching columns times it is a partial sum; all-reduce."""

    def __init__(self, embedding: ParallelEmbedding, rank: int):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its weight belongs to tok_embeddings
        self.rank = rank

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight  # (V, D/N)
        width = weight.shape[1]
        logits = F.linear(h[..., self.rank * width : (self.rank + 1) * width], weight)  # (B, T, V) partial
        dist.all_reduce(logits)
        return logits


def _all_reduce_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)  # in place: (B, T, dim) partial sums -> the block's whole output
    return output


def shard_transformer(layout: TPLayout) -> Transformer:
    """This rank's model on the meta device, ready for `load_state_dict(..., assign=True)`: parameters
    `tok_embeddings.weight` (V, D/N), `output.proj.weight` (V/N, D) unless tied, and the layers' own
    (fused wqkv, wo, w13, w2 with this rank's rows or columns)."""
    args = layout.local_args
    with torch.device("meta"):
        model = Transformer(args)
        embedding = ParallelEmbedding(args.vocab_size, args.dim // layout.world, layout.world)
        model.tok_embeddings = embedding
        if args.tie_embeddings:
            model.output = TiedParallelHead(embedding, layout.rank)
        else:
            model.output = VocabParallelHead(nn.Linear(args.dim, args.vocab_size // layout.world, bias=False),
                                             layout.world)
    for block in model.layers:
        block.attention.register_forward_hook(_all_reduce_output)
        block.feed_forward.register_forward_hook(_all_reduce_output)
    return model


def quantize_sharded_int8(model: Transformer) -> Transformer:
    """`--quantize int8` for a rank's model: the same layers as quantize.quantize_int8, each rank its own
    slice (column-parallel rows keep one GPU's per-row scales; row-parallel wo/w2 get scales over the
    rank's columns only, slightly finer), and the head's `proj` instead of the head (the gather must stay)."""
    from qgpt_code.quantize import QUANTIZED_LAYERS, Int8Linear

    for block in model.layers:
        for path in QUANTIZED_LAYERS:
            parent_name, child_name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child_name, Int8Linear.from_linear(getattr(parent, child_name)))
    if isinstance(model.output, VocabParallelHead):
        model.output.proj = Int8Linear.from_linear(model.output.proj)
    return model
