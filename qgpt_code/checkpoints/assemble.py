"""Turning named tensors from any checkpoint format into a `Transformer` on the target device.

Each format module yields `(our_name, tensor, source_file)` in Meta naming; this module checks every
name and shape against the architecture, converts each tensor to the runtime device and dtype one at a
time, and assigns it into a model built on the meta device. The weights are thus allocated once, on the
target device: host RAM holds at most one converted tensor beyond the (memory-mapped) files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from qgpt_code.config import ModelArgs
from qgpt_code.errors import CheckpointError
from qgpt_code.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported where weights are built: reading a header (`qgpt models`) needs none
    import torch

    from qgpt_code.model import Transformer

NamedTensors = Iterable[tuple[str, "torch.Tensor", "str | Path"]]  # (Meta name, tensor, file(s) it came from)
Progress = Callable[[int, int], None]  # (tensors done, tensors in all)


@dataclass
class ModelInfo:
    """What a checkpoint is, for listings, prompt formats and error messages."""

    path: Path
    format: str  # "meta" | "hf" | "gguf"
    args: ModelArgs
    name: str
    quantization: str | None = None  # e.g. "Q4_1" for GGUF; None: plain floats
    chat_format: str = "llama2"  # "llama2" ([INST] dialogs) or "template" (chat_template below)
    chat_template: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A model ready to run, with the tokenizer that belongs to it."""

    model: Transformer
    tokenizer: Tokenizer
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype


def meta_name(name: str, top_names: dict[str, str], layer_pattern: str, layer_names: dict[str, str]) -> str | None:
    """The Meta name of a tensor named in another format: a whole-model name from `top_names`, or a
    per-layer weight whose `layer_pattern` captures (layer index, layer-local name); None otherwise."""
    if name in top_names:
        return top_names[name]
    match = re.fullmatch(layer_pattern, name)
    if match and match.group(2) in layer_names:
        return f"layers.{match.group(1)}.{layer_names[match.group(2)]}.weight"
    return None


def build_model(
    args: ModelArgs,
    tensors: NamedTensors,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress | None = None,
) -> Transformer:
    """Check each checkpoint tensor and copy it into its place in our parameters on `device`, then
    assign those parameters to a meta-device model (weights allocated once, where they will run).

    A tensor may come as a `BlockTensor` (a GGUF file's quantized blocks, kept on the CPU): the
    projections whose parts all come so become BlockQuantLinear modules (quant_blocks.py); a
    quantized embedding table is dequantized for the lookup and, when tied, kept in blocks as the head."""
    import torch

    from qgpt_code.model import Transformer, checkpoint_layout

    params, blocks = fill_parameters(checkpoint_layout(args), tensors, args, device, dtype, progress)
    modules = _block_modules(args, blocks, params)
    with torch.device("meta"):
        model = Transformer(args)
    result = model.load_state_dict(params, strict=False, assign=True)
    replaced = {f"{path}.weight" for path in modules} - ({"output.weight"} if args.tie_embeddings else set())
    if result.unexpected_keys or set(result.missing_keys) != replaced:
        raise CheckpointError(f"weights do not fit the model: missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys}")
    for path, module in modules.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    model.init_rope()
    return model.eval().requires_grad_(False)


