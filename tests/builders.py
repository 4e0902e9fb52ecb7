"""Real artefacts built inside the tests: SentencePiece models, tiny HF and Meta checkpoints.

Nothing is downloaded: tokenizers are trained on Python's own standard-library sources, and model
weights are random with a fixed seed.
"""

from __future__ import annotations

import inspect
import io
import json
from pathlib import Path

import torch

CODE_LLAMA_PIECES = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]


def code_corpus() -> list[str]:
    """Lines of real Python code (the standard library's own sources) plus some unicode text."""
    import argparse
    import json as json_module
    import textwrap

    lines: list[str] = []
    for module in (argparse, json_module.decoder, textwrap, inspect):
        lines.extend(inspect.getsource(module).splitlines())
    lines += ["def grüße(名前: str) -> str:", "    return f'héllo {名前} 🙂'", "\tindented\twith\ttabs  "]
    return [line for line in lines if line.strip()]


def train_sentencepiece(vocab_size: int = 512, infill_pieces: bool = False) -> bytes:
    """A Llama-style SentencePiece model proto: BPE with byte fallback, digits split, spaces kept."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(code_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=CODE_LLAMA_PIECES if infill_pieces else [],
        minloglevel=2,
    )
    return model.getvalue()


def hf_llama(config_overrides: dict, seed: int = 0):
    """A randomly initialised transformers LlamaForCausalLM in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager",
    )
    config = LlamaConfig(**{**settings, **config_overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms make parity tests stricter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def write_hf_dir(model, directory: Path, tokenizer_proto: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.model").write_bytes(tokenizer_proto)
    return directory


def write_meta_dir(
    state: dict[str, torch.Tensor], params: dict, directory: Path, tokenizer_proto: bytes | None, n_shards: int
) -> Path:
    """Split a Meta-named state dict into fairscale-style model-parallel shards and write them."""
    from qgpt_code.checkpoints.meta import shard_dim

    directory.mkdir(parents=True, exist_ok=True)
    for rank in range(n_shards):
        shard = {}
        for name, tensor in state.items():
            dim = shard_dim(name)
            shard[name] = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank]
            shard[name] = shard[name].clone().contiguous()
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
    if tokenizer_proto is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer_proto)
    return directory


def meta_params(args) -> dict:
    """params.json content for a ModelArgs, as Meta writes it (vocab_size -1, width from multiple_of)."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": -1, "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
            "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
