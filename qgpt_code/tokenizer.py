"""Tokenizers: the protocol every front end codes against, and the SentencePiece implementation.

`Tokenizer` is all that prompts/ may rely on. `SentencePieceTokenizer` wraps Meta's `tokenizer.model`
(or any SentencePiece model proto, such as one rebuilt from GGUF metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from qgpt_code.errors import TokenizerError


@runtime_checkable
class Tokenizer(Protocol):
    """What generation and prompt building need from a tokenizer."""

    bos_id: int  # -1 when the vocabulary has none
    eos_id: int
    pad_id: int  # -1 when the vocabulary has none (Llama's case)
    vocab_size: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` as the model saw such text in training (SentencePiece adds its
        leading-space marker), with BOS/EOS ids around it on request."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece such as Code Llama's `▁<PRE>`, or None when absent."""

    def id_to_piece(self, token_id: int) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model, loaded from a file or from a serialized model proto."""

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm  # lazy: keeps `qgpt --help` and LSP start-up fast

        self.source = source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{source}: not a SentencePiece model ({str(exc).strip()})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.vocab_size = self.sp.vocab_size()

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(f"{path}: tokenizer file not found") from None
        except OSError as exc:
            raise TokenizerError(f"{path}: cannot read tokenizer ({exc.strerror})") from None
        return cls(data, source=str(path))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id >= 0:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        # SentencePiece maps unknown pieces to unk; only an exact round trip means "present".
        return token_id if self.sp.id_to_piece(token_id) == piece else None

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


def find_tokenizer_file(checkpoint_dir: Path) -> Path | None:
    """`tokenizer.model` in a checkpoint directory or its parent (Meta's download puts it one level up)."""
    for candidate in (checkpoint_dir / "tokenizer.model", checkpoint_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a `tokenizer.model` file, a checkpoint directory holding one, or a `.gguf` file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from qgpt_code.checkpoints.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if path.is_dir():
        found = find_tokenizer_file(path)
        if found is None:
            raise TokenizerError(f"{path}: no tokenizer.model in this directory or its parent")
        path = found
    return SentencePieceTokenizer.from_file(path)
