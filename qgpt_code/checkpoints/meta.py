"""Meta checkpoints: `params.json` + `consolidated.NN.pth` shards (one per model-parallel rank).

fairscale splits each weight across ranks: column-parallel layers (wq, wk, wv, w1, w3, output) on
dim 0, row-parallel layers (wo, w2) on dim 1, the embedding (ParallelEmbedding) on dim 1; norms are
replicated. Merging undoes that, so a 13B checkpoint (2 shards) runs on one device.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from qgpt_code.checkpoints.assemble import NamedTensors
from qgpt_code.config import ModelArgs, read_json
from qgpt_code.errors import CheckpointError

if TYPE_CHECKING:
    import torch

IGNORED = {"rope.freqs"}  # a precomputed table some Meta checkpoints carry; we compute our own


def shard_dim(name: str) -> int | None:
    """The dim a weight is split on across model-parallel ranks, or None when replicated."""
    if re.search(r"\.(wq|wk|wv|w1|w3)\.weight$", name) or name == "output.weight":
        return 0
    if re.search(r"\.(wo|w2)\.weight$", name) or name == "tok_embeddings.weight":
        return 1
    return None


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth shards")
    return files


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    """One shard's state dict, memory-mapped; checkpoints are untrusted, so weights_only."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file}: cannot read checkpoint shard ({reason[:200]})") from None


def read_args(path: Path, shard: Path | None = None) -> ModelArgs:
    """Architecture from params.json; a vocab_size of -1 (Llama 2's files) is read off the embedding of
    `shard` (default: the first shard; a tensor-parallel rank names its own, to open no other file)."""
    params = read_json(path / "params.json")
    if params.get("vocab_size", -1) <= 0:
        first_file = shard or shard_files(path)[0]
        embedding = load_shard(first_file).get("tok_embeddings.weight")
        if embedding is None:
            raise CheckpointError(f"{first_file}: no tok_embeddings.weight to size the vocabulary")
        params = {**params, "vocab_size": embedding.shape[0]}  # the embedding is split on dim 1, not 0
    try:
        return ModelArgs.from_meta_params(params)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'params.json'}: invalid architecture ({exc})") from None


def iter_tensors(path: Path) -> NamedTensors:
    """Merged tensors across all shards, one at a time, in Meta naming."""
    files = shard_files(path)
    shards = [load_shard(f) for f in files]
    return _merge(files, shards)


def _merge(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor, str | Path]]:
    import torch

    names = list(shards[0])
    merged_source = f"{files[0]} (+{len(files) - 1} more shards, merged)"
    for file, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(names):
            odd = sorted(set(shard) ^ set(names))[0]
            raise CheckpointError(f"{file}: shard holds a different set of tensors than {files[0].name} (e.g. {odd!r})")
    for name in names:
        if name in IGNORED:
            continue
        parts = [shard[name] for shard in shards]
        dim = shard_dim(name)
        if len(parts) == 1 or dim is None:
            yield name, parts[0], files[0]
            continue
        try:
            yield name, torch.cat(parts, dim=dim), merged_source
        except RuntimeError:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise CheckpointError(f"{merged_source}: shards of {name!r} do not fit together ({shapes})") from None
