"""GGUF checkpoints (the format of llama.cpp, Ollama and LM Studio): llama-architecture files only.

A GGUF file is a header -- key/value metadata, then a table of tensors (name, shape, ggml type,
offset) -- followed by the tensor data. `GGUFFile` parses the header itself instead of using
`gguf.GGUFReader`, which builds numpy views for every element of every metadata array: 3.5 s for
SmolLM2's 98k vocabulary and merge strings, against ~0.1 s here (tests/test_gguf_file.py checks the
two agree field for field and tensor for tensor). Tensor data stays memory-mapped and is dequantized
one tensor at a time with `gguf.quants.dequantize`, so host RAM holds one float32 tensor at a time.

Rotary layout: llama.cpp's converter undoes HF's q/k row permutation, so GGUF stores q/k rows in
Meta's interleaved order, which is ours: tensors are used as stored. The parity test against
transformers' own GGUF loader (which re-permutes to HF's order) is the proof.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize

from qgpt_code.checkpoints.assemble import (
    LoadedModel,
    ModelInfo,
    NamedTensors,
    Progress,
    build_model,
    check_tokenizer_fits,
    meta_name,
)
from qgpt_code.config import ModelArgs
from qgpt_code.errors import CheckpointError
from qgpt_code.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
DEQUANTIZE_CHUNK = 1 << 22  # values per dequantize call

# Types whose dequantization is exercised by the tests; others the gguf package knows also load.
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {kind: np.dtype(fmt) for kind, fmt in _SCALARS.items()}


class _Truncated(Exception):
    """The header runs past the end of the file (turned into a CheckpointError naming the file)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows, cols): GGUF lists dimensions fastest-varying first
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


class _Cursor:
    """Little-endian reads from the mapped header; every read checks the file is long enough."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def _advance(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Truncated
        self.pos += n
        return start

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self._advance(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.strings(1)[0]

    def strings(self, count: int) -> list[str]:
        """`count` length-prefixed UTF-8 strings in a row (a vocabulary: tens of thousands), in one tight loop."""
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if pos > size:
                raise _Truncated
            out.append(buf[pos - n : pos].decode("utf-8"))
        self.pos = pos
        return out

    def value(self, kind: GGUFValueType) -> Any:
        """A metadata value: a Python scalar or str, a numpy array of numbers, or a list."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind = GGUFValueType(self.scalar("<I"))
            count = self.scalar("<Q")
            if item_kind in _ARRAY_DTYPES:
                dtype = _ARRAY_DTYPES[item_kind]
                start = self._advance(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).copy()  # copy: no view pins the map
            if item_kind == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item_kind) for _ in range(count)]
        return self.scalar(_SCALARS[kind])


class GGUFFile:
    """The metadata and tensor table of a GGUF file, with each tensor's data on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except ValueError:  # mmap refuses an empty file
            raise CheckpointError(f"{self.path}: empty file, not a GGUF model") from None
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read file ({exc.strerror})") from None
        try:
            self._parse()
        except _Truncated:
            raise CheckpointError(
                f"{self.path}: truncated GGUF file: the header ends past the end of the file "
                "(an incomplete download?)"
            ) from None
        except (UnicodeDecodeError, ValueError) as exc:  # ValueError: an unknown value or tensor type
            raise CheckpointError(f"{self.path}: corrupt GGUF header ({exc})") from None

    def _parse(self) -> None:
        cursor = _Cursor(self._map)
        if self._map[:4] != MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        cursor.pos = 4
        self.version = cursor.scalar("<I")
        if self.version & 0xFFFF == 0:
            raise CheckpointError(f"{self.path}: big-endian GGUF files are not supported")
        if self.version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_keys = cursor.scalar("<Q"), cursor.scalar("<Q")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = cursor.string()
            if key in self.metadata:
                raise CheckpointError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cursor.value(GGUFValueType(cursor.scalar("<I")))

        table = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            qtype = GGMLQuantizationType(cursor.scalar("<I"))
            table.append((name, tuple(reversed(dims)), qtype, cursor.scalar("<Q")))

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in table:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
            info = TensorInfo(name, shape, qtype, data_start + offset, n_bytes)
            if name in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {name!r} appears twice")
            if info.offset + n_bytes > len(self._map):
                raise CheckpointError(
                    f"{self.path}: truncated GGUF file: tensor {name!r} ends at byte {info.offset + n_bytes} "
                    f"but the file has {len(self._map)} bytes (an incomplete download?)"
                )
            self.tensors[name] = info

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as stored, (rows, bytes per row): a read-only view of the mapped file."""
        block_size, _ = GGML_QUANT_SIZES[info.qtype]
        if info.shape[-1] % block_size:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} has rows of {info.shape[-1]} values, "
                f"not a multiple of the {info.qtype.name} block ({block_size})"
            )
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        return np.frombuffer(self._map, np.uint8, info.n_bytes, info.offset).reshape(rows, -1)

    def dequantized(self, info: TensorInfo) -> np.ndarray:
        """The tensor as float32, shaped `info.shape`; a CheckpointError for types we cannot decode."""
        block_size, _ = GGML_QUANT_SIZES[info.qtype]
        cols = info.shape[-1]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        if cols % block_size:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} has rows of {cols} values, "
                f"not a multiple of the {info.qtype.name} block ({block_size})"
            )
        raw = np.frombuffer(self._map, np.uint8, info.n_bytes, info.offset).reshape(rows, -1)  # (rows, row bytes)
        out = np.empty((rows, cols), np.float32)
        step = max(1, DEQUANTIZE_CHUNK // cols)
        try:
            for start in range(0, rows, step):
                # Blocks never straddle rows, so many rows dequantize as one long row: one vectorised
                # call instead of gguf's groups of 16 rows (twice as fast), with bounded scratch memory.
                chunk = raw[start : start + step]
                out[start : start + len(chunk)] = dequantize(chunk.reshape(1, -1), info.qtype).reshape(len(chunk), cols)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {info.name!r} is stored as {info.qtype.name}, which cannot be "
                f"dequantized here (tested: {', '.join(TESTED_TYPES)})"
            ) from None
        return out.reshape(info.shape)


