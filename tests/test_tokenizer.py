"""SentencePiece tokenizer on a Llama-style model trained in the test (BPE with byte fallback)."""

import pytest
from builders import CODE_LLAMA_PIECES, train_sentencepiece

from qgpt_code.errors import TokenizerError
from qgpt_code.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

ROUND_TRIP = [
    "def f(x):\n\treturn x  \n",  # tab and trailing spaces
    "    indented = '四 spaces'\n\n\n",
    "emoji 🙂 and CJK 漢字 and accents héllo, ñ",
    "x=1;y=2  # trailing   ",
    "\u00a0non-breaking\u2003em space",
    "12345.678e-9 0x1F",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)
    assert sp_tokenizer.decode(ids) == text


def test_bos_eos_and_ids(sp_tokenizer):
    ids = sp_tokenizer.encode("hello", bos=True, eos=True)
    assert (ids[0], ids[-1]) == (sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (1, 2)
    assert sp_tokenizer.pad_id == -1
    assert isinstance(sp_tokenizer, Tokenizer)


def test_unicode_outside_the_vocabulary_falls_back_to_bytes(sp_tokenizer):
    ids = sp_tokenizer.encode("𝔘")  # a character the training corpus never saw
    assert all(sp_tokenizer.id_to_piece(i).startswith(("<0x", "▁")) for i in ids)
    assert sp_tokenizer.decode(ids) == "𝔘"


def test_special_piece_lookup():
    with_infill = SentencePieceTokenizer(train_sentencepiece(512, infill_pieces=True))
    ids = [with_infill.piece_to_id(p) for p in CODE_LLAMA_PIECES]
    assert None not in ids and len(set(ids)) == 4
    assert [with_infill.id_to_piece(i) for i in ids] == CODE_LLAMA_PIECES


def test_absent_piece_is_none_not_unk(sp_tokenizer):
    assert sp_tokenizer.piece_to_id("▁<PRE>") is None
    assert sp_tokenizer.piece_to_id("<unk>") == 0


def test_load_tokenizer_from_file_and_directory(tmp_path, sp_proto):
    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    nested = tmp_path / "llama-2-7b"
    nested.mkdir()
    for where in (tmp_path / "tokenizer.model", tmp_path, nested):  # Meta keeps it one level up
        assert load_tokenizer(where).encode("abc") == SentencePieceTokenizer(sp_proto).encode("abc")


def test_bad_tokenizer_files_give_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"definitely not a protobuf")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(garbage)
