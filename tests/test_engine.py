"""The serving engine: prefix reuse over the paged cache, eviction, preemption, concurrency,
cancellation, overload, deadlines.

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
    """Bytes for `rows` sequences of max_seq_len tokens (the pool holds that many tokens, in blocks)."""
    return rows * max_seq_len * KVCache.bytes_per_token(loaded.model.args, loaded.dtype)


def assert_pool_idle_and_consistent(engine) -> None:
    """No request runs: every block is free or cached, none referenced, and the index agrees."""
    stats, pool = engine.stats(), engine.pool
    assert stats.running == 0 and stats.blocks_used == stats.blocks_shared == 0
    assert stats.blocks_free + stats.blocks_cached == stats.blocks_total
    assert all(b.refs == 0 for b in pool.blocks)
    cached = {i for i, b in enumerate(pool.blocks) if b.cached}
    assert cached == set(pool.evictable) and not cached & set(pool.free)
    assert set(pool.index.values()) <= cached
    for i in cached:  # every cached block hangs off a cached parent (or the root), which lists it
        parent = pool.blocks[i].parent
        assert i in (pool.root_children if parent < 0 else pool.blocks[parent].children)


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
    assert_pool_idle_and_consistent(engine)


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
    assert stats.evictions > 0 and stats.blocks_total == 4 * 256 // BLOCK_SIZE
    for prompt, result in zip(prompts, results):
        assert_same_greedy(tiny_loaded, prompt, generate_text(tiny_loaded, prompt, GREEDY).tokens, result.tokens)
    assert_pool_idle_and_consistent(engine)


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


def test_a_small_pool_starts_and_caps_one_sequence_at_what_it_holds(tiny_loaded):
    """max_seq_len reserves nothing: any budget of a few blocks starts, whatever max_batch says."""
    budget = 5 * BLOCK_SIZE * KVCache.bytes_per_token(tiny_loaded.model.args, tiny_loaded.dtype)
    with Engine(tiny_loaded, max_batch=8, max_seq_len=256, cache_bytes=budget) as engine:
        assert engine.max_seq_len == 5 * BLOCK_SIZE
        assert "80 tokens in 5 blocks of 16" in engine.describe_cache()
        with pytest.raises(PromptTooLongError):
            engine.submit(Request([5] * 80, GREEDY))
        done = engine.submit(Request([1] + [5] * 60, SamplingParams(max_new_tokens=40, temperature=0))).result()
        assert done.finish_reason in ("length", "stop") and len(done.tokens) <= 19
    with pytest.raises(QGPTError, match="at least 4 are needed"):
        Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=budget * 3 // 5)
    for bad in (dict(max_batch=0), dict(max_queue=-1), dict(prefill_budget=0)):
        with pytest.raises(QGPTError, match="must be at least"):
            Engine(tiny_loaded, cache_bytes=budget, **bad)


def test_async_iteration_matches_blocking_iteration(tiny_loaded):
    prompt = [1] + list(range(30, 60))
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 3, 256)) as engine:
        blocking = engine.submit(Request(prompt, GREEDY)).result()

        async def consume():
            return [event async for event in engine.submit(Request(prompt, GREEDY))]

        events = asyncio.run(consume())
    assert [e.token_id for e in events] == blocking.tokens
    assert "".join(e.text for e in events) == blocking.text


def test_preemption_under_a_pool_too_small_for_the_batch_keeps_every_output(tiny_loaded):
    """Eight sequences of up to 150 tokens in a 192-token pool: sequences are preempted (their blocks
    freed, recomputed later) and cached blocks evicted, and each output is what it would be alone."""
    rng = random.Random(5)
    shared = [rng.randrange(3, 512) for _ in range(60)]
    prompts = random_prompts(rng, 8, shared)
    params = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    with Engine(tiny_loaded, max_batch=4, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 3, 64)) as engine:
        handles = [engine.submit(Request(p, params)) for p in prompts]
        results = [h.result() for h in handles]
        stats = engine.stats()
        assert_pool_idle_and_consistent(engine)
    assert stats.preemptions > 0 and stats.evictions > 0
    for prompt, result in zip(prompts, results):
        assert result.finish_reason == "length" and len(result.tokens) == 60
        assert_same_greedy(tiny_loaded, prompt, generate_text(tiny_loaded, prompt, params).tokens, result.tokens)


def test_a_chat_turn_is_not_clobbered_by_another_user_sharing_only_the_system_prompt(tiny_loaded):
    """User A's turn (a 65-token system prompt and 150 tokens of their own), then user B's with the
    same system prompt, then A's next turn: it reuses A's whole first turn, not just the system prompt."""
    rng = random.Random(6)
    system = [1] + [rng.randrange(3, 512) for _ in range(64)]
    turn_a = system + [rng.randrange(3, 512) for _ in range(150)]
    turn_b = system + [rng.randrange(3, 512) for _ in range(150)]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 4, 256)) as engine:
        answer_a = engine.submit(Request(turn_a, params)).result()
        engine.submit(Request(turn_b, params)).result()
        next_a = engine.submit(Request(turn_a + answer_a.tokens + [7, 8], params))
        next_a.result()
    assert len(turn_a) == 215
    assert next_a.cached_tokens >= 0.95 * len(turn_a)
    assert next_a.cached_tokens == len(turn_a) + len(answer_a.tokens) - 1  # all but the unfed last token


def test_eight_concurrent_identical_prompts_compute_it_once(tiny_loaded):
    """Eight editors sending the same file at once: the first computes the prompt, the others wait for
    its blocks and share them; each still gets its own first token (from its own last prompt token)."""
    rng = random.Random(7)
    prompt = [1] + [rng.randrange(3, 512) for _ in range(199)]
    params = SamplingParams(max_new_tokens=1, temperature=0)
    with Engine(tiny_loaded, max_batch=8, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 4, 256)) as engine:
        handles = [engine.submit(Request(prompt, params)) for _ in range(8)]
        results = [h.result() for h in handles]
        stats = engine.stats()
        assert_pool_idle_and_consistent(engine)
    assert stats.tokens_computed <= 1.1 * len(prompt)
    assert len({tuple(r.tokens) for r in results}) == 1
    assert sorted(h.cached_tokens for h in handles) == [0] + [len(prompt) - 1] * 7
    assert stats.tokens_reused == 7 * (len(prompt) - 1) and stats.prompt_tokens == 8 * len(prompt)
    assert_same_greedy(tiny_loaded, prompt, generate_text(tiny_loaded, prompt, params).tokens, results[0].tokens)


def test_running_sequences_share_their_common_blocks(tiny_loaded):
    """While eight sequences with one 100-token prompt generate, the prompt's full blocks are held once,
    shared by all eight; the pool holds far less than eight copies."""
    prompt = [1] + list(range(100, 199))
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
    with Engine(tiny_loaded, max_batch=8, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 8, 256)) as engine:
        handles = [engine.submit(Request(prompt, params)) for _ in range(8)]
        streams = [iter(h) for h in handles]
        for stream in streams:
            next(stream)  # every one has its first token: all are running
        stats = engine.stats()
        for h in handles:
            h.cancel()
        for stream in streams:
            list(stream)
    full_blocks = (len(prompt) - 1) // BLOCK_SIZE
    assert stats.blocks_shared >= full_blocks
    assert stats.blocks_used <= full_blocks + 8 * 3  # each sequence's own: a copied partial block and its growth
