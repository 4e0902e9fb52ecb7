"""Byte-level BPE ("gpt2") tokenizers from GGUF metadata, on vocabularies trained here.

The vocabulary is trained with plain GPT-2 splitting, so it holds multi-digit tokens ("20", "2024"):
then the declared pre-tokenizer visibly decides the ids, and each name is checked against an
independent pipeline built from `tokenizers`' own pre-tokenizers (or transformers' GGUF tokenizer).
"""

from __future__ import annotations

import pytest

from builders import code_corpus, hf_llama
from gguf_builders import bpe_metadata, train_byte_level_bpe, write_llama_gguf
from qgpt_code.errors import TokenizerError
from qgpt_code.gguf_tokenizer import PRE_TOKENIZERS, tokenizer_from_metadata
from qgpt_code.tokenizer import load_tokenizer

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
NUMBERS = [f"year {y}: {y * 37 % 10007} items, 12345 total, x{y}" for y in range(1990, 2030)]
TEXTS = code_corpus()[:1500] + NUMBERS + ["I'M here, you'LL see", "\n\n\n1. a\n  2. b", "tab\tand  spaces   "]


@pytest.fixture(scope="module")
def trained():
    return train_byte_level_bpe(800, CONTROL + USER_DEFINED, code_corpus() + NUMBERS, split_digits=False)


def gguf_tokenizer(trained, pre: str, **kwargs):
    meta = bpe_metadata(trained, pre, CONTROL, USER_DEFINED, **kwargs)
    return tokenizer_from_metadata(meta, source=f"<{pre}>")


def copy_with(trained, *pre_tokenizers_):
    """The trained tokenizer with another pre-tokenizer (tokenizers' built-in ones) in front."""
    from tokenizers import Tokenizer, pre_tokenizers

    copy = Tokenizer.from_str(trained.to_str())
    copy.pre_tokenizer = pre_tokenizers.Sequence(list(pre_tokenizers_))
    return copy


def test_vocabulary_has_multi_digit_tokens(trained):
    assert any(len(t) > 1 and t.isdigit() for t in trained.get_vocab())


def test_gpt2_pre_tokenizer_equals_gpt2_byte_level(trained):
    ours = gguf_tokenizer(trained, "gpt-2")
    for text in TEXTS:
        assert ours.encode(text) == trained.encode(text, add_special_tokens=False).ids, text


def test_smollm_pre_tokenizer_isolates_digits(trained):
    """"smollm" (as "starcoder") = SmolLM2's published tokenizer.json: Digits(individual) then ByteLevel."""
    from tokenizers import pre_tokenizers

    reference = copy_with(trained, pre_tokenizers.Digits(individual_digits=True),
                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    ours, gpt2 = gguf_tokenizer(trained, "smollm"), gguf_tokenizer(trained, "gpt-2")
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    year = ours.encode("in 2024")
    assert [ours.id_to_piece(i) for i in year][-4:] == ["2", "0", "2", "4"]
    assert year != gpt2.encode("in 2024")  # the same vocabulary splits otherwise under GPT-2 rules


def test_llama_bpe_matches_transformers(tmp_path, trained):
    """transformers maps "llama-bpe" to its own Llama 3 regex: an independent implementation."""
    from transformers import AutoTokenizer

    meta = bpe_metadata(trained, "llama-bpe", CONTROL, USER_DEFINED, bos="<|endoftext|>", eos="<|im_end|>")
    path = tmp_path / "llama3-like.gguf"
    write_llama_gguf(path, hf_llama({"vocab_size": len(meta["tokenizer.ggml.tokens"])}), meta)
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.add_bos  # llama.cpp's default for Llama 3 vocabularies when the file does not say
    for text in TEXTS:
        assert ours.encode_special(text) == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.pre_tokens("12345 I'M") == ["123", "45", "ĠI", "'M"]  # digits in threes, any-case contractions


def test_control_and_user_defined_tokens(trained):
    tok = gguf_tokenizer(trained, "smollm", bos="<|im_start|>", eos="<|im_end|>")
    start, end, think = (tok.piece_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<think>"))
    text = "<|im_start|>user\n<think>hi</think><|im_end|>"
    plain, special = tok.encode(text), tok.encode_special(text)
    assert start not in plain and end not in plain  # control tokens in user text stay text
    assert think in plain and think in special  # user-defined tokens are always matched whole
    assert special[0] == start and special[-1] == end
    assert tok.decode(special) == "user\n<think>hi</think>"  # control tokens print nothing
    assert tok.decode(plain) == text
    assert tok.encode_special("no specials here 123") == tok.encode("no specials here 123")
    assert set(tok.eog_ids) == {tok.piece_to_id("<|endoftext|>"), end}
    assert not tok.add_bos and tok.encode("x", bos=True)[0] == start  # BOS only when asked for


def test_add_bos_follows_the_file(trained):
    assert gguf_tokenizer(trained, "gpt-2", bos="<|endoftext|>", add_bos=True).add_bos
    assert not gguf_tokenizer(trained, "llama-bpe", bos="<|endoftext|>", add_bos=False).add_bos


def test_missing_pre_tokenizer_means_default(trained):
    meta = bpe_metadata(trained, "x", CONTROL)
    del meta["tokenizer.ggml.pre"]
    tok = tokenizer_from_metadata(meta, "<old file>")
    assert tok.pre_tokenizer == "default"
    assert tok.decode(tok.encode("a += b; 1234")) == "a += b; 1234"


def test_unknown_pre_tokenizer_is_refused(trained):
    with pytest.raises(TokenizerError, match=r"pre-tokenizer 'jais' .* not supported; supported: .*smollm"):
        gguf_tokenizer(trained, "jais")


def test_unknown_tokenizer_model_is_refused(trained):
    meta = {**bpe_metadata(trained, "gpt-2", CONTROL), "tokenizer.ggml.model": "bert"}
    with pytest.raises(TokenizerError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_metadata(meta, "<bert>")


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZERS))
def test_every_supported_pre_tokenizer_round_trips(trained, name):
    tok = gguf_tokenizer(trained, name)
    for text in TEXTS[:200] + ["naïve 日本語 😀 Привет ²³ ½"]:
        assert tok.decode(tok.encode(text)) == text
