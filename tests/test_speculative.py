"""Speculative decoding (n-gram guesses verified as extra decode rows): the proposer, and the engine's
output with speculation against the same engine without it.

Greedy output must be the same tokens (up to the documented float tolerance of a different batch
shape, see test_engine.py); seeded sampling draws each step's random number from (seed, step), so a
speculative run must give the very tokens a plain run gives; unseeded sampling is checked in
distribution.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from test_engine import assert_same_greedy, small_budget

from qgpt_code.engine import Engine, Request
from qgpt_code.generation import SamplingParams
from qgpt_code.kv_cache import BLOCK_SIZE
from qgpt_code.speculative import NgramIndex, RowCost, Speculation, accepted_prefix, best_guess_length


def index_of(tokens: list[int]) -> NgramIndex:
    index = NgramIndex()
    index.extend(tokens)
    return index


def test_the_longest_suffix_match_is_followed_from_its_latest_occurrence():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # suffix (2, 3) last occurred at 5..6, followed by 7, 8, 5, 2
    assert index_of(tokens).propose(4) == [7, 8, 5, 2]
    # a longer suffix wins over a more recent shorter one: (9, 4, 5) occurred once, followed by 6
    assert index_of([9, 4, 5, 6, 1, 4, 5, 2, 9, 4, 5]).propose(2) == [6, 1]
    assert index_of([1, 2, 3, 4]).propose(3) == []  # nothing repeats
    assert index_of([5, 5]).propose(3) == []  # one-token matches are not used
    assert index_of([5, 5, 5]).propose(3) == [5]  # (5, 5) ended at 1, followed by the last 5


def test_guess_length_weighs_acceptance_against_row_cost():
    # free rows: guess as far as allowed whenever a guess may hold
    assert best_guess_length(0.3, 0.0, 8) == 8
    # a row costs a third of a step: long guesses only when they usually hold
    assert best_guess_length(0.95, 0.33, 8) >= 6
    assert 1 <= best_guess_length(0.6, 0.33, 8) <= 3
    assert best_guess_length(0.2, 0.33, 8) == 0
    # a row costs a whole step (compute-bound): never worth it
    assert best_guess_length(0.9, 1.0, 8) == 0


def test_acceptance_estimate_follows_outcomes_and_recovers_when_idle():
    state = Speculation()
    for _ in range(6):
        state.record(4, 4)  # everything held
    high = state.acceptance
    assert high > 0.9
    for _ in range(6):
        state.record(4, 0)  # nothing held
    assert state.acceptance < 0.3
    low = state.acceptance
    state.index.extend([1, 2, 3, 1, 2])
    assert state.propose(8, row_cost=0.33) == []  # not worth a row now ...
    assert state.acceptance > low  # ... but the estimate drifts back, to try again later
    assert (state.proposed, state.accepted) == (48, 24)


def test_row_cost_is_fitted_from_step_times():
    cost = RowCost()
    assert cost.fraction == cost.prior
    for _ in range(3):
        for rows in (1, 2, 4, 8):
            cost.observe(rows, 0.030 + 0.010 * rows)  # 30 ms to read the weights, 10 ms a row
    assert cost.fraction == pytest.approx(0.010 / 0.040, rel=1e-3)
    cost.observe(1, 0.8)  # a step slowed down twentyfold by another process
    cost.observe(8, 0.001)
    assert cost.fraction == pytest.approx(0.010 / 0.040, rel=1e-3)


def test_accepted_prefix_stops_at_the_first_difference():
    assert accepted_prefix([4, 5, 6], [4, 5, 9, 1]) == 2
    assert accepted_prefix([4, 5], [4, 5, 7]) == 2
    assert accepted_prefix([4], [3, 4]) == 0


def repetitive_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Prompts that repeat spans of themselves (as code and edits do), of lengths across block boundaries."""
    prompts = []
    for _ in range(n):
        base = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 20))]
        prompt = [1]
        while len(prompt) < rng.randrange(BLOCK_SIZE, 5 * BLOCK_SIZE):
            prompt += base[: rng.randrange(3, len(base) + 1)]
        prompts.append(prompt)
    return prompts


def run(loaded, prompts, params, speculate: bool, concurrent: bool, rows: int = 6, max_batch: int = 8, **engine_args):
    with Engine(loaded, max_batch=max_batch, max_queue=512, max_seq_len=256, cache_bytes=small_budget(loaded, rows, 256),
                speculate=speculate, **engine_args) as engine:
        if concurrent:
            handles = [engine.submit(Request(p, params)) for p in prompts]
            results = [h.result() for h in handles]
        else:
            handles, results = [], []
            for p in prompts:
                handles.append(engine.submit(Request(p, params)))
                results.append(handles[-1].result())
        return results, engine.stats(), handles


