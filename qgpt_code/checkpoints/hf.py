"""Hugging Face checkpoints: `config.json` + `*.safetensors` of a `LlamaForCausalLM`.

HF stores q/k projections with rows permuted so that its `rotate_half` rotary embedding pairs
dimension i with i + hd/2; Meta pairs 2i with 2i+1. `unpermute_rotary` undoes HF's permutation
(the inverse of `permute` in transformers' `convert_llama_weights_to_hf.py`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from qgpt_code.checkpoints.assemble import NamedTensors, meta_name
from qgpt_code.config import ModelArgs, read_json
from qgpt_code.errors import CheckpointError

if TYPE_CHECKING:
    import torch

IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_args(path: Path) -> ModelArgs:
    config = read_json(path / "config.json")
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in architectures:
        raise CheckpointError(f"{path / 'config.json'}: model_type {config.get('model_type')!r} is not a llama model")
    try:
        return ModelArgs.from_hf_config(config)
    except CheckpointError as exc:  # a setting this engine refuses (rope_scaling), named in the message
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: invalid llama config ({exc!r})") from None


def our_name(hf_name: str) -> str | None:
    """Meta name for an HF tensor name; None when it has no counterpart."""
    return meta_name(hf_name, TOP_NAMES, r"model\.layers\.(\d+)\.(.+)\.weight", LAYER_NAMES)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads*hd, dim) from HF's half-split rotary row order back to Meta's interleaved order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary row order to HF's (used to write HF checkpoints)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin files: convert them to safetensors)" if any(path.glob("*.bin")) else ""
        raise CheckpointError(f"{path}: config.json found but no *.safetensors weights{hint}")
    return files


def iter_tensors(path: Path, args: ModelArgs) -> NamedTensors:
    return _iter(path, args)


def stored_tensors(path: Path, args: ModelArgs) -> Iterator[tuple[Path, Any, str, str]]:
    """(file, its open safetensors handle, the HF name, our name) for each tensor the model needs, in
    file order: ignored names skipped, an unknown one refused, a tied model's stored lm_head skipped."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(path):
        try:
            handle = safe_open(str(file), framework="pt")
            names = list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
        for hf_name in names:
            if IGNORED.search(hf_name):
                continue
            name = our_name(hf_name)
            if name is None:
                raise CheckpointError(f"{file}: unknown tensor {hf_name!r} for a llama model")
            if name == "output.weight" and args.tie_embeddings:
                continue  # a tied model may still store lm_head; it equals the embedding
            yield file, handle, hf_name, name


def _iter(path: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, Path]]:
    from safetensors import SafetensorError

    for file, handle, hf_name, name in stored_tensors(path, args):
        try:
            tensor = handle.get_tensor(hf_name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read tensor {hf_name!r} ({exc})") from None
        heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(name.split(".")[-2])
        if heads and tuple(tensor.shape) == (heads * args.head_dim, args.dim):
            tensor = unpermute_rotary(tensor, heads)  # a wrong shape is reported by build_model
        yield name, tensor, file
