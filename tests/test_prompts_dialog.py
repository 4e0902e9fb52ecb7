"""Llama 2 dialogs: token for token what Meta's chat_completion builds, and clear refusals."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prompt_fixtures import TAGS, dialogs, llama_tokenizer

from qgpt_code.errors import QGPTError
from qgpt_code.prompts import DialogError, Message, dialog_tokens


def meta_chat_completion_tokens(tokenizer, dialog) -> List[int]:
    """An independent transcription of the prompt part of Meta's `Llama.chat_completion`
    (llama/generation.py, Llama 2 release), with its asserts."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
        [msg["role"] == "assistant" for msg in dialog[1::2]]
    )
    dialog_tokens: List[int] = sum(
        [
            tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    assert dialog[-1]["role"] == "user"
    dialog_tokens += tokenizer.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return dialog_tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dialogs())
def test_dialog_tokens_equal_meta_transcription(dialog):
    tokenizer = llama_tokenizer()
    assert dialog_tokens(tokenizer, dialog) == meta_chat_completion_tokens(tokenizer, dialog)


def test_layout_of_a_known_dialog():
    tokenizer = llama_tokenizer()
    dialog = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello! "},
        {"role": "user", "content": "Sort a list\n"},
    ]
    tokens = dialog_tokens(tokenizer, dialog)
    first = tokenizer.encode("[INST] <<SYS>>\n  Be brief.  \n<</SYS>>\n\n Hi [/INST] Hello! ", bos=True, eos=True)
    last = tokenizer.encode("[INST] Sort a list [/INST]", bos=True)
    assert tokens == first + last
    assert tokens.count(tokenizer.bos_id) == 2 and tokens.count(tokenizer.eos_id) == 1


def test_accepts_typed_dicts_and_read_only_mappings():
    tokenizer = llama_tokenizer()
    typed = [Message(role="user", content="hello")]
    frozen = [MappingProxyType({"role": "user", "content": "hello"})]
    assert dialog_tokens(tokenizer, typed) == dialog_tokens(tokenizer, frozen) == tokenizer.encode(
        "[INST] hello [/INST]", bos=True
    )


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_reserved_tag_is_refused_and_named(tag, index):
    dialog = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "again"},
    ]
    dialog[index] = {**dialog[index], "content": f"before {tag} after"}
    expected = f"message {index} ({dialog[index]['role']}) contains the reserved tag {tag!r}"
    with pytest.raises(DialogError, match=re.escape(expected)):
        dialog_tokens(llama_tokenizer(), dialog)


@settings(max_examples=40, deadline=None)
@given(dialogs(), st.sampled_from(TAGS), st.data())
def test_any_tag_anywhere_is_refused(dialog, tag, data):
    index = data.draw(st.integers(0, len(dialog) - 1))
    text = dialog[index]["content"]
    cut = data.draw(st.integers(0, len(text)))
    dialog[index] = {**dialog[index], "content": text[:cut] + tag + text[cut:]}
    with pytest.raises(DialogError) as raised:
        dialog_tokens(llama_tokenizer(), dialog)
    assert "reserved tag" in str(raised.value)


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "empty"),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}], "alternate"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "end with a user message"),
        ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "alternate"),
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user"}], "no text content"),
        ([{"role": "user", "content": None}], "no text content"),
        (["hello"], "mapping"),
        ("hello", "list"),
    ],
)
def test_bad_dialogs_raise_user_facing_errors(dialog, message):
    with pytest.raises(DialogError, match=message) as raised:
        dialog_tokens(llama_tokenizer(), dialog)
    assert isinstance(raised.value, QGPTError)