@pytest.mark.parametrize("concurrent", [False, True])
def test_greedy_output_is_the_same_with_speculation(tiny_loaded, concurrent):
    prompts = repetitive_prompts(random.Random(5), 6)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    plain, _, _ = run(tiny_loaded, prompts, params, speculate=False, concurrent=concurrent)
    guessed, stats, handles = run(tiny_loaded, prompts, params, speculate=True, concurrent=concurrent)
    for prompt, expected, got in zip(prompts, plain, guessed):
        assert_same_greedy(tiny_loaded, prompt, expected.tokens, got.tokens)
        assert got.finish_reason == expected.finish_reason or got.tokens != expected.tokens
    assert stats.tokens_accepted > 0 and stats.tokens_proposed >= stats.tokens_accepted
    assert sum(h.tokens_accepted for h in handles) == stats.tokens_accepted
    # every step made at least one token: fewer decode rows were run than tokens were generated
    generated = sum(len(r.tokens) for r in guessed)
    assert stats.tokens_computed < sum(len(p) for p in prompts) + generated


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """A tiny model whose output layer is scaled up: its distributions are sharp enough that sampled
    text repeats itself (so guesses are proposed and often, not always, confirmed) yet still random."""
    import torch
    from builders import hf_llama, train_sentencepiece, write_hf_dir

    from qgpt_code import load_model

    model = hf_llama({}, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    directory = write_hf_dir(model, tmp_path_factory.mktemp("peaky"), train_sentencepiece())
    return load_model(directory, device="cpu", dtype="float32")


def echo_prompt(loaded) -> list[int]:
    """A prompt that holds, earlier on, what the model tends to sample right after it."""
    from qgpt_code.generation import generate_text

    base = [1] + [7, 8, 9, 10] * 4
    base += generate_text(loaded, base, SamplingParams(max_new_tokens=16, temperature=0)).tokens
    after = [r.tokens for r in run(loaded, [base] * 16, SamplingParams(max_new_tokens=4, temperature=1.0, seed=0),
                                   speculate=False, concurrent=True)[0]]
    likeliest = Counter(tuple(t) for t in after).most_common(1)[0][0]
    return base + list(likeliest) + [3] + base


def chi_square_differs(a: Counter, b: Counter) -> bool:
    """Two equal-size samples of outcomes drawn from different distributions (chi-square homogeneity
    test at the 0.1% level; outcomes seen fewer than 10 times in all are lumped together)."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rest_a, rest_b = sum(a.values()) - sum(a[k] for k in keys), sum(b.values()) - sum(b[k] for k in keys)
    cells = [(a[k], b[k]) for k in keys] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
    statistic = sum((x - y) ** 2 / (x + y) for x, y in cells)
    df = len(cells) - 1
    z = 3.09  # the 99.9% quantile of a standard normal: Wilson-Hilferty's approximation of chi-square's
    return statistic > df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_seeded_sampling_gives_the_same_tokens_with_speculation(peaky):
    prompt = echo_prompt(peaky)
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=seed) for seed in range(24)]
    outputs, accepted = {}, 0
    for speculate in (False, True):
        with Engine(peaky, max_batch=8, max_seq_len=256, cache_bytes=small_budget(peaky, 10, 256),
                    eager=True, speculate=speculate) as engine:
            handles = [engine.submit(Request(prompt, p)) for p in params]
            outputs[speculate] = [h.result().tokens for h in handles]
            accepted += engine.stats().tokens_accepted
    assert outputs[True] == outputs[False]
    assert accepted > 0


def test_unseeded_sampling_keeps_the_models_distribution(peaky):
    prompt = echo_prompt(peaky)
    draws = 400
    samples, stats = {}, {}
    for name, speculate, temperature in (("plain", False, 1.0), ("speculative", True, 1.0), ("colder", False, 0.7)):
        params = SamplingParams(max_new_tokens=4, temperature=temperature)
        results, stats[name], _ = run(peaky, [prompt] * draws, params, speculate=speculate, concurrent=True, rows=10)
        samples[name] = Counter(tuple(r.tokens) for r in results)
    proposed, accepted = stats["speculative"].tokens_proposed, stats["speculative"].tokens_accepted
    assert 0 < accepted < proposed  # guesses were made, and the model turned some of them down
    assert not chi_square_differs(samples["plain"], samples["speculative"])
    assert chi_square_differs(samples["plain"], samples["colder"])  # the test can tell distributions apart


def test_speculation_under_eviction_and_preemption_keeps_every_output(tiny_loaded):
    prompts = repetitive_prompts(random.Random(11), 8)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    plain, _, _ = run(tiny_loaded, prompts, params, speculate=False, concurrent=False, rows=8)
    guessed, stats, _ = run(tiny_loaded, prompts, params, speculate=True, concurrent=True, rows=2, max_batch=4)
    assert stats.evictions > 0 or stats.preemptions > 0
    for prompt, expected, got in zip(prompts, plain, guessed):
        assert_same_greedy(tiny_loaded, prompt, expected.tokens, got.tokens)
    assert stats.blocks_used == 0  # every block given back, guesses' blocks included


def test_the_fused_cpu_step_decodes_consecutive_rows_of_one_sequence(tiny_loaded):
    """Guessed tokens travel as rows of one sequence at consecutive positions: each row must see the
    keys and values the rows before it wrote in the same step (the fused kernel writes them all first;
    enough keys are read here that its attention runs in parallel)."""
    import torch

    from qgpt_code.cpu_decode import NativeCpuDecode
    from qgpt_code.decode_step import EagerDecode
    from qgpt_code.kv_cache import BlockPool, BlockTable, KVCache
    from qgpt_code.native import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no C compiler: the fused step is not built")
    model = tiny_loaded.model
    logits = {}
    for name in ("eager", "fused"):
        cache = KVCache(model.args, 32, BLOCK_SIZE, torch.device("cpu"), torch.float32)
        pool, table = BlockPool(cache), BlockTable()
        pool.reserve(table, 240)
        prompt = torch.arange(3, 203)[None] % 500
        with torch.no_grad():
            model(prompt, torch.arange(200)[None], cache, tables=torch.tensor([table.blocks]), kv_len=200,
                  last_index=torch.tensor([199]), causal_from=0)
            step = EagerDecode(model, cache) if name == "eager" else NativeCpuDecode(model, cache, kernels, 256)
            rows = 8  # 8 rows reading ~200 keys each: the parallel attention path
            logits[name] = step([11, 12, 13, 14, 15, 16, 17, 18], list(range(200, 200 + rows)), [table.blocks] * rows)
    torch.testing.assert_close(logits["fused"], logits["eager"], atol=1e-4, rtol=1e-4)


def test_the_server_reports_guesses_per_request_and_in_metrics(tiny_loaded):
    import httpx
    from test_server_support import RunningServer

    from qgpt_code.server.settings import ServerSettings

    engine = Engine(tiny_loaded, max_batch=8, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 4, 256),
                    speculate=True)
    server = RunningServer(engine, ServerSettings(model_id="tiny"))
    try:
        prompt = repetitive_prompts(random.Random(5), 1)[0]
        body = {"input_prefix": tiny_loaded.tokenizer.decode(prompt), "input_suffix": "", "n_predict": 40,
                "temperature": 0, "ignore_eos": True, "response_fields": ["timings/draft_n", "timings/draft_n_accepted"]}
        answer = httpx.post(f"{server.url}/infill", json=body, timeout=60).json()
        stats = engine.stats()
        assert stats.tokens_accepted > 0
        assert answer == {"timings/draft_n": stats.tokens_proposed, "timings/draft_n_accepted": stats.tokens_accepted}
        assert server.metric("qgpt_speculative_tokens_proposed_total") == stats.tokens_proposed
        assert server.metric("qgpt_speculative_tokens_accepted_total") == stats.tokens_accepted
    finally:
        server.close()


def test_generate_speculates_with_rows_to_spare_for_one_prompt(tiny_loaded):
    from qgpt_code.generation import generate

    prompt = repetitive_prompts(random.Random(3), 1)[0]
    params = SamplingParams(max_new_tokens=48, temperature=0)
    outputs = {}
    for speculate in (False, True):
        tokens = []
        steps = 0
        for events in generate(tiny_loaded.model, tiny_loaded.tokenizer, [prompt], params, speculate=speculate):
            steps += 1
            tokens += [event.token_id for _, event in events if event.token_id is not None]
        outputs[speculate] = (tokens, steps)
    assert_same_greedy(tiny_loaded, prompt, outputs[False][0], outputs[True][0])
    assert outputs[True][1] < outputs[False][1]  # fewer steps for the same tokens: guesses held


def test_guessing_switched_off_by_dear_rows_is_tried_again_now_and_then(tiny_loaded):
    from qgpt_code.scheduler import EXPLORE_EVERY

    prompt = repetitive_prompts(random.Random(5), 1)[0]
    with Engine(tiny_loaded, max_batch=8, max_seq_len=256, cache_bytes=small_budget(tiny_loaded, 4, 256),
                speculate=True) as engine:
        for _ in range(3):  # as measured on a busy machine: a row costs a whole step
            engine.scheduler.row_cost.observe(1, 0.010)
            engine.scheduler.row_cost.observe(8, 0.080)
        assert engine.scheduler.row_cost.fraction == pytest.approx(1.0)
        engine.submit(Request(prompt, SamplingParams(max_new_tokens=2 * EXPLORE_EVERY + 8, temperature=0,
                                                     ignore_eos=True))).result()
        stats = engine.stats()
    assert 0 < stats.tokens_proposed
