"""GGUF files written inside the tests with the gguf package's own `GGUFWriter`.

`write_llama_gguf` converts a transformers LlamaForCausalLM the way llama.cpp's convert_hf_to_gguf.py
does: GGUF tensor names, q/k rows permuted from HF's half-split rotary order back to Meta's
interleaved one, 1-D norms kept in F32, matrices stored as the requested ggml type. It returns, for
each tensor written, the float32 values a correct reader must get back (the dequantization of the
bytes actually written), so tests compare against what is in the file, not against a reader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

Q = GGMLQuantizationType

HF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
HF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}

# Where each K-quant block keeps its float16 scales (byte offsets), per gguf.quants' block layouts.
K_QUANT_F16_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TOP:
        return HF_TOP[hf_name]
    layer, part = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name).groups()
    return f"blk.{layer}.{HF_LAYER[part]}.weight"


def hf_rows_to_meta(w: np.ndarray, n_heads: int) -> np.ndarray:
    """(n_heads*hd, dim): HF's rotary row order -> Meta's, as convert_hf_to_gguf.py's `permute`."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(shape: tuple[int, int], qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random bytes in K-quant block layout with small, finite float16 scales ((rows, row_bytes) uint8).

    gguf.quants cannot quantize to K types, so K-quant tests store random blocks and compare what
    comes back with the dequantization of exactly those bytes.
    """
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_F16_OFFSETS[qtype]:
        scales = rng.uniform(0.001, 0.02, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def encode_tensor(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`values` stored as `qtype`: float arrays for F32/F16, a uint8 byte array for the rest."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    return quantize(values.astype(np.float32), qtype)


def write_llama_gguf(
    path: Path,
    hf_model,
    tokenizer: dict[str, Any] | None,
    qtype: GGMLQuantizationType = Q.F32,
    *,
    name: str = "tiny test llama",
    permute_qk: bool = True,
    raw_matrices: dict[str, np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
    file_type: int | None | str = "auto",
    alignment: int | None = None,
) -> dict[str, np.ndarray]:
    """Write `hf_model` (+ `tokenizer` metadata from `sentencepiece_metadata` / `bpe_metadata`) to `path`.

    `raw_matrices` maps GGUF names to pre-encoded bytes (e.g. random K-quant blocks) stored as `qtype`.
    `file_type`: general.file_type to write; "auto" follows `qtype` as llama.cpp names it, None omits it.
    `alignment`: a data alignment other than GGUF's default 32 (written as general.alignment).
    Returns {gguf name: float32 values as stored}, for comparison with what a reader loads.
    """
    config = hf_model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if file_type == "auto":
        file_type = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7, Q.Q4_K: 15, Q.Q5_K: 17,
                     Q.Q6_K: 18, Q.BF16: 32}[qtype]
    if file_type is not None:
        writer.add_file_type(file_type)
    for key, value in (extra or {}).items():
        _add_value(writer, key, value)
    if tokenizer is not None:
        for key, value in tokenizer.items():
            _add_value(writer, key, value)

    stored: dict[str, np.ndarray] = {}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for hf_name, tensor in hf_model.state_dict().items():
        if "rotary_emb" in hf_name or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # a tied model's GGUF has no output.weight: llama.cpp reuses token_embd
        name_ = gguf_name(hf_name)
        values = tensor.detach().float().numpy()
        kind = name_.split(".")[-2]
        if permute_qk and kind in heads:
            values = hf_rows_to_meta(values, heads[kind])
        if values.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            data, tensor_type = values.astype(np.float32), Q.F32
        elif raw_matrices and name_ in raw_matrices:
            data, tensor_type = raw_matrices[name_], qtype
        else:
            data, tensor_type = encode_tensor(values, qtype), qtype
        if data.dtype == np.uint8:
            writer.add_tensor(name_, data, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name_, data)  # its numpy dtype names the type (F32, F16, or e.g. I8)
        if data.dtype in (np.uint8, np.float32, np.float16):
            stored[name_] = np.asarray(dequantize(data, tensor_type), dtype=np.float32).reshape(values.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:  # numpy arrays as Python lists: the writer types elements from Python's float/int/str
        writer.add_array(key, value.tolist() if isinstance(value, np.ndarray) else list(value))


def sentencepiece_metadata(sp_proto: bytes, add_bos: bool = True) -> dict[str, Any]:
    """`tokenizer.ggml.*` for a SentencePiece model, as a faithful converter writes them: every
    piece with its score and its type straight from the ModelProto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_proto)
    spec = proto.trainer_spec
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": np.array([p.score for p in proto.pieces], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([p.type for p in proto.pieces], dtype=np.int32),
        "tokenizer.ggml.bos_token_id": spec.bos_id,
        "tokenizer.ggml.eos_token_id": spec.eos_id,
        "tokenizer.ggml.unknown_token_id": spec.unk_id,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.add_eos_token": False,
    }
    return meta


def train_byte_level_bpe(vocab_size: int, special: list[str], corpus: list[str], split_digits: bool) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained here on `corpus`; `split_digits` isolates every
    digit first (as StarCoder/SmolLM do), otherwise digits merge like letters (as GPT-2 does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def bpe_metadata(tok, pre: str, control: list[str], user_defined: list[str] = (), add_bos: bool | None = None,
                 bos: str | None = None, eos: str | None = None) -> dict[str, Any]:
    """`tokenizer.ggml.*` for a byte-level BPE tokenizer, as convert_hf_to_gguf.py writes a "gpt2" vocab."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in control else 4 if t in user_defined else 1 for t in tokens]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": merges,
    }
    if bos is not None:
        meta["tokenizer.ggml.bos_token_id"] = vocab[bos]
    if eos is not None:
        meta["tokenizer.ggml.eos_token_id"] = vocab[eos]
    if add_bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = add_bos
    return meta


def truncated_copy(source: Path, target: Path, keep: int) -> Path:
    """The first `keep` bytes of `source`, as an interrupted download leaves them."""
    with open(source, "rb") as handle:
        target.write_bytes(handle.read(keep))
    return target


def header_bytes_only(path: Path) -> int:
    """Size of everything before the tensor data (to cut a file inside its header, or after it)."""
    from gguf import GGUFReader

    return int(GGUFReader(str(path)).data_offset)

