"""Our model against transformers' LlamaForCausalLM on the same weights (fp32, CPU; and on a GPU when there is one)."""

from __future__ import annotations

import pytest
import torch
from builders import hf_llama, meta_params, write_hf_dir, write_meta_dir

from qgpt_code import load_model
from qgpt_code.generation import SamplingParams, generate_batch, generate_text
from qgpt_code.kv_cache import KVCache
from qgpt_code.model import checkpoint_tensors

TOLERANCE = 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {
    "gqa-untied": {},
    "mha-tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "gqa-tied-theta1e6": {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_theta": 1e6},
    "mqa-wide-heads": {"num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3},
}


def positions_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand_as(tokens)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint_pair(request, tmp_path_factory, sp_proto):
    """(transformers model, our model loaded from HF safetensors, ours from 2 Meta shards)."""
    hf = hf_llama(CONFIGS[request.param], seed=len(request.param))
    root = tmp_path_factory.mktemp(request.param)
    ours_hf = load_model(write_hf_dir(hf, root / "hf", sp_proto), device="cpu", dtype="float32")
    state = checkpoint_tensors(ours_hf.model)
    if ours_hf.info.args.tie_embeddings:  # Meta checkpoints always carry their own output weight
        state["output.weight"] = state["tok_embeddings.weight"]
    params = {**meta_params(ours_hf.info.args), "multiple_of": 32}
    ours_meta = load_model(write_meta_dir(state, params, root / "meta", sp_proto, n_shards=2), device="cpu",
                           dtype="float32")
    return hf, ours_hf, ours_meta


def test_logits_match_transformers_from_hf_and_from_two_meta_shards(checkpoint_pair):
    hf, ours_hf, ours_meta = checkpoint_pair
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits
        for ours in (ours_hf, ours_meta):
            logits = ours.model(tokens, positions_for(tokens))
            assert (logits - reference).abs().max().item() <= TOLERANCE


def test_meta_shards_merge_back_to_the_same_weights(checkpoint_pair):
    _, ours_hf, ours_meta = checkpoint_pair
    a, b = ours_hf.model.state_dict(), ours_meta.model.state_dict()
    assert set(a) <= set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_incremental_decoding_with_kv_cache_equals_full_forward(checkpoint_pair):
    _, ours, _ = checkpoint_pair
    model = ours.model
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, positions_for(tokens))
        cache = KVCache(model.args, n_blocks=4, block_size=16)
        tables = torch.tensor([[2, 0], [1, 3]])  # each row's 32 positions in two blocks, out of order
        steps = [model(tokens[:, :10], positions_for(tokens[:, :10]), cache, tables)]  # prefill 10
        for t in range(10, 24):  # then one token at a time
            steps.append(model(tokens[:, t : t + 1], torch.full((2, 1), t), cache, tables))
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOLERANCE


def test_batch_rows_at_different_positions(checkpoint_pair):
    """Row 0 decodes at position 17 while row 1 decodes at position 5, in one forward pass."""
    _, ours, _ = checkpoint_pair
    model = ours.model
    seqs = [torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(n)) for n in (18, 6)]
    with torch.no_grad():
        alone = [model(s, positions_for(s))[0, -1] for s in seqs]
        cache = KVCache(model.args, n_blocks=3, block_size=16)
        tables = torch.tensor([[2, 0], [1, 1]])  # row 1 needs one block; its padding is never attended
        for row, s in enumerate(seqs):  # prefill each row into its own blocks
            model(s[:, :-1], positions_for(s[:, :-1]), cache, tables[row : row + 1])
        last = torch.cat([s[:, -1:] for s in seqs])  # (2, 1)
        together = model(last, torch.tensor([[17], [5]]), cache, tables)[:, -1]
    for row in range(2):
        assert (together[row] - alone[row]).abs().max().item() <= TOLERANCE


def test_greedy_generation_equals_transformers_generate(checkpoint_pair, sp_tokenizer):
    hf, ours, _ = checkpoint_pair
    for text in ("def fibonacci(n):\n    ", "import os\nclass Config:", "x = [1, 2, 3]"):
        prompt = sp_tokenizer.encode(text, bos=True)
        with torch.no_grad():
            reference = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        if sp_tokenizer.eos_id in reference:  # we stop at EOS (and include it); transformers was told not to
            reference = reference[: reference.index(sp_tokenizer.eos_id) + 1]
        ours_tokens = generate_text(ours, prompt, SamplingParams(max_new_tokens=24, temperature=0)).tokens
        assert ours_tokens == reference


def test_batched_generation_equals_one_at_a_time(tiny_loaded, sp_tokenizer):
    prompts = [sp_tokenizer.encode(t, bos=True) for t in ("a", "def f(x):\n    return x * 2\n\n", "import sys")]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    together = generate_batch(tiny_loaded, prompts, params)
    for prompt, result in zip(prompts, together):
        alone = generate_text(tiny_loaded, prompt, params)
        assert (alone.tokens, alone.text) == (result.tokens, result.text)


@cuda
def test_logits_and_greedy_tokens_match_transformers_on_cuda(checkpoint_pair, sp_tokenizer):
    """The same checkpoint loaded onto the GPU (float32, decode steps replayed from CUDA graphs)
    against transformers on the CPU."""
    hf, ours_cpu, _ = checkpoint_pair
    ours = load_model(ours_cpu.info.path, device="cuda", dtype="float32")
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(tokens).logits
        logits = ours.model(tokens.cuda(), positions_for(tokens).cuda()).cpu()
    assert (logits - reference).abs().max().item() <= TOLERANCE
    prompt = sp_tokenizer.encode("def fibonacci(n):\n    ", bos=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    if sp_tokenizer.eos_id in expected:
        expected = expected[: expected.index(sp_tokenizer.eos_id) + 1]
    assert generate_text(ours, prompt, SamplingParams(max_new_tokens=24, temperature=0)).tokens == expected
