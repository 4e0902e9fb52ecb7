"""Shared fixtures: a SentencePiece model trained here and tiny checkpoints written to disk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/builders.py

from builders import hf_llama, train_sentencepiece, write_hf_dir  # noqa: E402


@pytest.fixture(scope="session")
def sp_proto() -> bytes:
    return train_sentencepiece(512)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_proto):
    from qgpt_code.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(sp_proto)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, sp_proto):
    """(transformers model, its safetensors directory): GQA, untied embeddings."""
    model = hf_llama({})
    return model, write_hf_dir(model, tmp_path_factory.mktemp("tiny_hf"), sp_proto)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_hf):
    from qgpt_code import load_model

    return load_model(tiny_hf[1], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def infill_backend():
    """An in-process eval backend over the infill test model (an engine of batch 4), one per test module."""
    from test_server_support import infill_model, make_engine

    from qgpt_code.evals.backends import EngineBackend

    loaded = infill_model()
    backend = EngineBackend(loaded, make_engine(loaded, max_batch=4))
    yield backend
    backend.close()
