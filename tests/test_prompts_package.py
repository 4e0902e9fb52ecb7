"""The prompts package as other parts use it: its public names, its import cost, the real ModelInfo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prompt_fixtures import CHATML_TEMPLATE, AddedSpecialTokens, llama_tokenizer

import qgpt_code.prompts as prompts
from qgpt_code.errors import QGPTError


def test_imports_no_torch_no_jinja_and_fast():
    code = (
        "import sys, time; t = time.perf_counter(); import qgpt_code.prompts; t = time.perf_counter() - t\n"
        "heavy = [m for m in ('torch', 'jinja2', 'sentencepiece', 'numpy') if m in sys.modules]\n"
        "print(heavy, t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", out
    assert float(out[1]) < 1.0  # about 0.07 s here; the language server imports it at start-up


def test_public_names():
    for name in prompts.__all__:
        assert hasattr(prompts, name), name
    for error in (prompts.DialogError, prompts.ChatTemplateError, prompts.InfillUnsupportedError):
        assert issubclass(error, QGPTError)


def test_chat_tokens_accepts_the_real_model_info():
    from qgpt_code.checkpoints.assemble import ModelInfo
    from qgpt_code.config import preset

    tokenizer = AddedSpecialTokens(llama_tokenizer(), ["<|im_start|>", "<|im_end|>"])
    dialog = [{"role": "user", "content": "hi"}]
    llama = ModelInfo(path=Path("m"), format="meta", args=preset("tiny"), name="tiny")
    assert prompts.chat_tokens(llama, tokenizer, dialog) == prompts.dialog_tokens(tokenizer, dialog)
    chatml = ModelInfo(path=Path("m.gguf"), format="gguf", args=preset("tiny"), name="smol",
                       chat_format="template", chat_template=CHATML_TEMPLATE)
    tail = [tokenizer.piece_to_id("<|im_start|>"), *tokenizer.encode("assistant\n")]
    assert prompts.chat_tokens(chatml, tokenizer, dialog)[-len(tail) :] == tail
