"""Shared artefacts for the prompts tests: SentencePiece tokenizers trained once per process, a tokenizer
with added special tokens (as GGUF chat models have), a model-info stand-in, a long real source file,
and a hypothesis strategy for Llama 2 dialogs."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

from builders import train_sentencepiece
from hypothesis import strategies as st

from qgpt_code.tokenizer import SentencePieceTokenizer


@functools.lru_cache(maxsize=None)
def llama_tokenizer() -> SentencePieceTokenizer:
    """A Llama-style SentencePiece BPE vocabulary without infilling pieces."""
    return SentencePieceTokenizer(train_sentencepiece(vocab_size=512))


@functools.lru_cache(maxsize=None)
def code_llama_tokenizer() -> SentencePieceTokenizer:
    """The same, with Code Llama's ▁<PRE> ▁<MID> ▁<SUF> ▁<EOT> as user-defined pieces."""
    return SentencePieceTokenizer(train_sentencepiece(vocab_size=512, infill_pieces=True))


class AddedSpecialTokens:
    """A tokenizer with extra special tokens appended to its vocabulary, the way a ChatML model adds
    `<|im_start|>`: `piece_to_id` knows them, plain `encode` never produces them."""

    def __init__(self, base, specials: list[str]):
        self.base = base
        self.specials = {piece: base.vocab_size + index for index, piece in enumerate(specials)}
        self.bos_id, self.eos_id, self.pad_id = base.bos_id, base.eos_id, base.pad_id
        self.vocab_size = base.vocab_size + len(specials)

    def encode(self, text, bos=False, eos=False):
        return self.base.encode(text, bos=bos, eos=eos)

    def decode(self, ids):
        return self.base.decode([i for i in ids if i < self.base.vocab_size])

    def piece_to_id(self, piece):
        return self.specials.get(piece, self.base.piece_to_id(piece))

    def id_to_piece(self, token_id):
        names = {v: k for k, v in self.specials.items()}
        return names.get(token_id) or self.base.id_to_piece(token_id)


@dataclass
class Info:
    """Stands in for qgpt_code.checkpoints.assemble.ModelInfo (same field names)."""

    chat_format: str = "llama2"
    chat_template: str | None = None
    metadata: dict = field(default_factory=dict)


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)  # SmolLM2-Instruct's template, as its GGUF file stores it

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)  # the Llama-2-chat template from Hugging Face's tokenizer_config.json


@functools.lru_cache(maxsize=None)
def long_python_file(n_lines: int = 3000) -> str:
    """A real Python file of exactly `n_lines` lines, cut from the standard library's sources."""
    import argparse
    import difflib
    import email.message
    import textwrap

    lines: list[str] = []
    for module in (argparse, difflib, inspect, textwrap, email.message):
        lines.extend(inspect.getsource(module).splitlines())
    assert len(lines) >= n_lines
    return "\n".join(lines[:n_lines]) + "\n"


TAGS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
# Contents mix code, unicode, whitespace at the edges (stripped) and inside (kept), and tag-like text.
_fragments = st.sampled_from([*"abcdef xyz_(){}[]<>/:=.,'\"\n\t 🙂名前ÿ", "INST", "SYS", "def ", "    ", "\n\n"])
_content = st.lists(_fragments, max_size=20).map("".join).filter(lambda text: not any(tag in text for tag in TAGS))


@st.composite
def dialogs(draw):
    """Valid dialogs: an optional system message, 0-3 exchanges, a final user message."""
    n_exchanges = draw(st.integers(0, 3))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_content)})
    for _ in range(n_exchanges):
        messages += [{"role": "user", "content": draw(_content)}, {"role": "assistant", "content": draw(_content)}]
    messages.append({"role": "user", "content": draw(_content)})
    return messages
