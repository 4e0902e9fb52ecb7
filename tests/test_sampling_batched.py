"""Batched sampling against a per-row reference, seeds, padded vocabularies and rows that go wrong.

`reference_choice` is Meta's `sample_top_p` written for one row (HF's top-k first), with the row's
uniform draw standing in for `torch.multinomial`: the production code (`sampling.choose`) must pick
exactly the same token for every row of a mixed batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from qgpt_code.generation import SamplingParams, generate_batch, generate_text
from qgpt_code.kv_cache import BlockPool, KVCache
from qgpt_code.sampling import MIN_TEMPERATURE, RowSettings, choose, seeded_uniform
from qgpt_code.scheduler import Scheduler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference_choice(row: torch.Tensor, s: RowSettings, vocab_size: int | None = None) -> int:
    """One row (V,) of logits -> the token, computed row by row the way Meta's generation.py does."""
    logits = row.float().clone()
    if vocab_size is not None:
        logits[vocab_size:] = float("-inf")
    if s.temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, descending=True, stable=True)
    if 0 < s.top_k < len(probs_sort):
        probs_sort[s.top_k :] = 0.0
        probs_sort = probs_sort / probs_sort.sum()
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > s.top_p] = 0.0
    probs_sort = probs_sort / probs_sort.sum()
    # torch.multinomial with the row's draw: the first token whose cumulative probability exceeds it
    index = torch.searchsorted(torch.cumsum(probs_sort, dim=-1), torch.tensor([s.uniform]), right=True)
    return int(probs_idx[index.clamp(max=len(probs_sort) - 1)])


def mixed_settings(n: int, step: int, rng: random.Random) -> list[RowSettings]:
    """Greedy rows, plain temperature, top-p, top-k and both, each with a seeded draw."""
    kinds = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_p=0.9),
             dict(temperature=0.6, top_k=5), dict(temperature=1.3, top_p=0.5, top_k=40), dict(temperature=2.0, top_p=0.95)]
    return [RowSettings(**kinds[i % len(kinds)], uniform=seeded_uniform(rng.randrange(1 << 40), step)) for i in range(n)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_batched_choice_equals_the_per_row_reference(device):
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    for step in range(25):
        logits = torch.randn(12, 300, generator=generator) * 3  # (B, V)
        settings = mixed_settings(12, step, rng)
        got = [row[0] for row in choose(logits.to(device), settings, vocab_size=290).fetch()]
        assert got == [reference_choice(row, s, 290) for row, s in zip(logits, settings)]


def test_seeded_draws_follow_the_distribution():
    """4,000 seeds on one row: each kept token's frequency within 4.5 standard deviations of its
    probability after the top-p cut, and the cut token never drawn."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n, p = 4000, 0.85  # mass before token 4 is 0.9 > 0.85: tokens 4 and 5 are cut
    settings = [RowSettings(1.0, top_p=p, uniform=seeded_uniform(seed, 0)) for seed in range(n)]
    tokens = torch.tensor([row[0] for row in choose(probs.log().expand(n, -1), settings).fetch()])
    counts = torch.bincount(tokens, minlength=6).float()
    expected = torch.cat([probs[:4] / probs[:4].sum(), torch.zeros(2)])
    spread = (n * expected * (1 - expected)).sqrt()
    assert (counts[4:] == 0).all()
    assert ((counts - n * expected).abs() <= 4.5 * spread + 1e-6).all(), counts


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch(tiny_loaded):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    other = [1, 40, 41, 42, 43]
    alone = generate_text(tiny_loaded, [1, 5, 6, 7], params)
    together = generate_batch(tiny_loaded, [other, [1, 5, 6, 7], other[:3]], params)[1]
    assert together.tokens == alone.tokens and len(alone.tokens) == 16


def test_mixed_greedy_and_sampled_rows_in_one_batch(tiny_loaded):
    """A greedy request gives the same tokens whatever sampled requests share its batch."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, seed=3, ignore_eos=True)
    alone = generate_text(tiny_loaded, [1, 9, 8, 7], greedy).tokens
    sched, seqs = scheduler_of(tiny_loaded, [([1, 9, 8, 7], greedy), ([1, 2, 3], sampled), ([1, 70], greedy)])
    run(sched)
    assert seqs[0].generated == alone and seqs[2].generated == generate_text(tiny_loaded, [1, 70], greedy).tokens
    assert seqs[1].generated == generate_text(tiny_loaded, [1, 2, 3], sampled).tokens


def scheduler_of(loaded, requests, decode=None):
    cache = KVCache(loaded.model.args, 40, device=loaded.device)
    tokenizer = loaded.tokenizer
    sched = Scheduler(loaded.model, tokenizer, BlockPool(cache), max_batch=len(requests), max_seq_len=256,
                      decode=decode)
    return sched, [sched.add(prompt, params) for prompt, params in requests]


def run(sched):
    events = []
    while sched.has_work():
        events += sched.step()
    return events


DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture(params=DEVICES)
def padded_model(tiny_hf, request):
    """The tiny model with its vocabulary padded from 512 to 576 rows, the padding rows' output
    weights made huge so that, unmasked, they would win every greedy choice (on a GPU: through graphs)."""
    from qgpt_code import load_model
    from qgpt_code.model import Transformer

    loaded = load_model(tiny_hf[1], device="cpu", dtype="float32")
    old = loaded.model
    padded = Transformer(old.args.replace(vocab_size=576))
    state = old.state_dict()
    extra = torch.randn(64, old.args.dim, generator=torch.Generator().manual_seed(1))
    state["tok_embeddings.weight"] = torch.cat([state["tok_embeddings.weight"], extra])
    state["output.weight"] = torch.cat([state["output.weight"], extra * 100])
    padded.load_state_dict(state)
    loaded.model = padded.eval().requires_grad_(False).to(request.param)
    return loaded


def test_a_padded_vocabulary_never_emits_an_id_beyond_the_tokenizer(padded_model):
    assert padded_model.tokenizer.vocab_size == 512
    device = padded_model.device
    with torch.inference_mode():  # unmasked, the padding would win: this test can fail
        raw = padded_model.model(torch.tensor([[1, 5, 6]], device=device), torch.arange(3, device=device)[None])
    assert raw[0, -1].argmax() >= 512
    for params in (SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True),
                   SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1.0, seed=2, ignore_eos=True)):
        completions = generate_batch(padded_model, [[1, 5, 6], [1, 30]], params)
        assert all(c.finish_reason == "length" and max(c.tokens) < 512 for c in completions)


