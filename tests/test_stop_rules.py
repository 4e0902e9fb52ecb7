"""The engine's ways of ending a generation early besides EOS and the budget: `stop_when` (an editor's
"the block is closed"), `max_generation_seconds` (llama.cpp's t_max_predict_ms), and a budget of 0
new tokens (llama.cpp's n_predict 0: compute and cache the prompt, answer at once)."""

from __future__ import annotations

import time

import pytest

from qgpt_code.engine import Engine, Request
from qgpt_code.errors import QGPTError
from qgpt_code.generation import SamplingParams, TextState
from qgpt_code.kv_cache import KVCache

SOURCE = "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n"


def feed(tokenizer, params: SamplingParams, text: str):
    """Accept `text`'s tokens one by one; the events up to and including the one that ends it."""
    prompt = tokenizer.encode("# start\n", bos=True)
    state = TextState(tokenizer, prompt, params, budget=1000)
    events = []
    for token in tokenizer.encode(text)[1:] if text.startswith(" ") else tokenizer.encode(text):
        events.append(state.accept(token, None))
        if events[-1].finish_reason:
            break
    return events


def test_stop_when_is_asked_when_a_line_is_known_and_ends_the_text_there(sp_tokenizer):
    asked: list[str] = []

    def block_left(text: str) -> bool:
        asked.append(text)
        lines = text.split("\n")
        return len(lines) > 1 and any(line.strip() and not line.startswith(" ") for line in lines[1:])

    events = feed(sp_tokenizer, SamplingParams(stop_when=block_left), SOURCE)
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert text.endswith("r * r\n\np"), text  # stopped at the first character of the dedented line
    # asked only at line breaks and at a new line's first non-blank character, never mid-word
    assert asked and all("\n" in a for a in asked)
    for earlier, later in zip(asked, asked[1:]):
        assert later.startswith(earlier)
    # three line breaks, and "return" and "p" starting new lines
    assert [a[len(asked[0]):] for a in asked[1:]] == ["    return", "    return 3.14 * r * r\n",
                                                        "    return 3.14 * r * r\n\n", "    return 3.14 * r * r\n\np"]


def test_stop_when_that_never_fires_changes_nothing(sp_tokenizer):
    plain = feed(sp_tokenizer, SamplingParams(), SOURCE)
    watched = feed(sp_tokenizer, SamplingParams(stop_when=lambda text: False), SOURCE)
    assert [(e.token_id, e.text, e.finish_reason) for e in plain] == [
        (e.token_id, e.text, e.finish_reason) for e in watched]


def test_time_limit_counts_from_the_first_token(sp_tokenizer):
    params = SamplingParams(max_generation_seconds=0.05)
    state = TextState(sp_tokenizer, sp_tokenizer.encode("x", bos=True), params, budget=100)
    time.sleep(0.1)  # waiting for the first token (prompt processing) does not count
    ids = sp_tokenizer.encode("a b c d e f")
    assert state.accept(ids[0], None).finish_reason is None
    assert state.accept(ids[1], None).finish_reason is None
    time.sleep(0.06)
    assert state.accept(ids[2], None).finish_reason == "time_limit"


def test_time_limit_must_be_positive_and_budget_not_negative():
    with pytest.raises(QGPTError, match="max_generation_seconds"):
        SamplingParams(max_generation_seconds=0)
    with pytest.raises(QGPTError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)


def test_a_zero_token_budget_caches_the_prompt_and_generates_nothing(tiny_loaded):
    prompt = [1] + list(range(20, 20 + 70))
    budget = 4 * 256 * KVCache.bytes_per_token(tiny_loaded.model.args, tiny_loaded.dtype)
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=budget) as engine:
        warm = engine.submit(Request(prompt, SamplingParams(max_new_tokens=0)))
        result = warm.result()
        assert (result.text, result.tokens, result.finish_reason) == ("", [], "length")
        assert engine.stats().tokens_computed == len(prompt)
        real = engine.submit(Request(prompt + [300, 301], SamplingParams(max_new_tokens=3, temperature=0)))
        assert len(real.result().tokens) == 3
        assert real.cached_tokens == len(prompt)  # the warm-up computed every prompt token
