"""Sampling functions, streaming text assembly, stop conditions and prompt limits."""

import pytest
import torch

from qgpt_code.detokenize import IncrementalDecoder, StopStringFilter
from qgpt_code.errors import EmptyPromptError, PromptTooLongError, QGPTError
from qgpt_code.generation import SamplingParams, generate_text, stream_text
from qgpt_code.sampling import RowSettings, choose

GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


def draws(logits, settings, n=200):
    """Tokens chosen for one row of logits under each of n evenly spaced draws."""
    from dataclasses import replace

    rows = [replace(settings, uniform=(i + 0.5) / n) for i in range(n)]
    return {row[0] for row in choose(logits.expand(n, -1), rows).fetch()}


def test_top_p_keeps_tokens_while_the_mass_before_them_is_at_most_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert draws(logits, RowSettings(1.0, top_p=0.5)) == {0, 1}  # mass before token 2 is 0.8 > 0.5: cut
    assert draws(logits, RowSettings(1.0, top_p=0.1)) == {0}
    assert draws(logits, RowSettings(1.0, top_p=1.0)) == {0, 1, 2}


def test_top_k_and_temperature_zero():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert draws(logits, RowSettings(1.0, top_k=2)) == {1, 2}
    assert draws(logits, RowSettings(0.0)) == {1}
    assert draws(logits, RowSettings(1.0, top_k=1)) == {1}


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    token, lp, bad, top = choose(logits, [RowSettings(0.0, top_logprobs=2)], logprobs=True).fetch()[0]
    assert (token, bad) == (2, False)
    assert lp == pytest.approx(2.0 - torch.logsumexp(logits, -1).item())
    assert [i for i, _ in top] == [2, 1] and top[0][1] == pytest.approx(lp)


@pytest.mark.parametrize("pieces, stop, expected", [
    (["Hello", " wor", "ld", "\n```", "more"], ["```"], "Hello world\n"),
    (["a<", "/s", "> b"], ["</s>"], "a"),
    (["abc", "def"], ["xyz"], "abcdef"),
    (["ab", "c"], ["bd", "c"], "ab"),
])
def test_stop_strings_are_cut_and_never_emitted(pieces, stop, expected):
    f = StopStringFilter(stop)
    out = "".join(f.push(p) for p in pieces) + f.flush()
    assert out == expected


def test_stop_filter_holds_back_only_a_possible_stop_prefix():
    f = StopStringFilter(["\n\n\n"])
    assert f.push("x = 1\n") == "x = 1"
    assert f.push("\n") == ""
    assert f.push("y") == "\n\ny"


def test_incremental_decoding_never_splits_a_character(sp_tokenizer):
    text = "naïve 漢字🙂 code\n\tx = '€'"
    ids = sp_tokenizer.encode(text)
    prompt = sp_tokenizer.encode("start:", bos=True)
    decoder = IncrementalDecoder(sp_tokenizer, prompt)
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # byte-fallback tokens waited for the rest of their character
    full = sp_tokenizer.decode(prompt + ids)
    assert full.endswith("".join(pieces)) and "".join(pieces).strip() == text.strip()


def test_stream_pieces_join_to_the_completion(tiny_loaded, sp_tokenizer):
    prompt = sp_tokenizer.encode("def add(a, b):", bos=True)
    pieces = list(stream_text(tiny_loaded, prompt, GREEDY))
    completion = generate_text(tiny_loaded, prompt, GREEDY)
    assert "".join(pieces) == completion.text
    assert sp_tokenizer.decode(prompt + completion.tokens).endswith(completion.text.rstrip("\ufffd"))


def test_max_new_tokens_and_length_finish(tiny_loaded, sp_tokenizer):
    result = generate_text(tiny_loaded, sp_tokenizer.encode("x", bos=True), SamplingParams(max_new_tokens=5, temperature=0))
    assert len(result.tokens) == 5 and result.finish_reason == "length"


def test_stop_string_ends_generation_early(tiny_loaded, sp_tokenizer):
    prompt = sp_tokenizer.encode("import os\n", bos=True)
    full = generate_text(tiny_loaded, prompt, GREEDY)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip(), "the tiny model's greedy text should have something to stop on"
    cut = generate_text(tiny_loaded, prompt, SamplingParams(max_new_tokens=24, temperature=0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.tokens) < len(full.tokens)


def test_stop_ids_end_generation_after_that_token(tiny_loaded, sp_tokenizer):
    prompt = sp_tokenizer.encode("import os\n", bos=True)
    full = generate_text(tiny_loaded, prompt, GREEDY)
    stop_id = full.tokens[3]
    cut = generate_text(tiny_loaded, prompt, SamplingParams(max_new_tokens=24, temperature=0, stop_ids=(stop_id,)))
    assert cut.tokens == full.tokens[: full.tokens.index(stop_id) + 1] and cut.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(tiny_loaded, sp_tokenizer):
    prompt = sp_tokenizer.encode("class", bos=True)

    def run(seed):
        params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1.0, seed=seed, logprobs=True)
        return generate_text(tiny_loaded, prompt, params)

    a, b, c = run(7), run(7), run(8)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    assert all(lp <= 0 for lp in a.logprobs) and len(a.logprobs) == len(a.tokens)


def test_prompt_limits(tiny_loaded):
    context = tiny_loaded.model.args.max_seq_len  # 256 for the tiny HF config
    with pytest.raises(PromptTooLongError, match=f"prompt is {context} tokens"):
        generate_text(tiny_loaded, [5] * context, GREEDY)
    with pytest.raises(EmptyPromptError):
        generate_text(tiny_loaded, [], GREEDY)
    long_prompt = [1] + [7] * (context + 50)
    truncated = generate_text(tiny_loaded, long_prompt, SamplingParams(max_new_tokens=4, temperature=0, truncate_prompt=True))
    assert truncated.finish_reason == "length" and len(truncated.tokens) == 1  # the context fills after one


def test_sampling_params_are_validated():
    with pytest.raises(QGPTError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(QGPTError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)


def test_vanishing_temperature_is_greedy_not_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float16)
    assert choose(logits, [RowSettings(1e-30)]).fetch()[0][0] == 1
    assert choose(logits, [RowSettings(1e-3, uniform=0.99)]).fetch()[0][0] == 1
