"""Which part of every weight a tensor-parallel rank holds (Meta's fairscale layout), as pure arithmetic.

With N ranks, rank r holds:
- attention: query heads [r*H/N, (r+1)*H/N) -- rows of wq, columns of wo -- and the key/value heads those
  queries read: rows [r*K/N, (r+1)*K/N) of wk/wv when N divides K (the KV heads), or the one KV head of its
  queries when K divides N (each KV head then lives on N/K ranks: "replicated");
- feed-forward: rows [r*F/N, (r+1)*F/N) of w1 and w3, the same columns of w2;
- tok_embeddings: columns [r*D/N, (r+1)*D/N) (fairscale's ParallelEmbedding: split on the embedding dim);
- output: rows [r*V/N, (r+1)*V/N) (column-parallel: each rank computes its slice of the vocabulary);
- norms: whole.
These are exactly the slices fairscale wrote into `consolidated.NN.pth` when N equals the number of
shards, so each rank can read its own file. Nothing here imports torch.distributed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qgpt_code.config import ModelArgs
from qgpt_code.errors import QGPTError

_LAYER = re.compile(r"layers\.\d+\.(attention|feed_forward)\.(wq|wk|wv|wo|w1|w2|w3)\.weight")


class LayoutError(QGPTError):
    """The model cannot be split over this many ranks (the message says which width does not divide)."""


@dataclass(frozen=True)
class Piece:
    """Rank's part of a whole tensor: indices [start, stop) along `dim`."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class TPLayout:
    args: ModelArgs  # the whole model
    rank: int
    world: int

    def __post_init__(self) -> None:
        a, n = self.args, self.world
        if not 0 <= self.rank < n:
            raise LayoutError(f"rank {self.rank} is not one of {n} ranks")
        checks = [("n_heads", a.n_heads), ("hidden_dim", a.hidden_dim), ("dim", a.dim)]
        if not a.tie_embeddings:
            checks.append(("vocab_size", a.vocab_size))
        for name, value in checks:
            if value % n:
                raise LayoutError(f"tensor parallelism over {n} ranks needs {name}={value} to be a multiple of {n}: "
                                  f"run with a --nproc_per_node that divides it")
        if a.n_kv_heads % n and n % a.n_kv_heads:
            raise LayoutError(f"tensor parallelism over {n} ranks needs n_kv_heads={a.n_kv_heads} to divide {n} "
                              f"or {n} to divide it")

    @property
    def kv_replicated(self) -> bool:
        """True when there are fewer KV heads than ranks: each rank keeps the one its queries read."""
        return self.args.n_kv_heads < self.world

    @property
    def q_heads(self) -> range:
        per = self.args.n_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> range:
        if self.kv_replicated:
            head = self.rank // (self.world // self.args.n_kv_heads)
            return range(head, head + 1)
        per = self.args.n_kv_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def local_args(self) -> ModelArgs:
        """The architecture of this rank's slice: its heads and feed-forward width; dim and vocabulary whole
        (the activations between layers are whole on every rank)."""
        a = self.args
        return a.replace(n_heads=len(self.q_heads), n_kv_heads=len(self.kv_heads), head_dim=a.head_dim,
                         hidden_dim=a.hidden_dim // self.world)

    def _split(self, size: int) -> tuple[int, int]:
        per = size // self.world
        return self.rank * per, (self.rank + 1) * per

    def piece(self, name: str) -> Piece | None:
        """This rank's part of the Meta-named tensor `name`; None for a tensor every rank holds whole."""
        a, hd = self.args, self.args.head_dim
        if name == "tok_embeddings.weight":
            return Piece(1, *self._split(a.dim))
        if name == "output.weight":
            return Piece(0, *self._split(a.vocab_size))
        match = _LAYER.fullmatch(name)
        if match is None:
            return None  # norms
        kind = match.group(2)
        if kind in ("wq", "wo"):
            heads = self.q_heads
            return Piece(0 if kind == "wq" else 1, heads.start * hd, heads.stop * hd)
        if kind in ("wk", "wv"):
            return Piece(0, self.kv_heads.start * hd, self.kv_heads.stop * hd)
        return Piece(1 if kind == "w2" else 0, *self._split(a.hidden_dim))


def local_shape(shape: tuple[int, ...], piece: Piece | None) -> tuple[int, ...]:
    if piece is None:
        return tuple(shape)
    return tuple(piece.stop - piece.start if d == piece.dim else s for d, s in enumerate(shape))