# --- architecture -----------------------------------------------------------------------------------

# GGUF tensor names (llama.cpp's) -> ours (Meta's).
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")  # a precomputed rotary table very old files carry


def our_name(gguf_name: str) -> str | None:
    """Meta name for a GGUF tensor name; None when it has no counterpart."""
    return meta_name(gguf_name, TOP_NAMES, r"blk\.(\d+)\.(\w+)\.weight", LAYER_NAMES)


def read_args(file: GGUFFile) -> ModelArgs:
    """The architecture from `llama.*` metadata; anything our Transformer does not compute is refused."""
    path = file.path
    arch = file.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported; QGPT runs llama-architecture GGUF models "
            "(Llama 2, Code Llama, SmolLM2, Mistral 7B, ...)"
        )

    def key(name: str, default: Any = None) -> Any:
        value = file.get(f"llama.{name}", default)
        if value is None:
            raise CheckpointError(f"{path}: metadata key 'llama.{name}' is missing")
        if isinstance(value, (np.ndarray, list)):
            raise CheckpointError(f"{path}: per-layer 'llama.{name}' values are not supported")
        return value

    if file.get("llama.expert_count", 0):
        raise CheckpointError(f"{path}: mixture-of-experts models (llama.expert_count) are not supported")
    scaling = file.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or "rope_freqs.weight" in file.tensors:
        kind = scaling if scaling != "none" else "llama3 frequency factors (rope_freqs)"
        raise CheckpointError(f"{path}: rotary scaling ({kind}) is not supported; only 'linear' (position "
                              "interpolation) is")
    rope_scaling_factor = 1.0
    if scaling == "linear":  # positions divided by the factor (llama.cpp writes it from HF rope_scaling)
        rope_scaling_factor = key("rope.scaling.factor", 0.0)
        if not rope_scaling_factor > 0:
            raise CheckpointError(f"{path}: linear rotary scaling needs a positive llama.rope.scaling.factor, "
                                  f"got {rope_scaling_factor}")

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    if n_heads <= 0:
        raise CheckpointError(f"{path}: llama.attention.head_count is {n_heads}")
    head_dim = key("attention.key_length", dim // n_heads)
    if key("attention.value_length", head_dim) != head_dim or key("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: partial rotary or unequal key/value head sizes are not supported")
    embedding = file.tensors.get("token_embd.weight")
    if embedding is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    try:
        return ModelArgs(
            dim=dim,
            n_layers=key("block_count"),
            n_heads=n_heads,
            n_kv_heads=key("attention.head_count_kv", n_heads),
            vocab_size=embedding.shape[0],
            hidden_dim=key("feed_forward_length"),
            head_dim=head_dim,
            norm_eps=_decimal(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_decimal(key("rope.freq_base", 10000.0)),
            rope_scaling_factor=_decimal(rope_scaling_factor),
            max_seq_len=key("context_length", 4096),
            tie_embeddings="output.weight" not in file.tensors,  # llama.cpp reuses token_embd then
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid architecture ({exc})") from None


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def quantization(file: GGUFFile) -> str:
    """"Q4_1", "Q4_K_M", "F16"...: `general.file_type` when the file states it, else the commonest matrix type."""
    try:
        name = LlamaFileType(file.get("general.file_type")).name
    except ValueError:
        name = "GUESSED"
    if name != "GUESSED":
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts = Counter(t.qtype.name for t in file.tensors.values() if len(t.shape) == 2)
    return counts.most_common(1)[0][0] if counts else "F32"


# Llama 2 and Code Llama chat in Meta's [INST] format (prompts/dialog.py implements it exactly), which
# wins over a template a converter may have copied in. Code Llama 70B Instruct has a format of its own.
LLAMA2_NAME = re.compile(r"llama[-_ ]?2|code[-_ ]?llama", re.IGNORECASE)
OWN_FORMAT_NAME = re.compile(r"code[-_ ]?llama.*70b", re.IGNORECASE)
LLAMA_VOCAB_SIZES = (32000, 32016)  # Llama 2; Code Llama 7B/13B with its four infilling pieces


def chat_format(metadata: dict[str, Any]) -> tuple[str, str | None]:
    """("llama2", None) or ("template", the file's tokenizer.chat_template); see docs/models.md."""
    template = metadata.get("tokenizer.chat_template")
    name = " ".join(str(metadata.get(k, "")) for k in ("general.name", "general.basename"))
    llama_vocab = (
        metadata.get("tokenizer.ggml.model") == "llama"
        and len(metadata.get("tokenizer.ggml.tokens", ())) in LLAMA_VOCAB_SIZES
    )
    if llama_vocab and LLAMA2_NAME.search(name) and not (template and OWN_FORMAT_NAME.search(name)):
        return "llama2", None
    if template:
        return "template", template
    if llama_vocab:
        return "llama2", None  # an old Llama 2 / Code Llama conversion with neither name nor template
    return "template", None  # no known format: chat refuses with a clear error, completion works


def read_info(file: GGUFFile) -> ModelInfo:
    """Everything `qgpt models` shows and prompts need, from the header alone (no tensor data read)."""
    meta = file.metadata
    args = read_args(file)
    fmt, template = chat_format(meta)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    extra: dict[str, Any] = {
        key.removeprefix("general."): meta[key]
        for key in ("general.name", "general.basename", "general.size_label", "general.finetune",
                    "general.organization", "general.license")
        if isinstance(meta.get(key), str)
    }
    extra.update(gguf_version=file.version, tokenizer_model=meta.get("tokenizer.ggml.model"),
                 tokenizer_pre=meta.get("tokenizer.ggml.pre"))
    for role in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            extra[f"{role}_token"] = tokens[token_id]
    if "tokenizer.ggml.add_bos_token" in meta:
        extra["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    return ModelInfo(
        path=file.path, format="gguf", args=args, name=meta.get("general.name") or file.path.stem,
        quantization=quantization(file), chat_format=fmt, chat_template=template, metadata=extra,
    )


def iter_tensors(file: GGUFFile, args: ModelArgs, keep_quantized: bool = False) -> NamedTensors:
    """(our name, tensor, file) for every tensor: float32, or with `keep_quantized` a BlockTensor for
    each matrix in a block format (quant_blocks.KEPT as stored, quant_blocks.REQUANTIZED converted)."""
    return _iter(file, args, keep_quantized)


def _iter(file: GGUFFile, args: ModelArgs, keep_quantized: bool) -> Iterator[tuple[str, Any, Path]]:
    import torch

    from qgpt_code.quant_blocks import KEPT, REQUANTIZED, from_gguf_bytes

    for info in file.tensors.values():
        if IGNORED.match(info.name):
            continue
        name = our_name(info.name)
        if name is None:
            raise CheckpointError(f"{file.path}: unknown tensor {info.name!r} for a llama model")
        if keep_quantized and len(info.shape) == 2 and info.qtype.name in (*KEPT, *REQUANTIZED):
            yield name, from_gguf_bytes(info.qtype.name, file.raw(info), info.shape[1]), file.path
        else:
            yield name, torch.from_numpy(file.dequantized(info)), file.path


# --- entry points -------------------------------------------------------------------------------------


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata."""
    from qgpt_code.gguf_tokenizer import tokenizer_from_metadata

    return tokenizer_from_metadata(GGUFFile(path).metadata, source=str(path))


def load(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: str | Path | Tokenizer | None = None,
    progress: Progress | None = None,
    keep_quantized: bool | None = None,
) -> LoadedModel:
    """A GGUF model on `device`, with the file's own tokenizer by default. Quantized matrices stay in
    their blocks when `keep_quantized` (default: on the CPU in float32, where the kernels read them);
    otherwise, and for everything else, weights are dequantized to `dtype`."""
    import torch

    from qgpt_code.gguf_tokenizer import tokenizer_from_metadata

    file = GGUFFile(path)
    info = read_info(file)
    if tokenizer is None:
        tok = tokenizer_from_metadata(file.metadata, source=str(path))
    elif isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    check_tokenizer_fits(tok, info.args, getattr(tok, "source", str(path)))
    if keep_quantized is None:  # QGPT_GGUF_DEQUANTIZE=1: the float32 path (comparisons, a suspected kernel bug)
        keep_quantized = (torch.device(device).type == "cpu" and dtype == torch.float32
                          and os.environ.get("QGPT_GGUF_DEQUANTIZE") != "1")
    elif keep_quantized and not (torch.device(device).type == "cpu" and dtype == torch.float32):
        raise CheckpointError(f"{path}: quantized weights are kept only on the CPU in float32, not {device} {dtype}")
    model = build_model(info.args, iter_tensors(file, info.args, keep_quantized), device, dtype, progress)
    return LoadedModel(model=model, tokenizer=tok, info=info)
