"""Code Llama infilling prompts: fill the middle between a prefix and a suffix.

Layouts (Meta's `infilling_prompt_tokens`):
  prefix-suffix-middle  [BOS, PRE] + enc(prefix) + [SUF] + enc_nospace(suffix) + [MID]
  suffix-first          [BOS, PRE, SUF] + enc_nospace(suffix) + [MID] + enc(prefix)
The model writes the middle and ends it with EOT. The special pieces are looked up by name, never by
number: their ids differ between vocabularies.
"""

from __future__ import annotations

import functools
from typing import Sequence

from qgpt_code.errors import QGPTError, TokenizerError
from qgpt_code.tokenizer import Tokenizer

PRE, SUF, MID, EOT = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
INFILL_PIECES = (PRE, SUF, MID, EOT)

# Meta encodes "☺" + text and drops the sentinel's tokens, so SentencePiece's implicit leading space
# lands on the sentinel instead of the text.
_SENTINEL = "☺"


class InfillUnsupportedError(QGPTError):
    """The model's vocabulary lacks the infilling pieces (Llama 2, Code Llama 7B-Python, most chat models)."""


def _infill_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {piece: tokenizer.piece_to_id(piece) for piece in INFILL_PIECES}
    missing = [piece for piece, token_id in ids.items() if token_id is None]
    if missing:
        raise InfillUnsupportedError(
            f"this model cannot fill in the middle: its vocabulary lacks {', '.join(missing)} "
            "(Code Llama 7B and 13B have them); send the prefix alone instead"
        )
    return ids  # type: ignore[return-value]


def supports_infill(tokenizer: Tokenizer) -> bool:
    """True when the vocabulary has all four Code Llama infilling pieces."""
    return all(tokenizer.piece_to_id(piece) is not None for piece in INFILL_PIECES)


def infill_stop_id(tokenizer: Tokenizer) -> int:
    """The id of `▁<EOT>`, which ends an infilled middle."""
    return _infill_ids(tokenizer)[EOT]


@functools.lru_cache(maxsize=16)
def adds_leading_space(tokenizer: Tokenizer) -> bool:
    """Whether `encode` puts an implicit space before the text (SentencePiece's dummy prefix, as in
    Llama) rather than encoding it as it is (byte-level BPE, as in SmolLM2)."""
    return tokenizer.decode(tokenizer.encode("a") + tokenizer.encode("b")) != "ab"


def encode_without_leading_space(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` without the leading space SentencePiece adds to every encoded string."""
    if not adds_leading_space(tokenizer):
        return tokenizer.encode(text)
    sentinel = tokenizer.encode(_SENTINEL)
    ids = tokenizer.encode(_SENTINEL + text)
    if ids[: len(sentinel)] != sentinel:  # a merge across the sentinel: no known vocabulary does this
        raise TokenizerError(f"this tokenizer merges {_SENTINEL!r} with the text after it; cannot drop a leading space")
    return ids[len(sentinel) :]


def decode_without_leading_space(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids that continue a prompt (an infilled middle, a completion), keeping the space
    that SentencePiece's `decode` would strip from the first piece (Meta's `decode_infilling`)."""
    if not adds_leading_space(tokenizer):
        return tokenizer.decode(list(ids))
    text = tokenizer.decode([*tokenizer.encode(_SENTINEL), *ids])
    return text[len(_SENTINEL) :] if text.startswith(_SENTINEL) else tokenizer.decode(list(ids))


def infill_tokens(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """The Code Llama prompt for filling in between `prefix` and `suffix`.

    `suffix_first=True` puts the suffix before the prefix, so the text at the cursor comes last: the
    editor uses it because typing then leaves the whole prompt but its end unchanged.
    """
    ids = _infill_ids(tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    prefix_ids = tokenizer.encode(prefix)
    suffix_ids = encode_without_leading_space(tokenizer, suffix)
    if suffix_first:
        return [*bos, ids[PRE], ids[SUF], *suffix_ids, ids[MID], *prefix_ids]
    return [*bos, ids[PRE], *prefix_ids, ids[SUF], *suffix_ids, ids[MID]]
