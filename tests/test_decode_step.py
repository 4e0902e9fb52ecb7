"""The decode step replayed from captured graphs equals the eager one.

On the CPU the graphs are stood in for by a recorder with a graph's contract (fixed input buffers,
fixed output tensor, replay recomputes from the buffers), which checks everything but CUDA itself:
bucketing, padding rows, static buffers, the cache left clean. On a GPU the same checks run with real
CUDA graphs, plus int8 against bf16 logits.
"""

from __future__ import annotations

import random

import pytest
import torch

import qgpt_code.decode_step as decode_step
from qgpt_code.decode_step import EagerDecode, GraphedDecode, power_of_two_buckets
from qgpt_code.generation import SamplingParams
from qgpt_code.kv_cache import BlockPool, KVCache, blocks_for
from qgpt_code.scheduler import Scheduler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def replaying_recorder(step):
    """A graph's contract without CUDA: the output tensor is fixed; replay recomputes it in place."""
    output = step()

    def replay() -> None:
        output.copy_(step())

    return replay, output


def run_greedy(loaded, prompts, decode_factory, max_new_tokens=40, blocks=None):
    """Greedy tokens per prompt, all prompts running together through one scheduler."""
    args = loaded.model.args
    blocks = blocks or sum(blocks_for(len(p) + max_new_tokens) for p in prompts)
    cache = KVCache(args, blocks, device=loaded.device, dtype=loaded.dtype)
    decode = decode_factory(loaded.model, cache, len(prompts))
    scheduler = Scheduler(loaded.model, loaded.tokenizer, BlockPool(cache), max_batch=len(prompts),
                          max_seq_len=args.max_seq_len, decode=decode)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    seqs = [scheduler.add(p, params) for p in prompts]
    while scheduler.has_work():
        scheduler.step()
    return [s.generated for s in seqs], cache, decode


@pytest.fixture
def small_kv_buckets(monkeypatch):
    """Key-length buckets of 32 so a tiny model's 256-token context spans several (32, 64, 128, 256)."""
    monkeypatch.setattr(decode_step, "KV_BUCKET", 32)


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(n - 1)] for n in lengths]


def test_buckets():
    assert power_of_two_buckets(1, 8) == [1, 2, 4, 8]
    assert power_of_two_buckets(1, 6) == [1, 2, 4, 6]
    assert power_of_two_buckets(1, 1) == [1]
    assert power_of_two_buckets(256, 1000) == [256, 512, 1000]


def test_one_graph_per_batch_and_key_bucket_and_the_cache_left_clean(tiny_loaded, small_kv_buckets):
    args = tiny_loaded.model.args
    cache = KVCache(args, 20)
    decode = GraphedDecode(tiny_loaded.model, cache, max_batch=3, max_seq_len=256, capture=replaying_recorder)
    # Key buckets in blocks of 16 positions: 32, 64, 128 and 256 positions.
    assert sorted(decode.graphs) == [(b, w) for b in (1, 2, 3) for w in (2, 4, 8, 16)]
    assert not cache.k.any() and not cache.v.any()  # warm-up writes are wiped before any request


@pytest.mark.parametrize("lengths", [[5], [5, 70, 33], [200, 3, 17, 100, 9]])
def test_graphed_decode_gives_the_eager_tokens(tiny_loaded, small_kv_buckets, lengths):
    """Batches padded to a bucket (3 -> 4, 5 -> 8), sequences crossing key buckets as they grow."""
    prompts = prompts_of(lengths)
    eager, _, _ = run_greedy(tiny_loaded, prompts, lambda m, c, b: EagerDecode(m, c))
    graphed, _, _ = run_greedy(
        tiny_loaded, prompts, lambda m, c, b: GraphedDecode(m, c, b, 256, capture=replaying_recorder)
    )
    assert graphed == eager


def test_padding_rows_leave_other_blocks_untouched(tiny_loaded, small_kv_buckets):
    """Three sequences in a bucket of four: the padding repeats the third, never writes another block."""
    args = tiny_loaded.model.args
    cache = KVCache(args, 6)
    decode = GraphedDecode(tiny_loaded.model, cache, max_batch=4, max_seq_len=256, capture=replaying_recorder)
    cache.k[:, 4].fill_(7.0)  # a block holding someone's cached prefix
    tables = [[2], [0], [5]]  # any blocks, in any order
    with torch.inference_mode():
        eager_logits = EagerDecode(tiny_loaded.model, cache)([5, 6, 7], [0, 0, 0], tables).clone()
        graphed_logits = decode([5, 6, 7], [0, 0, 0], tables)
    assert graphed_logits.shape == eager_logits.shape == (3, args.vocab_size)
    torch.testing.assert_close(graphed_logits, eager_logits, rtol=0, atol=1e-5)
    assert (cache.k[:, 4] == 7.0).all() and not cache.k[:, [1, 3]].any()