@pytest.mark.parametrize("device", DEVICES)
def test_one_bad_row_never_fails_its_neighbours(tiny_hf, monkeypatch, device):
    """Row logits holding NaN, and a row whose sampling raises: those sequences end with an error,
    the others run to the end with the tokens they get alone."""
    import qgpt_code.scheduler as scheduler_module
    from qgpt_code import load_model
    from qgpt_code.decode_step import EagerDecode

    tiny_loaded = load_model(tiny_hf[1], device=device, dtype="float32")

    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    cursed = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=13, ignore_eos=True)
    cache_holder = {}

    def poisoning_decode(tokens, positions, tables):  # the second sequence's rows turn NaN
        logits = cache_holder["eager"](tokens, positions, tables).clone()
        for i, table in enumerate(tables):
            if table == cache_holder["poisoned"]:
                logits[i, 7] = float("nan")
        return logits

    real_choose = scheduler_module.choose

    def fragile_choose(logits, settings, *args, **kwargs):  # fails whenever a top_k=13 row is in the batch
        if any(s.top_k == 13 for s in settings):
            raise RuntimeError("sampling kernel failed")
        return real_choose(logits, settings, *args, **kwargs)

    monkeypatch.setattr(scheduler_module, "choose", fragile_choose)
    prompts = [[1, 9, 8, 7], [1, 2, 3], [1, 70], [1, 44, 45]]
    sched, seqs = scheduler_of(tiny_loaded, [(prompts[0], greedy), (prompts[1], greedy), (prompts[2], cursed),
                                             (prompts[3], greedy)], decode=poisoning_decode)
    cache_holder["eager"] = EagerDecode(tiny_loaded.model, sched.pool.cache)
    sched.step()  # prefill: all four sampled their first token together (the cursed one failed alone)
    cache_holder["poisoned"] = seqs[1].table.blocks
    run(sched)
    assert [s.finish_reason for s in seqs] == ["length", "error", "error", "length"]
    assert "NaN" in seqs[1].error and "sampling kernel failed" in seqs[2].error
    for i in (0, 3):
        assert seqs[i].generated == generate_text(tiny_loaded, prompts[i], greedy).tokens
