"""Tokenizers described by GGUF metadata (`tokenizer.ggml.*`), tokenizing as llama.cpp does.

- `tokenizer.ggml.model == "llama"`: the vocabulary, scores and piece types are turned back into a
  real SentencePiece `ModelProto` (BPE, byte fallback, Llama's normalizer settings), so a Llama 2 or
  Code Llama GGUF tokenizes exactly as the `tokenizer.model` it was converted from.
- `"gpt2"`: byte-level BPE with the file's merges, run by the `tokenizers` library, behind the
  pre-tokenizer the file declares in `tokenizer.ggml.pre`: the same regexes, applied in the same order,
  as llama.cpp's `llm_tokenizer_bpe` (see PRE_TOKENIZERS). An unknown name is refused rather than
  guessed, because a wrong split silently changes the ids.

Special tokens follow llama.cpp's `parse_special` rule. `encode(text)` treats control tokens written in
the text (`<|im_start|>`, `<s>`) as plain text -- user input can never inject them -- while
`encode_special(text)` turns them into their ids; chat templates need the latter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qgpt_code.errors import TokenizerError
from qgpt_code.tokenizer import SentencePieceTokenizer, Tokenizer

# Token types, as GGUF (and SentencePiece's ModelProto) number them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end generation, besides the declared EOS/EOT (llama.cpp's list, trimmed to the
# chat formats llama-architecture models use; "▁<EOT>" is Code Llama's end of infilling).
END_OF_GENERATION = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<|end_of_text|>", "<EOT>", "▁<EOT>",
})

# --- pre-tokenizers --------------------------------------------------------------------------------
# Each name maps to the regexes llama.cpp splits text with, applied one after another; every regex
# keeps both its matches and the text between them as pieces (tokenizers' "isolated" behaviour).

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself in the vocabulary is emitted whole (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2))  # StarCoder-style: every digit on its own
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer((_GPT2,)),
    "phi-2": PreTokenizer((_GPT2,)),
    "mpt": PreTokenizer((_GPT2,)),
    "olmo": PreTokenizer((_GPT2,)),
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
    "llama-bpe": _LLAMA3_PRE,
    "falcon3": _LLAMA3_PRE,
    "pixtral": _LLAMA3_PRE,
    "dbrx": PreTokenizer((_LLAMA3,)),
    "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "qwen2": PreTokenizer((_QWEN2,)),
    "deepseek-r1-qwen": PreTokenizer((_QWEN2,)),
    "stablelm2": PreTokenizer((_QWEN2,)),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
}


# --- the vocabulary as the file states it ------------------------------------------------------------


@dataclass
class GGUFVocab:
    model: str  # "llama" | "gpt2"
    tokens: list[str]
    types: np.ndarray  # (V,) int32 token types
    scores: np.ndarray  # (V,) float32 (SentencePiece log-probabilities; zeros for BPE)
    merges: list[str]
    pre: str | None
    bos_id: int  # -1: none
    eos_id: int
    unk_id: int
    pad_id: int
    eot_id: int
    add_bos: bool | None  # None: the file does not say
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    precompiled_charsmap: bytes

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str) -> "GGUFVocab":
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(
                f"{source}: the file holds no tokenizer (tokenizer.ggml.tokens); pass one with --tokenizer"
            )
        model = meta.get("tokenizer.ggml.model", "llama")
        n = len(tokens)
        types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), dtype=np.int32)
        scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(n)), dtype=np.float32)
        if len(types) != n or len(scores) != n:
            raise TokenizerError(f"{source}: {n} tokens but {len(types)} token types and {len(scores)} scores")

        def special(role: str, default: int) -> int:
            token_id = meta.get(f"tokenizer.ggml.{role}_token_id", default)
            return token_id if 0 <= token_id < n else -1

        llama = model == "llama"  # llama.cpp's defaults for SentencePiece vocabularies: <unk>=0 <s>=1 </s>=2
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(
            model=model,
            tokens=[t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)],  # llama.cpp renames empty tokens too
            types=types,
            scores=scores,
            merges=list(meta.get("tokenizer.ggml.merges") or []),
            pre=meta.get("tokenizer.ggml.pre"),
            bos_id=special("bos", 1 if llama else -1),
            eos_id=special("eos", 2 if llama else -1),
            unk_id=special("unknown", 0 if llama else -1),
            pad_id=special("padding", -1),
            eot_id=special("eot", -1),
            add_bos=None if add_bos is None else bool(add_bos),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", llama)),
            remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)),
            precompiled_charsmap=bytes(np.asarray(meta.get("tokenizer.ggml.precompiled_charsmap", []), np.uint8)),
        )

    def ids_of_types(self, *kinds: int) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.isin(self.types, kinds))]

    def eog_ids(self) -> frozenset[int]:
        found = {i for i, text in enumerate(self.tokens) if text in END_OF_GENERATION}
        return frozenset(found | {self.eos_id, self.eot_id}) - {-1}


def partition(text: str, specials: Sequence[tuple[str, int]]) -> list[str | int]:
    """`text` cut into plain-text fragments and special-token ids, llama.cpp's way: each special
    token in turn (longest first) is found left to right in the fragments still plain."""
    fragments: list[str | int] = [text] if text else []
    for piece, token_id in specials:
        cut: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int) or piece not in fragment:
                cut.append(fragment)
                continue
            for i, part in enumerate(fragment.split(piece)):
                if i:
                    cut.append(token_id)
                if part:
                    cut.append(part)
        fragments = cut
    return fragments


def encode_around(
    text: str, specials: Sequence[tuple[str, int]], encode: Callable[[str], list[int]]
) -> list[int]:
    """Ids of `text` with the `specials` cut out whole (see `partition`) and the rest `encode`d."""
    ids: list[int] = []
    for fragment in partition(text, specials):
        if isinstance(fragment, int):
            ids.append(fragment)
        else:
            ids.extend(encode(fragment))
    return ids


class _SpecialTokens:
    """What both GGUF tokenizers share: ids from the file's metadata, `add_bos`, end-of-generation
    ids, and `encode_special`. Subclasses define `_encode_plain(text)` and `_special_types`."""

    _special_types: tuple[int, ...]  # token types that `encode_special` finds in text

    def _init_specials(self, vocab: GGUFVocab, default_add_bos: bool) -> None:
        self.bos_id, self.eos_id, self.pad_id = vocab.bos_id, vocab.eos_id, vocab.pad_id
        self.vocab_size = len(vocab.tokens)
        self.add_bos = (default_add_bos if vocab.add_bos is None else vocab.add_bos) and vocab.bos_id >= 0
        self.eog_ids = vocab.eog_ids()  # pass as stop ids: e.g. SmolLM2 ends a completion with <|endoftext|>
        self._specials = _longest_first(vocab, self._special_types)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_plain(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id >= 0:
            ids = [*ids, self.eos_id]
        return ids

    def encode_special(self, text: str) -> list[int]:
        """Ids of `text` in which special-token strings (`<|im_start|>`, `<s>`) become their ids; no BOS added."""
        return encode_around(text, self._specials, self._encode_plain)

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError


def _longest_first(vocab: GGUFVocab, kinds: Sequence[int]) -> list[tuple[str, int]]:
    found = [(vocab.tokens[i], i) for i in vocab.ids_of_types(*kinds)]
    return sorted(found, key=lambda item: (-len(item[0].encode("utf-8")), item[1]))


# --- SentencePiece ("llama") ------------------------------------------------------------------------


def sentencepiece_proto(vocab: GGUFVocab) -> bytes:
    """A serialized SentencePiece ModelProto equal in behaviour to the file's original tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for text, score, kind in zip(vocab.tokens, vocab.scores.tolist(), vocab.types.tolist()):
        piece = proto.pieces.add()
        piece.piece, piece.score = text, score
        piece.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE  # llama.cpp merges by score: SentencePiece's BPE
    spec.vocab_size = len(vocab.tokens)
    spec.byte_fallback = bool((vocab.types == BYTE).any())
    for role in ("unk", "bos", "eos", "pad"):
        token_id = getattr(vocab, f"{role}_id")
        setattr(spec, f"{role}_id", token_id)
        if token_id >= 0:
            setattr(spec, f"{role}_piece", vocab.tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocab.add_space_prefix
    normalizer.remove_extra_whitespaces = vocab.remove_extra_whitespaces
    normalizer.escape_whitespaces = True
    normalizer.precompiled_charsmap = vocab.precompiled_charsmap
    return proto.SerializeToString()


class GGUFSentencePieceTokenizer(_SpecialTokens, SentencePieceTokenizer):
    """SentencePiece rebuilt from a "llama" GGUF vocabulary."""

    # User-defined pieces are matched by SentencePiece itself, so `encode_special` cuts only at
    # control and unknown tokens, and equals `encode` on text that holds none of them.
    _special_types = (CONTROL, UNKNOWN)

    def __init__(self, vocab: GGUFVocab, source: str = "<memory>"):
        SentencePieceTokenizer.__init__(self, sentencepiece_proto(vocab), source=source)
        self._init_specials(vocab, default_add_bos=True)

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)