def fill_parameters(
    slots: dict, tensors: NamedTensors, args: ModelArgs, device: torch.device, dtype: torch.dtype,
    progress: Progress | None = None,
) -> tuple[dict, dict]:
    """Check each tensor against its slot (name -> CheckpointSlot: which parameter, which rows, what
    shape) and copy it into that parameter, allocated on `device` when its first part arrives; refuse
    an unknown or missing tensor. Returns (parameter name -> tensor, parameter name -> [(first row,
    BlockTensor)] for the parts that came as quantized blocks, which are kept as they are)."""
    from qgpt_code.quant_blocks import BlockTensor

    param_rows: dict[str, int] = {}  # a fused parameter is as tall as its last slot's end
    for slot in slots.values():
        param_rows[slot.param] = max(param_rows.get(slot.param, 0), slot.stop)
    params: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[tuple[int, BlockTensor]]] = {}  # param -> (first row, quantized part)
    filled: set[str] = set()
    for name, tensor, source in tensors:
        slot = slots.get(name)
        if slot is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for this architecture")
        if tuple(tensor.shape) != slot.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {slot.shape}")
        if isinstance(tensor, BlockTensor):
            blocks.setdefault(slot.param, []).append((slot.start, tensor))
        else:
            if slot.param not in params:
                shape = (param_rows[slot.param], *slot.shape[1:])
                params[slot.param] = allocate_param(slot.param, shape, args, device, dtype)
            params[slot.param][slot.start : slot.stop].copy_(tensor)  # converts dtype and device in one go
        filled.add(name)
        if progress:
            progress(len(filled), len(slots))
    missing = sorted(set(slots) - filled)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"checkpoint is missing tensor(s) {shown}")
    return params, blocks


def _block_modules(args: ModelArgs, blocks: dict, params: dict) -> dict:
    """Module path -> BlockQuantLinear for each parameter that came in blocks; the embedding table,
    and any parameter that also had float parts, dequantized into `params` instead."""
    import numpy as np
    import torch

    from qgpt_code.quant_blocks import BlockQuantLinear, BlockTensor

    modules = {}
    for param, parts in blocks.items():
        parts.sort(key=lambda item: item[0])
        if param == "tok_embeddings.weight":
            (_, table), = parts
            params[param] = table.dequantize()  # row-major: only gathered from, the head reads the blocks
            if args.tie_embeddings:
                modules["output"] = BlockQuantLinear([table])
        elif param in params:  # part float, part blocks: all float
            for start, part in parts:
                params[param][start : start + part.rows].copy_(part.dequantize())
        else:  # consecutive parts of one format become one (one kernel call)
            merged: list[BlockTensor] = []
            for _, part in parts:
                if merged and merged[-1].fmt == part.fmt:  # numpy: torch.cat of uint8 took 1.6 s for SmolLM2
                    data = np.concatenate([merged[-1].data.numpy(), part.data.numpy()])
                    merged[-1] = BlockTensor(part.fmt, torch.from_numpy(data), part.cols)
                else:
                    merged.append(part)
            modules[param.removesuffix(".weight")] = BlockQuantLinear(merged)
    return modules


def allocate_param(name: str, shape: tuple[int, ...], args: ModelArgs, device: torch.device, dtype: torch.dtype):
    """Uninitialised storage for one parameter. On the CPU, every matrix that multiplies activations
    is stored transposed (column-major: same shape and values, W.t() contiguous), because CPU BLAS
    computes x @ W.t() much faster from that layout at small batch: a SmolLM2 decode step took 0.8x the
    time at batch 1 and 0.6x at batch 8 (8 streams in `bench/prefix_cpu.py`: 2.8x -> 3.9x one). GPUs keep the
    usual layout, which cuBLAS handles best. The input embedding is only gathered from (rows), so it
    stays row-major unless it doubles as the output projection."""
    import torch

    projects = len(shape) == 2 and (name != "tok_embeddings.weight" or args.tie_embeddings)
    if torch.device(device).type == "cpu" and projects:
        return torch.empty_strided(shape, (1, shape[0]), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def check_tokenizer_fits(tokenizer: Tokenizer, args: ModelArgs, source: str) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, or one clearly made for another vocabulary.

    Models may pad their embedding table beyond the tokenizer (e.g. to a multiple of 64), so a
    tokenizer slightly smaller than the table is fine; one larger, or far smaller, is not.
    """
    n_tok, n_model = tokenizer.vocab_size, args.vocab_size
    if n_tok > n_model or n_tok < n_model - max(128, n_model // 100):
        raise CheckpointError(
            f"{source}: tokenizer has {n_tok} tokens but the model's vocabulary has {n_model}; "
            "this tokenizer belongs to another model (pass the right one with --tokenizer)"
        )