def test_prompt_chunks_through_causal_kernels_equal_the_masked_path(tiny_loaded):
    """The scheduler prefills with `causal_from` (flash attention on a GPU) through a block table
    whose blocks are out of order: same logits as the whole sequence without a cache."""
    model, args = tiny_loaded.model, tiny_loaded.model.args
    tokens = torch.tensor(prompts_of([48], seed=3))
    cache = KVCache(args, 5)
    table = torch.tensor([[3, 0, 4]])  # positions 0-15 in block 3, 16-31 in block 0, 32-47 in block 4
    with torch.inference_mode():
        full = model(tokens, torch.arange(48)[None])
        model(tokens[:, :20], torch.arange(20)[None], cache, tables=table, kv_len=20, causal_from=0)
        rest = model(tokens[:, 20:], torch.arange(20, 48)[None], cache, tables=table, kv_len=48, causal_from=20)
        with pytest.raises(ValueError, match="kv_len"):
            model(tokens[:, 20:], torch.arange(20, 48)[None], cache, tables=table, kv_len=40, causal_from=20)
    torch.testing.assert_close(rest, full[:, 20:], rtol=0, atol=1e-4)
    assert not cache.k[:, [1, 2]].any()  # blocks outside the table untouched


@cuda
@pytest.mark.parametrize("lengths", [[5], [5, 300, 33]])
def test_cuda_graphs_give_the_eager_tokens(tiny_hf, lengths):
    from qgpt_code import load_model

    loaded = load_model(tiny_hf[1], device="cuda", dtype="float32")
    prompts = prompts_of([min(n, 200) for n in lengths])
    eager, _, _ = run_greedy(loaded, prompts, lambda m, c, b: EagerDecode(m, c))
    graphed, _, decode = run_greedy(loaded, prompts, lambda m, c, b: decode_step.make_decode(m, c, b, 256))
    assert isinstance(decode, GraphedDecode)
    assert graphed == eager


@cuda
def test_int8_logits_are_close_to_bf16_on_cuda(tiny_hf):
    """Prompt-sized products run eagerly, decode-sized ones through the kernel prepared for them: both near bf16."""
    import qgpt_code.quantize as quantize
    from qgpt_code import load_model

    loaded = load_model(tiny_hf[1], device="cuda", dtype="bfloat16")
    tokens = torch.tensor(prompts_of([24]), device="cuda")  # (1, 24)
    positions = torch.arange(24, device="cuda")[None]
    one, at = tokens[:, :1], positions[:, :1]  # a decode-sized input: one token
    with torch.inference_mode():
        reference, reference_one = loaded.model(tokens, positions), loaded.model(one, at)
        quantize.quantize_int8(loaded.model)
        prompt, eager_one = loaded.model(tokens, positions), loaded.model(one, at)  # no kernels yet: plain product
        quantize.prepare_decode_kernels(loaded.model, [1])
        fused_one = loaded.model(one, at)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(prompt.flatten(), reference.flatten(), dim=0) > 0.99
    assert (prompt.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    assert cosine(fused_one.flatten(), reference_one.flatten(), dim=0) > 0.99
    torch.testing.assert_close(fused_one, eager_one, rtol=0.02, atol=0.02)


def fresh_model(tiny_hf, device="cpu", dtype="float32"):
    from qgpt_code import load_model

    return load_model(tiny_hf[1], device=device, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_decode_runtime_belongs_to_the_model_and_is_reused(tiny_hf, device):
    """generate() builds the cache and decode step (graphs, on a GPU) once; later calls that fit and
    an Engine that fits reuse them; a call that needs more replaces them; one in use is never shared."""
    from qgpt_code.engine import Engine, Request
    from qgpt_code.generation import generate, generate_batch, generate_text

    loaded = fresh_model(tiny_hf, device)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    first = generate_text(loaded, [1, 5, 6], params)
    runtime = loaded.model.decode_runtime
    assert not runtime.in_use and (device == "cpu" or isinstance(runtime.decode, GraphedDecode))
    assert generate_text(loaded, [1, 5, 6], params).tokens == first.tokens
    longer = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    generate_batch(loaded, [[1, 5, 6], [1, 7]], longer)  # two rows, 64 positions: the first does not cover it
    runtime = loaded.model.decode_runtime
    assert (runtime.max_batch, runtime.max_seq_len, runtime.cache.n_blocks) == (2, 64, 8)
    generate_text(loaded, [1, 9], params)
    assert loaded.model.decode_runtime is runtime
    block_bytes = 2 * runtime.cache.k.nbytes // runtime.cache.n_blocks  # keys and values
    with Engine(loaded, max_batch=2, max_seq_len=32, cache_bytes=4 * block_bytes) as engine:
        assert engine.runtime is not runtime  # the engine's pool is what its plan says: 4 blocks, not 8
    runtime = loaded.model.decode_runtime  # the engine's, handed to the model when it closed
    assert runtime.cache.n_blocks == 4
    with Engine(loaded, max_batch=2, max_seq_len=32, cache_bytes=4 * block_bytes) as engine:
        assert engine.runtime is runtime and runtime.in_use
        assert engine.submit(Request([1, 5, 6], params)).result().tokens == first.tokens
        inside = generate_text(loaded, [1, 5, 6], params)  # the engine holds it: this call gets its own
        assert inside.tokens == first.tokens and loaded.model.decode_runtime is runtime
    assert not runtime.in_use
    steps = generate(loaded.model, loaded.tokenizer, [[1, 5, 6]], params)
    next(steps)
    assert runtime.in_use
    steps.close()  # a generation abandoned halfway gives it back
    assert not runtime.in_use