# --- byte-level BPE ("gpt2") -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the rest are
    shifted past U+0100 so that every byte is a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


class GGUFByteLevelBPETokenizer(_SpecialTokens):
    """Byte-level BPE from a "gpt2" GGUF vocabulary, behind the file's declared pre-tokenizer."""

    _special_types = (CONTROL, UNKNOWN, USER_DEFINED)

    def __init__(self, vocab: GGUFVocab, source: str = "<memory>"):
        from tokenizers import Regex
        from tokenizers import Tokenizer as Engine
        from tokenizers import models, pre_tokenizers

        self.source = source
        pre_name = vocab.pre or "default"  # llama.cpp's choice for files that predate tokenizer.ggml.pre
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise TokenizerError(
                f"{source}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
                f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        self.pre_tokenizer = pre_name
        self._tokens = vocab.tokens
        self._ids = {text: i for i, text in enumerate(vocab.tokens)}
        if len(self._ids) != len(vocab.tokens):
            raise TokenizerError(f"{source}: the vocabulary lists a token twice")
        try:
            engine = Engine(models.BPE(vocab=self._ids, merges=[_split_merge(m) for m in vocab.merges],
                                       ignore_merges=pre.ignore_merges))
        except Exception as exc:  # tokenizers raises a bare Exception with Rust's message
            raise TokenizerError(f"{source}: invalid BPE merges ({exc})") from None
        engine.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._engine = engine
        self._init_specials(vocab, default_add_bos=pre.add_bos)
        # Plain text still has user-defined tokens (e.g. "<think>") cut out whole, as llama.cpp does.
        self._user_defined = _longest_first(vocab, (USER_DEFINED,))
        self._bytes = [_token_bytes(text, kind) for text, kind in zip(vocab.tokens, vocab.types.tolist())]

    def _encode_plain(self, text: str) -> list[int]:
        # encode_batch, not encode: it releases the GIL while it works, so a huge prompt tokenized on a
        # server's worker thread does not stall the event loop (tokenizers' encode holds it throughout).
        return encode_around(text, self._user_defined,
                             lambda fragment: self._engine.encode_batch([fragment], add_special_tokens=False)[0].ids)

    def pre_tokens(self, text: str) -> list[str]:
        """The pieces the declared pre-tokenizer cuts `text` into (in the byte alphabet: " a" is "Ġa")."""
        return [piece for piece, _ in self._engine.pre_tokenizer.pre_tokenize_str(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens print nothing (as SentencePiece and llama.cpp do)."""
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokens[token_id]


def _split_merge(merge: str) -> tuple[str, str]:
    """"Ġ t" -> ("Ġ", "t"); the split is at the first space after the first character, as llama.cpp's."""
    cut = merge.find(" ", 1)
    return (merge[:cut], merge[cut + 1 :]) if cut > 0 else (merge, "")


def _token_bytes(text: str, kind: int) -> bytes:
    if kind in (CONTROL, UNKNOWN):
        return b""
    if kind == USER_DEFINED:
        return text.encode("utf-8")  # stored as written, not in the byte alphabet
    table = byte_decoder()
    try:
        return bytes(map(table.__getitem__, text))
    except KeyError:  # a character outside the byte alphabet (a mislabelled added token): as written
        return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in text)


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer of a GGUF file, from its parsed metadata."""
    vocab = GGUFVocab.from_metadata(meta, source)
    if vocab.model == "llama":
        return GGUFSentencePieceTokenizer(vocab, source)
    if vocab.model == "gpt2":
        return GGUFByteLevelBPETokenizer(vocab, source)
    raise TokenizerError(f"{source}: tokenizer model {vocab.model!r} is not supported (llama and gpt2 are)")
