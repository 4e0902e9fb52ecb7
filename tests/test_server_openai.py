"""The HTTP endpoint driven by the official `openai` client against a real uvicorn server and engine.

"Same result" here means the same as the engine behind the server gives for the same prompt tokens
when asked directly: the endpoint must be a faithful adapter (prompts, sampling fields, text).
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_support import RunningServer, infill_model, make_engine

from qgpt_code.engine import Request
from qgpt_code.generation import SamplingParams
from qgpt_code.prompts import ContextFile, ContextOptions, completion_prompt, dialog_tokens, infill_tokens
from qgpt_code.server.settings import ServerSettings

MODEL = "tiny-infill"
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def server():
    server = RunningServer(make_engine(infill_model()), ServerSettings(model_id=MODEL))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def direct(server, tokens: list[int], **params):
    """What the engine behind the server generates for these prompt tokens."""
    return server.engine.submit(Request(tokens, SamplingParams(**params))).result()


def encode(text: str) -> list[int]:
    return infill_model().tokenizer.encode(text, bos=True)


def test_completion_is_what_the_engine_generates(server, client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    expected = direct(server, encode(PROMPT), max_new_tokens=24, temperature=0)
    (choice,) = reply.choices
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert reply.model == MODEL and reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.usage.prompt_tokens == len(encode(PROMPT))
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_uses_the_llama2_dialog_format(server, client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    tokens = dialog_tokens(infill_model().tokenizer, messages)
    expected = direct(server, tokens, max_new_tokens=16, temperature=0)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert reply.usage.prompt_tokens == len(tokens) and reply.object == "chat.completion"


def test_streamed_completion_adds_up_to_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_is_server_sent_events_ending_in_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
    }) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_streamed_chat_starts_with_the_role_and_adds_up(client):
    messages = [{"role": "user", "content": "Write a loop."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_it(client, stream):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    assert len(free) > 12, "the greedy completion is too short to cut"
    stop = free[6:9]
    expected = free[: free.find(stop)]
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@@@"],
                                      stream=stream)
    if stream:
        chunks = list(reply)
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, reason = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == expected and reason == "stop"


def test_seed_reproduces_sampling_and_choices_differ(client):
    def sample(seed, n=1):
        reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=1.0,
                                          seed=seed, n=n)
        return [c.text for c in reply.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    three = sample(11, n=3)
    assert three == sample(11, n=3) and len(set(three)) == 3


def test_repeated_prompt_is_served_from_the_prefix_cache(server, client):
    prompt = "import os\nimport sys\n\n" + "".join(f"def handler_{i}(event):\n    return event\n\n" for i in range(12))
    cached_before = server.metric("qgpt_cached_prompt_tokens_total")
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens > 150
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.choices[0].text == first.choices[0].text
    cached_after = server.metric("qgpt_cached_prompt_tokens_total")
    assert cached_after - cached_before >= second.usage.prompt_tokens_details.cached_tokens


def test_echo_n_and_logprobs_in_openai_shape(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2, echo=True,
                                      logprobs=3)
    n_prompt = len(encode(PROMPT))
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.prompt_tokens == n_prompt  # a prompt sampled n times counts once
    for choice in reply.choices:
        assert choice.text.startswith(PROMPT)
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        generated = lp.token_logprobs[n_prompt:]
        assert lp.token_logprobs[:n_prompt] == [None] * n_prompt  # the engine does not score prompts
        assert len(generated) == reply.usage.completion_tokens // 2
        assert lp.text_offset == sorted(lp.text_offset)
        for logprob, top in zip(generated, lp.top_logprobs[n_prompt:]):
            assert 1 <= len(top) <= 3 and logprob <= 0
            assert logprob == pytest.approx(max(top.values()))  # greedy picks the likeliest


def test_chat_logprobs_in_openai_shape(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8") == entry.token


def test_suffix_fills_in_the_middle(server, client):
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    reply = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=12, temperature=0)
    tokens = infill_tokens(infill_model().tokenizer, prefix, suffix)
    assert reply.usage.prompt_tokens == len(tokens)
    assert reply.choices[0].text == direct(server, tokens, max_new_tokens=12, temperature=0,
                                           stop_ids=(infill_model().tokenizer.piece_to_id("▁<EOT>"),)).text


def test_infill_in_llama_cpp_shape_uses_the_editor_prompt(server):
    body = {"input_prefix": "import math\n\ndef area(r):\n", "prompt": "    return ", "input_suffix": "\n",
            "input_extra": [{"filename": "geometry/constants.py", "text": "TAU = 2 * math.pi\n"}],
            "n_predict": 16, "temperature": 0}
    reply = httpx.post(f"{server.url}/infill", json=body).json()
    expected = completion_prompt(infill_model().tokenizer, body["input_prefix"] + body["prompt"], "\n",
                                 other_files=[ContextFile("geometry/constants.py", "TAU = 2 * math.pi\n")],
                                 options=ContextOptions(budget=1024 - 16))
    assert reply["tokens_evaluated"] == len(expected.tokens) and expected.context_paths == ("geometry/constants.py",)
    assert reply["stop"] is True and reply["model"] == MODEL and reply["tokens_predicted"] <= 16
    raw = direct(server, expected.tokens, max_new_tokens=16, temperature=0, stop_ids=expected.stop_ids).text
    assert reply["content"] == expected.postprocess(raw)

    with httpx.stream("POST", f"{server.url}/infill", json={**body, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1].startswith("data: {") and '"stop":true' in lines[-1]  # llama.cpp's streams have no [DONE]
    chunks = [json.loads(line[len("data: "):]) for line in lines]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["content"] == ""  # as llama.cpp: the text arrives before the final chunk with the totals
    assert "".join(c["content"] for c in chunks[:-1]) == raw


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_streams_end_with_a_chunk_that_only_finishes(client, route):
    """OpenAI's order (and llama.cpp's): the last text in an ordinary chunk, then one with no text and
    the finish_reason, so a client that reads text only from unfinished chunks misses nothing."""
    if route == "completions":
        whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                                stream=True))
        texts = [c.choices[0].text for c in chunks]
    else:
        messages = [{"role": "user", "content": "Write a loop."}]
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                               temperature=0).choices[0].message.content
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                     stream=True))[1:]  # after the role chunk
        texts = [c.choices[0].delta.content for c in chunks]
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[:-1] == [None] * (len(chunks) - 1) and finishes[-1] in ("stop", "length")
    assert texts[-1] in ("", None)
    assert "".join(texts[:-1]) == whole and whole


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["queued"] == 0


def test_metrics_count_requests_and_latencies(server, client):
    before = server.metric("qgpt_http_requests_total", route="/v1/completions", status="200")
    ttft_before = server.metric("qgpt_time_to_first_token_seconds_count")
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
    assert server.metric("qgpt_http_requests_total", route="/v1/completions", status="200") == before + 1
    assert server.metric("qgpt_time_to_first_token_seconds_count") == ttft_before + 1
    assert server.metric("qgpt_time_per_output_token_seconds_count") >= 1
    stats = server.engine.stats()
    assert server.metric("qgpt_kv_cache_bytes_capacity") == stats.cache_bytes_capacity
    assert server.metric("qgpt_kv_blocks_total") == stats.blocks_total > 0
    assert server.metric("qgpt_kv_blocks_free") + server.metric("qgpt_kv_blocks_cached") == stats.blocks_total  # idle
    assert 0 <= server.metric("qgpt_prefix_cache_hit_rate") <= 1 and server.metric("qgpt_preemptions_total") == 0
    assert server.metric("qgpt_completion_tokens_total") > 0
