"""Code Llama infilling prompts with a SentencePiece model that has the four infilling pieces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prompt_fixtures import code_llama_tokenizer, llama_tokenizer

from qgpt_code.errors import QGPTError
from qgpt_code.prompts import (
    InfillUnsupportedError,
    decode_without_leading_space,
    infill_stop_id,
    infill_tokens,
    supports_infill,
)
from qgpt_code.prompts.infill import encode_without_leading_space

code_text = st.text(alphabet=st.sampled_from(list("ab x_()=:\n\t    .,名🙂")), max_size=30)


def ids(tokenizer):
    return [tokenizer.piece_to_id(piece) for piece in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")]


def test_prefix_suffix_middle_layout():
    tokenizer = code_llama_tokenizer()
    pre, suf, mid, _ = ids(tokenizer)
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    tokens = infill_tokens(tokenizer, prefix, suffix)
    assert tokens == [
        tokenizer.bos_id, pre, *tokenizer.encode(prefix), suf, *encode_without_leading_space(tokenizer, suffix), mid
    ]


def test_suffix_first_layout():
    tokenizer = code_llama_tokenizer()
    pre, suf, mid, _ = ids(tokenizer)
    prefix, suffix = "x = [", "]\n"
    tokens = infill_tokens(tokenizer, prefix, suffix, suffix_first=True)
    assert tokens == [
        tokenizer.bos_id, pre, suf, *encode_without_leading_space(tokenizer, suffix), mid, *tokenizer.encode(prefix)
    ]
    assert tokens.index(mid) == len(tokens) - len(tokenizer.encode(prefix)) - 1


def test_pieces_are_looked_up_by_name_not_hard_coded():
    tokenizer = code_llama_tokenizer()
    assert ids(tokenizer) == [3, 5, 4, 6]  # this vocabulary's order; Code Llama's real ids are 32007-32010
    assert infill_stop_id(tokenizer) == 6
    assert infill_tokens(tokenizer, "a", "b")[:2] == [tokenizer.bos_id, 3]


def test_suffix_is_encoded_without_its_leading_space():
    tokenizer = code_llama_tokenizer()
    # With the implicit space, "return" after <SUF> would read " return"; without it, the piece has no ▁.
    with_space = tokenizer.encode("return x")
    without = encode_without_leading_space(tokenizer, "return x")
    assert tokenizer.id_to_piece(with_space[0]).startswith("▁")
    assert not tokenizer.id_to_piece(without[0]).startswith("▁")
    assert tokenizer.decode(tokenizer.encode("y") + without) == "yreturn x"
    # a suffix that really starts with a space keeps exactly one
    assert tokenizer.decode(tokenizer.encode("y") + encode_without_leading_space(tokenizer, " z")) == "y z"
    assert encode_without_leading_space(tokenizer, "") == []


@settings(max_examples=150, deadline=None)
@given(code_text, code_text)
def test_suffix_encoding_adds_nothing_and_loses_nothing(head, suffix):
    tokenizer = code_llama_tokenizer()
    head = head or "y"
    decoded = tokenizer.decode(tokenizer.encode(head) + encode_without_leading_space(tokenizer, suffix))
    assert decoded == tokenizer.decode(tokenizer.encode(head + suffix))


@settings(max_examples=100, deadline=None)
@given(code_text, code_text, st.booleans())
def test_both_layouts_hold_the_same_pieces(prefix, suffix, suffix_first):
    tokenizer = code_llama_tokenizer()
    pre, suf, mid, eot = ids(tokenizer)
    tokens = infill_tokens(tokenizer, prefix, suffix, suffix_first=suffix_first)
    other = infill_tokens(tokenizer, prefix, suffix, suffix_first=not suffix_first)
    assert sorted(tokens) == sorted(other)
    assert tokens.count(pre) == tokens.count(suf) == tokens.count(mid) == 1 and eot not in tokens
    assert tokens[0] == tokenizer.bos_id


@settings(max_examples=100, deadline=None)
@given(code_text)
def test_generated_middle_decodes_with_its_leading_space(middle):
    tokenizer = code_llama_tokenizer()
    generated = encode_without_leading_space(tokenizer, middle)  # what a model would emit after <MID>
    assert decode_without_leading_space(tokenizer, generated) == middle


def test_plain_decode_would_lose_the_leading_space():
    tokenizer = code_llama_tokenizer()
    generated = encode_without_leading_space(tokenizer, " 42")
    assert tokenizer.decode(generated) == "42"
    assert decode_without_leading_space(tokenizer, generated) == " 42"


def test_models_without_infill_pieces_get_a_clear_error():
    tokenizer = llama_tokenizer()
    assert not supports_infill(tokenizer) and supports_infill(code_llama_tokenizer())
    with pytest.raises(InfillUnsupportedError, match="lacks ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>") as raised:
        infill_tokens(tokenizer, "a", "b")
    assert isinstance(raised.value, QGPTError)
    with pytest.raises(InfillUnsupportedError):
        infill_stop_id(tokenizer)


class CharTokenizer:
    """One id per character and no implicit space, like a byte-level BPE (SmolLM2) at its simplest."""

    bos_id, eos_id, pad_id, vocab_size = -1, 0, -1, 0x110000

    def encode(self, text, bos=False, eos=False):
        return [ord(char) for char in text] + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)

    def piece_to_id(self, piece):
        return ord(piece) if len(piece) == 1 else None

    def id_to_piece(self, token_id):
        return chr(token_id)


def test_tokenizers_without_an_implicit_space_encode_as_they_are():
    from qgpt_code.prompts.infill import adds_leading_space

    tokenizer = CharTokenizer()
    assert not adds_leading_space(tokenizer) and adds_leading_space(code_llama_tokenizer())
    assert encode_without_leading_space(tokenizer, "☺(x)") == tokenizer.encode("☺(x)")
    assert decode_without_leading_space(tokenizer, tokenizer.encode(" 42")) == " 42"
