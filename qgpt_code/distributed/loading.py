"""Each rank reads only its own part of the weights and builds its slice of the model.

- Meta: `consolidated.NN.pth` shard k holds fairscale's slice k of every split tensor. A rank reads the
  shards that overlap its part, memory-mapped, and narrows them; with as many ranks as shards that is
  exactly its own file (and rank r reads vocab_size, when params.json says -1, from that file too).
  With fewer ranks it concatenates neighbouring shards; with more, it narrows one.
- HF safetensors: each tensor's rank part is read through `get_slice` (only those bytes are read).
- GGUF: each tensor is dequantized whole, one at a time, then narrowed (the GGUF loader's public
  `iter_tensors`; quantized blocks run along rows, so a column slice cannot be read on its own).
Host memory per rank: its share of the weights, plus one whole tensor for GGUF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from qgpt_code.checkpoints import detect_format, hf, meta
from qgpt_code.checkpoints.assemble import ModelInfo, Progress, fill_parameters
from qgpt_code.distributed.layout import TPLayout, local_shape
from qgpt_code.distributed.modules import shard_transformer
from qgpt_code.errors import CheckpointError
from qgpt_code.model import CheckpointSlot, Transformer, checkpoint_layout

Pieces = Iterator[tuple[str, torch.Tensor, "str | Path"]]  # (Meta name, this rank's part, source)


def read_rank_checkpoint(path: Path, rank: int, world: int) -> tuple[ModelInfo, TPLayout, Pieces]:
    """What `path` is, this rank's layout, and its parts of every tensor (read lazily, one at a time)."""
    fmt = detect_format(path)
    if fmt == "meta":
        files = meta.shard_files(path)
        home = files[rank * len(files) // world]
        args = meta.read_args(path, home)
        layout = TPLayout(args, rank, world)
        return ModelInfo(path=path, format=fmt, args=args, name=path.name), layout, _meta_pieces(files, layout)
    if fmt == "hf":
        args = hf.read_args(path)
        layout = TPLayout(args, rank, world)
        return ModelInfo(path=path, format=fmt, args=args, name=path.name), layout, _hf_pieces(path, layout)
    from qgpt_code.checkpoints import gguf

    file = gguf.GGUFFile(path)
    info = gguf.read_info(file)
    layout = TPLayout(info.args, rank, world)
    return info, layout, _narrowed(gguf.iter_tensors(file, info.args), layout)


def _meta_pieces(files: list[Path], layout: TPLayout) -> Pieces:
    shapes = {name: slot.shape for name, slot in checkpoint_layout(layout.args).items()}
    opened: dict[int, dict[str, torch.Tensor]] = {}

    def shard(k: int) -> dict[str, torch.Tensor]:
        if k not in opened:
            opened[k] = meta.load_shard(files[k])
        return opened[k]

    def tensor(k: int, name: str) -> torch.Tensor:
        if name not in shard(k):
            raise CheckpointError(f"{files[k]}: checkpoint is missing tensor {name!r}")
        return shard(k)[name]

    n_files, home = len(files), layout.rank * len(files) // layout.world
    for name, shape in shapes.items():
        piece = layout.piece(name)
        if piece is None:  # replicated in every shard: read it from the rank's own
            yield name, tensor(home, name), files[home]
            continue
        if shape[piece.dim] % n_files:
            raise CheckpointError(f"{files[0].parent}: {name!r} ({shape[piece.dim]} wide) cannot be split in {n_files} shards")
        extent = shape[piece.dim] // n_files  # each shard's width along the split dim
        parts, sources = [], []
        for k in range(piece.start // extent, -(-piece.stop // extent)):
            part = tensor(k, name)
            if part.shape[piece.dim] != extent:
                raise CheckpointError(f"{files[k]}: tensor {name!r} has shape {tuple(part.shape)}, "
                                      f"expected {extent} along dim {piece.dim} ({n_files} shards of {shape})")
            start, stop = max(piece.start, k * extent) - k * extent, min(piece.stop, (k + 1) * extent) - k * extent
            parts.append(part.narrow(piece.dim, start, stop - start))
            sources.append(files[k].name)
        yield name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=piece.dim), ", ".join(sources)
    for k, state in opened.items():
        unexpected = set(state) - set(shapes) - meta.IGNORED
        if unexpected:
            raise CheckpointError(f"{files[k]}: unexpected tensor {sorted(unexpected)[0]!r} for this architecture")


def _hf_pieces(path: Path, layout: TPLayout) -> Pieces:
    args, local = layout.args, layout.local_args
    shapes = {name: slot.shape for name, slot in checkpoint_layout(args).items()}
    for file, handle, hf_name, name in hf.stored_tensors(path, args):
        tensor_slice = handle.get_slice(hf_name)
        shape = tuple(tensor_slice.get_shape())
        if name in shapes and shape != shapes[name]:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {shape}, expected {shapes[name]}")
        piece = layout.piece(name)
        if piece is None:
            tensor = tensor_slice[:]
        elif piece.dim == 0:
            tensor = tensor_slice[piece.start : piece.stop]
        else:
            tensor = tensor_slice[:, piece.start : piece.stop]
        heads = {"wq": local.n_heads, "wk": local.n_kv_heads}.get(name.split(".")[-2])
        if heads:  # HF's rotary row order is per head: whole heads slice, then unpermute
            tensor = hf.unpermute_rotary(tensor, heads)
        yield name, tensor, file


def _narrowed(tensors, layout: TPLayout) -> Pieces:
    shapes = {name: slot.shape for name, slot in checkpoint_layout(layout.args).items()}
    for name, tensor, source in tensors:
        piece = layout.piece(name)
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
        yield name, tensor if piece is None else tensor.narrow(piece.dim, piece.start, piece.stop - piece.start), source


def rank_layout(layout: TPLayout) -> dict[str, CheckpointSlot]:
    """Every Meta-named tensor mapped onto this rank's parameters (local shapes)."""
    args = layout.local_args
    slots = checkpoint_layout(args)  # the layers: this rank's heads and width
    vocab, dim, world = args.vocab_size, args.dim, layout.world
    slots["tok_embeddings.weight"] = CheckpointSlot("tok_embeddings.weight", 0, vocab, (vocab, dim // world))
    if "output.weight" in slots:
        slots["output.weight"] = CheckpointSlot("output.proj.weight", 0, vocab // world, (vocab // world, dim))
    for name, slot in slots.items():  # the layout and the reading code agree on every shape
        assert slot.shape == local_shape(checkpoint_layout(layout.args)[name].shape, layout.piece(name)), name
    return slots


def build_rank_model(layout: TPLayout, pieces: Pieces, device: torch.device, dtype: torch.dtype,
                     progress: Progress | None = None) -> Transformer:
    """assemble.build_model for one rank: check each part against the rank's layout, copy it into its
    parameter on `device` (allocated once, there), assign the parameters to `shard_transformer`'s model."""
    params, blocks = fill_parameters(rank_layout(layout), pieces, layout.local_args, device, dtype, progress)
    if blocks:  # the rank loaders hand over float parts only (GGUF under TP holds --dtype weights)
        raise CheckpointError("quantized blocks cannot be split across tensor-parallel ranks")
    model = shard_transformer(layout)
    model.load_state_dict(params, strict=True, assign=True)
    model.init_rope()
    return model.eval().requires_grad_(False)


def split_model(model: Transformer, layout: TPLayout, device=None, dtype=None) -> Transformer:
    """This rank's slice of a whole model already in memory (tests, benchmarks)."""
    from qgpt_code.model import checkpoint_tensors

    weights = model.tok_embeddings.weight
    pieces = ((name, t if (p := layout.piece(name)) is None else t.narrow(p.dim, p.start, p.stop - p.start), "model")
              for name, t in checkpoint_tensors(model).items())
    return build_rank_model(layout, pieces, device or weights.device, dtype or weights.dtype)
