"""The `qgpt` command as a user runs it: a real subprocess, stdout for results, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qgpt_code.generation import SamplingParams, generate_text


def qgpt(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QGPT_MODEL"}  # the test decides the model
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "qgpt_code", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("qgpt: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def test_help_is_instant_and_imports_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "qgpt_code", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "complete" in result.stdout and "chat" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "sentencepiece" not in imported


@pytest.mark.parametrize("flags", [[], ["--eager"]], ids=["fused CPU decode", "plain PyTorch decode"])
def test_complete_prints_only_the_completion(tiny_hf, tiny_loaded, sp_tokenizer, flags):
    prompt = "def fibonacci(n):"
    result = qgpt("complete", "--model", str(tiny_hf[1]), "--device", "cpu", "--temperature", "0",
                  "--max-tokens", "12", *flags, prompt)
    assert result.returncode == 0, result.stderr
    expected = generate_text(tiny_loaded, sp_tokenizer.encode(prompt, bos=True),
                             SamplingParams(max_new_tokens=12, temperature=0))
    assert result.stdout == expected.text
    assert "loading" in result.stderr  # progress goes to stderr


def test_model_from_environment_variable(tiny_hf):
    result = qgpt("complete", "--temperature", "0", "--max-tokens", "3", "x = ",
                  env_extra={"QGPT_MODEL": str(tiny_hf[1])})
    assert result.returncode == 0, result.stderr
    assert str(tiny_hf[1]) in result.stderr


def test_missing_checkpoint_directory(tmp_path):
    assert_clean_error(qgpt("complete", "--model", str(tmp_path / "nope"), "hello"), "nope", "no such file")


def test_corrupted_shard(tmp_path, tiny_loaded, sp_proto):
    from builders import meta_params, write_meta_dir

    from qgpt_code.model import checkpoint_tensors

    params = {**meta_params(tiny_loaded.info.args), "multiple_of": 32}
    meta = write_meta_dir(checkpoint_tensors(tiny_loaded.model), params, tmp_path / "m", sp_proto, 2)
    (meta / "consolidated.00.pth").write_bytes(b"not a zip file at all")
    assert_clean_error(qgpt("complete", "--model", str(meta), "hello"), "consolidated.00.pth")


def test_wrong_tokenizer_for_the_vocabulary(tmp_path, tiny_hf):
    from builders import train_sentencepiece

    other = tmp_path / "other.model"
    other.write_bytes(train_sentencepiece(600))
    assert_clean_error(qgpt("complete", "--model", str(tiny_hf[1]), "--tokenizer", str(other), "hi"),
                       "600 tokens", "512")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(tiny_hf, prompt):
    assert_clean_error(qgpt("complete", "--model", str(tiny_hf[1]), prompt), "empty")


def test_prompt_over_the_context(tiny_hf):
    long_prompt = "x = 1\n" * 400  # far beyond the tiny model's 256-token context
    assert_clean_error(qgpt("complete", "--model", str(tiny_hf[1]), long_prompt), "context window holds 255")


def test_bad_sampling_values_are_one_line_errors(tiny_hf):
    assert_clean_error(qgpt("complete", "--model", str(tiny_hf[1]), "--top-p", "0", "hi"), "top_p")
