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
    assert expected.text and not expected.text.endswith("\n")
    assert result.stdout == expected.text + "\n"  # the completion, then a newline for the shell's prompt
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


@pytest.mark.parametrize("command", ["complete", "chat"])
def test_prompt_over_the_context(tiny_hf, command):
    long_prompt = "x = 1\n" * 400  # far beyond the tiny model's 256-token context
    result = qgpt(command, "--model", str(tiny_hf[1]), long_prompt)
    assert_clean_error(result, "at most 255 fit in the model's context window of 256", "shorten it")
    assert "--max-seq-len" not in result.stderr  # complete and chat have no such flag


def imports_torch(result: subprocess.CompletedProcess) -> bool:
    """Whether a command run with `python -X importtime` imported torch (or the model, which needs it)."""
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return bool(imported & {"torch", "qgpt_code.model"})


def qgpt_importtime(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QGPT_MODEL"}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "qgpt_code", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if not line.startswith("import time:")]


# Each of these is refused in the flag's own words, in one line, before torch is imported.
TYPOS = [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", ""], "--device ''"),
    (["--device", "meta"], "--device 'meta'"),
    (["--device", "xpu"], "--device 'xpu'"),
    (["--device", "mps"], "--device 'mps'"),
    (["--device", "cuda:x"], "--device 'cuda:x'"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--seed", str(2**64)], "--seed"),
    (["--stop", ""], "--stop"),
    (["--model", "/no/such/model.gguf"], "--model /no/such/model.gguf"),
    (["--tokenizer", "/no/such/tokenizer.model"], "--tokenizer"),
]


@pytest.mark.parametrize("flags, named", TYPOS, ids=[" ".join(f) for f, _ in TYPOS])
def test_typos_fail_at_once_in_the_flags_words(tiny_hf, flags, named):
    result = qgpt_importtime("complete", "--model", str(tiny_hf[1]), *flags, "hello")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line.startswith("qgpt: error: ") and named in line, line
    assert "max_new_tokens" not in line and "top_p " not in line  # the flag, not the library's field
    assert not imports_torch(result)  # refused before torch: a fraction of a second, not seconds


@pytest.mark.parametrize("flags, named", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--max-seq-len", "0"], "--max-seq-len"),
    (["--cache-bytes", "0"], "--cache-bytes"),
    (["--port", "70000"], "--port"),
    (["--port", "0"], "--port"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--allowed-origins", "example.com"], "--allowed-origins"),
    (["--device", "mps"], "--device"),
])
def test_serve_refuses_bad_flags_before_loading(tiny_hf, flags, named):
    result = qgpt_importtime("serve", "--model", str(tiny_hf[1]), *flags)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line.startswith("qgpt: error: ") and named in line, line
    assert not imports_torch(result)


def test_serve_finds_a_busy_port_before_loading_the_model(tiny_hf):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = qgpt_importtime("serve", "--model", str(tiny_hf[1]), "--port", str(port))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert f"--port {port}" in line and "already in use" in line
    assert not imports_torch(result) and "loading" not in result.stderr


def test_serve_socket_answers_without_nagle_delay():
    """asyncio turns Nagle's algorithm off only on sockets made for TCP; with it on, every answer written
    in two parts (headers, body) waited 40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from qgpt_code.server.command import listen_socket

    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listen_socket("127.0.0.1", 0))
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value

    assert asyncio.run(accepted_nodelay()) != 0


def test_lsp_refuses_bad_engine_flags_at_once():
    result = subprocess.run([sys.executable, "-m", "qgpt_code.lsp", "--max-batch", "0"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "qgpt: error: --max-batch must be at least 1, got 0"
