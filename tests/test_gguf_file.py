"""The GGUF header parser against the gguf package's reference reader, and broken files.

A broken or unsupported file must give one CheckpointError line naming the file, never a traceback.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from builders import hf_llama
from gguf_builders import header_bytes_only, sentencepiece_metadata, truncated_copy, write_llama_gguf
from qgpt_code.checkpoints import load_model
from qgpt_code.checkpoints.gguf import GGUFFile
from qgpt_code.errors import CheckpointError, TokenizerError
from qgpt_code.models import default_model_path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, sp_proto):
    path = tmp_path_factory.mktemp("file") / "tiny.gguf"
    write_llama_gguf(path, hf_llama({}), sentencepiece_metadata(sp_proto), alignment=64)
    return path


def assert_same_as_reference(path):
    ours, reference = GGUFFile(path), GGUFReader(str(path))
    keys = [k for k in reference.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        expected, got = reference.fields[key].contents(), ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, key
    assert [t.name for t in reference.tensors] == list(ours.tensors)
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        assert info.shape == tuple(reversed(tensor.shape.tolist())), tensor.name
        assert (info.qtype, info.offset, info.n_bytes) == (tensor.tensor_type, tensor.data_offset, tensor.n_bytes)


def test_header_matches_the_reference_reader(tiny_gguf):
    assert_same_as_reference(tiny_gguf)


@pytest.mark.slow
def test_header_matches_the_reference_reader_on_the_default_model():
    assert_same_as_reference(default_model_path())


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_model(path, device="cpu", dtype="float32")
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_truncated_in_the_tensor_data(tmp_path, tiny_gguf):
    cut = truncated_copy(tiny_gguf, tmp_path / "cut.gguf", tiny_gguf.stat().st_size - 1000)
    message = load_error(cut)
    assert "truncated" in message and "output.weight" in message


def test_truncated_in_the_header(tmp_path, tiny_gguf):
    cut = truncated_copy(tiny_gguf, tmp_path / "cut.gguf", header_bytes_only(tiny_gguf) // 2)
    assert "truncated" in load_error(cut)


@pytest.mark.parametrize("content,expected", [
    (b"", "empty file"),
    (b"PK\x03\x04 a zip file", "not a GGUF file"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "version 1 is not supported"),
])
def test_not_a_gguf_file(tmp_path, content, expected):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert expected in load_error(path)


def write_raw(path, arch: str, keys: dict, tensors: dict[str, np.ndarray]) -> None:
    writer = GGUFWriter(str(path), arch)
    for key, value in keys.items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_string)(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_raw(path, "qwen2", {"qwen2.block_count": 1}, {"token_embd.weight": np.zeros((8, 4), np.float32)})
    assert "architecture 'qwen2' is not supported" in load_error(path)


def test_unsupported_llama_variants(tmp_path, tiny_gguf):
    scaled = tmp_path / "rope-scaled.gguf"
    write_llama_gguf(scaled, hf_llama({}), None, extra={"llama.rope.scaling.type": "yarn"})
    assert "rotary scaling (yarn) is not supported" in load_error(scaled)
    unscaled = tmp_path / "rope-linear-no-factor.gguf"
    write_llama_gguf(unscaled, hf_llama({}), None, extra={"llama.rope.scaling.type": "linear"})
    assert "needs a positive llama.rope.scaling.factor" in load_error(unscaled)
    moe = tmp_path / "moe.gguf"
    write_llama_gguf(moe, hf_llama({}), None, extra={"llama.expert_count": 8})
    assert "mixture-of-experts" in load_error(moe)


def test_tensor_type_we_cannot_dequantize(tmp_path, sp_proto):
    model = hf_llama({})
    path = tmp_path / "int8.gguf"
    raw = {"blk.0.attn_q.weight": np.ones((64, 64), np.int8)}  # I8: stored as-is, no dequantizer
    write_llama_gguf(path, model, sentencepiece_metadata(sp_proto), raw_matrices=raw)
    assert "'blk.0.attn_q.weight' is stored as I8" in load_error(path)


def test_gguf_without_a_tokenizer(tmp_path):
    path = tmp_path / "no-vocab.gguf"
    write_llama_gguf(path, hf_llama({}), None)
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_model(path, device="cpu", dtype="float32")


def test_cli_reports_a_broken_file_in_one_line(tmp_path, tiny_gguf):
    cut = truncated_copy(tiny_gguf, tmp_path / "cut.gguf", 5000)
    result = subprocess.run([sys.executable, "-m", "qgpt_code", "complete", "--model", str(cut), "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qgpt: error: ") and str(cut) in last and "truncated" in last
