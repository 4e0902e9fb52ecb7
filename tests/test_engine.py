"""The serving engine: prefix reuse, eviction, concurrency, cancellation, overload, deadlines.

"Same result" follows the documented tolerance: greedy tokens must be identical, except that a
divergence is accepted where the reference's top two logits at that step differ by less than the
float noise of a different batch shape or chunking (1e-4 in fp32).
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from qgpt_code.engine import Engine, EngineOverloaded, Request
from qgpt_code.errors import PromptTooLongError, QGPTError
from qgpt_code.generation import SamplingParams, generate_text
from qgpt_code.kv_cache import BLOCK_SIZE, KVCache

NOISE = 1e-4
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def assert_same_greedy(loaded, prompt, expected, got):
    if got == expected:
        return
    i = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    sequence = torch.tensor([list(prompt) + expected[:i]])
    with torch.no_grad():
        logits = loaded.model(sequence, torch.arange(sequence.shape[1])[None])[0, -1]
    top2 = logits.topk(2).values
    assert (top2[0] - top2[1]).item() < NOISE, f"tokens diverge at step {i} where the top-2 gap is {top2[0] - top2[1]:.2e}"


def random_prompts(rng: random.Random, n: int, shared: list[int]) -> list[list[int]]:
    """Prompts sharing prefixes of random lengths with `shared` (often ending mid-block)."""
    prompts = []
    for _ in range(n):
        keep = rng.randrange(0, len(shared))
        prompts.append([1] + shared[:keep] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))])
    return prompts


def small_budget(loaded, rows: int, max_seq_len: int) -> int:
    return rows * max_seq_len * KVCache.bytes_per_token(loaded.model.args, loaded.dtype)


def test_cached_prefix_gives_the_same_greedy_tokens(tiny_loaded):
    rng = random.Random(0)
    shared = [rng.randrange(3, 512) for _ in range(150)]
    prompts = random_prompts(rng, 12, shared)
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 6, 256)) as engine:
        for prompt in prompts:  # one at a time, so each can find its predecessors' prefixes
            handle = engine.submit(Request(prompt, GREEDY))
            got = handle.result().tokens
            assert_same_greedy(tiny_loaded, prompt, generate_text(tiny_loaded, prompt, GREEDY).tokens, got)
        stats = engine.stats()
    assert stats.prefix_hits >= 6 and stats.tokens_reused > 300
    assert stats.requests_finished == len(prompts)


def test_reuse_counts_are_exact_including_mid_block(tiny_loaded):
    base = [1] + list(range(10, 10 + 2 * BLOCK_SIZE + 7))  # 2 full blocks and 8 tokens into the third
    with Engine(tiny_loaded, max_batch=1, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 3, 256)) as engine:
        first = engine.submit(Request(base, GREEDY))
        first.result()
        assert first.cached_tokens == 0
        extended = base + [400, 401, 402]
        second = engine.submit(Request(extended, GREEDY))
        second.result()
        assert second.cached_tokens == len(base)  # every token of the earlier prompt, not just full blocks
        assert engine.stats().tokens_reused == len(base)


def test_generated_tokens_are_cached_for_the_next_chat_turn(tiny_loaded):
    prompt = [1] + list(range(50, 120))
    params = SamplingParams(max_new_tokens=20, temperature=0)
    with Engine(tiny_loaded, max_batch=1, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 2, 256)) as engine:
        answer = engine.submit(Request(prompt, params)).result()
        assert answer.finish_reason == "length"
        next_turn = engine.submit(Request(prompt + answer.tokens + [7, 8, 9], params))
        next_turn.result()
    # everything but the answer's last token, which was sampled but never fed back through the model
    assert next_turn.cached_tokens == len(prompt) + len(answer.tokens) - 1


def test_eviction_under_a_tiny_budget_never_corrupts_running_requests(tiny_loaded):
    rng = random.Random(1)
    shared = [rng.randrange(3, 512) for _ in range(100)]
    prompts = random_prompts(rng, 10, shared) + [[1] + [rng.randrange(3, 512) for _ in range(60)] for _ in range(6)]
    with Engine(tiny_loaded, max_batch=3, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 4, 256)) as engine:
        handles = [engine.submit(Request(p, GREEDY)) for p in prompts]
        results = [h.result() for h in handles]
        stats = engine.stats()
    assert stats.evictions > 0 and stats.cache_rows == 4
    for prompt, result in zip(prompts, results):
        assert_same_greedy(tiny_loaded, prompt, generate_text(tiny_loaded, prompt, GREEDY).tokens, result.tokens)


def test_sixteen_concurrent_streams_each_get_what_they_would_alone(tiny_loaded):
    rng = random.Random(2)
    prompts = [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(5, 80))] for _ in range(16)]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    results: dict[int, list[int]] = {}
    with Engine(tiny_loaded, max_batch=8, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 12, 256)) as engine:
        def client(i: int) -> None:
            results[i] = [e.token_id for e in engine.submit(Request(prompts[i], params)) if e.token_id is not None]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert sorted(results) == list(range(16))
    for i, prompt in enumerate(prompts):
        assert_same_greedy(tiny_loaded, prompt, generate_text(tiny_loaded, prompt, params).tokens, results[i])


def test_cancellation_mid_stream_frees_capacity(tiny_loaded):
    long_run = SamplingParams(max_new_tokens=240, temperature=0)
    with Engine(tiny_loaded, max_batch=1, max_queue=1, max_seq_len=256,
                cache_bytes=small_budget(tiny_loaded, 2, 256)) as engine:
        first = engine.submit(Request([1, 5, 6, 7], long_run))
        stream = iter(first)
        next(stream), next(stream)  # it is running and streaming
        first.cancel()
        rest = list(stream)
        assert rest[-1].finish_reason == "cancelled" and first.completion_tokens < 240
        follower = engine.submit(Request([1, 9, 9, 9], GREEDY))  # admitted into the freed slot
        assert follower.result().finish_reason in ("length", "stop")


def test_overload_fails_fast_when_the_queue_is_full(tiny_loaded):
    long_run = SamplingParams(max_new_tokens=240, temperature=0)
    with Engine(tiny_loaded, max_batch=1, max_queue=1, max_seq_len=256,
                cache_bytes=small_budget(tiny_loaded, 2, 256)) as engine:
        running = engine.submit(Request([1, 5, 6, 7], long_run))
        next(iter(running))  # occupies the only slot
        queued = engine.submit(Request([1, 8], GREEDY))
        with pytest.raises(EngineOverloaded, match="overloaded"):
            engine.submit(Request([1, 9], GREEDY))
        running.cancel()
        assert queued.result().finish_reason in ("length", "stop")


def test_a_request_arriving_before_the_free_slot_is_taken_is_not_refused(tiny_loaded):
    """Two submits back to back into one free slot and one queue place: the first is about to run, not
    queued, so the second is accepted whether or not the engine thread has admitted the first yet."""
    long_run = SamplingParams(max_new_tokens=240, temperature=0, ignore_eos=True)
    with Engine(tiny_loaded, max_batch=1, max_queue=1, max_seq_len=256,
                cache_bytes=small_budget(tiny_loaded, 2, 256)) as engine:
        first = engine.submit(Request([1, 5, 6, 7], long_run))
        second = engine.submit(Request([1, 8], long_run))
        with pytest.raises(EngineOverloaded):  # one running (or about to), one waiting: now it is full
            engine.submit(Request([1, 9], GREEDY))
        first.cancel()
        second.cancel()
        assert first.result().finish_reason == second.result().finish_reason == "cancelled"


def test_deadline_and_prompt_errors(tiny_loaded):
    with Engine(tiny_loaded, max_batch=1, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 2, 256)) as engine:
        late = engine.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=240, temperature=0), timeout=0.0))
        assert late.result().finish_reason == "timeout"
        with pytest.raises(PromptTooLongError):
            engine.submit(Request([5] * 300, GREEDY))
    with pytest.raises(QGPTError, match="needs 3"):
        Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 2, 256))


def test_async_iteration_matches_blocking_iteration(tiny_loaded):
    prompt = [1] + list(range(30, 60))
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 3, 256)) as engine:
        blocking = engine.submit(Request(prompt, GREEDY)).result()

        async def consume():
            return [event async for event in engine.submit(Request(prompt, GREEDY))]

        events = asyncio.run(consume())
    assert [e.token_id for e in events] == blocking.tokens
    assert "".join(e.text for e in events) == blocking.text
