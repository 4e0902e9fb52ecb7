"""The fused CPU decode step (cpu_kernels.c through cpu_decode.py) equals the PyTorch model.

Sequences decoded token by token on the paged cache, batched at different positions, with block
tables shuffled and interleaved between them, give the logits of the model's own forward pass over
each whole sequence (no cache), and leave the model's rotated keys and its values in their blocks,
nothing elsewhere: grouped, plain and single kv heads, tied and untied output, float32 and int8
weights, block sizes that do and do not divide into vector widths, and a build without AVX2. Bad
positions and tables are refused before any write, and without a C compiler decoding falls back
to plain PyTorch, saying so.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess

import pytest
import torch

import qgpt_code.native as native
from qgpt_code.config import ModelArgs
from qgpt_code.cpu_decode import NativeCpuDecode, supports
from qgpt_code.kv_cache import KVCache, blocks_for
from qgpt_code.model import Transformer
from qgpt_code.quantize import quantize_int8

kernels = native.cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C compiler to build the CPU kernels")

SHAPES = {
    "grouped, untied": dict(dim=64, n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "plain heads, tied": dict(dim=64, n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "one kv head": dict(dim=48, n_heads=6, n_kv_heads=1, tie_embeddings=False),  # head_dim 8, dims not powers of 2
    "head_dim 12": dict(dim=36, n_heads=3, n_kv_heads=1, tie_embeddings=False),  # keys not a whole number of vectors
}
BLOCK_SIZES = [16, 5, 40]  # the default; smaller than a vector, not dividing one; over a pass of values (32)


def random_model(seed: int = 0, **shape) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(n_layers=2, vocab_size=300, max_seq_len=96, multiple_of=32, **shape)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # non-trivial norm weights: a wrong scale would show
    return model


def shuffled_tables(lengths: list[int], block_size: int, spare: int,
                    seed: int) -> tuple[list[list[int]], int, list[int]]:
    """(block tables, pool size, blocks the decode must not touch) for sequences of `lengths`.

    The pool's ids are shuffled and dealt one at a time to each sequence in turn, so a sequence's
    blocks are out of order and interleaved with the others'. Each table has one block more than
    its sequence reaches (reserved ahead, as a scheduler does), and `spare` blocks are in no table."""
    needs = [blocks_for(length, block_size) + 1 for length in lengths]
    n_blocks = sum(needs) + spare
    ids = iter(torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)).tolist())
    tables: list[list[int]] = [[] for _ in lengths]
    while any(len(table) < need for table, need in zip(tables, needs)):
        for table, need in zip(tables, needs):
            if len(table) < need:
                table.append(next(ids))
    return tables, n_blocks, [*ids] + [table[-1] for table in tables]


def reference(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The model's forward pass over one whole sequence (T,) without a cache: logits (T, vocab), and
    every layer's rotated keys and values (T, n_kv, hd), from the fused q/k/v projection's output."""
    args, T = model.args, len(tokens)
    outputs = []
    hooks = [layer.attention.wqkv.register_forward_hook(lambda module, inputs, output: outputs.append(output))
             for layer in model.layers]
    try:
        logits = model(tokens[None], torch.arange(T)[None])[0]
    finally:
        for hook in hooks:
            hook.remove()
    keys, values = [], []
    for qkv in outputs:
        heads = qkv.reshape(T, args.n_heads + 2 * args.n_kv_heads, args.head_dim)
        k = heads[:, args.n_heads : args.n_heads + args.n_kv_heads]
        pairs = torch.view_as_complex(k.float().unflatten(-1, (-1, 2)).contiguous())  # (T, n_kv, hd/2)
        keys.append(torch.view_as_real(pairs * model.rope[:T, None]).flatten(-2))
        values.append(heads[:, args.n_heads + args.n_kv_heads :])
    return logits, keys, values


def check_paged_decode(model: Transformer, library: ctypes.CDLL, block_size: int, lengths=(40, 7, 23),
                       starts=(0, 3, 9), max_seq_len: int = 64, seed: int = 1, atol: float = 1e-4) -> list[torch.Tensor]:
    """Decode each sequence (random tokens) one token per step from position 0, sequence b joining
    at step starts[b], all live sequences in one call (in a different order every other step), and
    check every step's logits, the keys and values left in the cache and the blocks left untouched.
    Returns every step's logits. (`atol`: block-quantized models quantize their activations, where
    an ulp of difference upstream may round a value to the next step.)"""
    lengths = list(lengths)
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, model.args.vocab_size, (length,), generator=generator) for length in lengths]
    tables, n_blocks, untouched = shuffled_tables(lengths, block_size, spare=3, seed=seed)
    cache = KVCache(model.args, n_blocks, block_size)
    fused = NativeCpuDecode(model, cache, library, max_seq_len)
    steps = []
    with torch.inference_mode():
        expected = [reference(model, tokens) for tokens in sequences]
        for step in range(max(s + n for s, n in zip(starts, lengths))):
            live = [b for b, (s, n) in enumerate(zip(starts, lengths)) if s <= step < s + n]
            live = live[::-1] if step % 2 else live
            positions = [step - starts[b] for b in live]
            got = fused([sequences[b][p].item() for b, p in zip(live, positions)], positions, [tables[b] for b in live])
            for row, (b, p) in enumerate(zip(live, positions)):
                torch.testing.assert_close(got[row], expected[b][0][p], rtol=0, atol=atol,
                                           msg=lambda m: f"sequence {b} position {p}: {m}")
            steps.append(got)
    for b, (table, length) in enumerate(zip(tables, lengths)):
        positions = torch.arange(length)
        blocks, offsets = torch.tensor(table)[positions // block_size], positions % block_size
        for layer in range(model.args.n_layers):
            torch.testing.assert_close(cache.k[layer][blocks, :, offsets], expected[b][1][layer], rtol=0, atol=atol)
            torch.testing.assert_close(cache.v[layer][blocks, :, offsets], expected[b][2][layer], rtol=0, atol=atol)
        # The rest of a partial last block is never written.
        assert not cache.k[:, table[(length - 1) // block_size], :, (length - 1) % block_size + 1 :].any()
    assert not cache.k[:, untouched].any() and not cache.v[:, untouched].any()
    return steps


@needs_kernels
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_paged_steps_equal_the_model_without_a_cache(shape, block_size):
    """Sequences of 40, 7 and 23 tokens joining at steps 0, 3 and 9: batches of 1 to 3 at different
    positions, crossing block boundaries, partial last blocks."""
    check_paged_decode(random_model(**shape), kernels, block_size)


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES["grouped, untied"], SHAPES["one kv head"]], ids=["untied", "odd widths"])
def test_int8_paged_steps_equal_the_int8_model(shape):
    """Weight-only int8 layers (and the int8 output head) through the C kernel, against the int8
    model's PyTorch forward: dims 48 and 64, hidden 128 and 192, vocab 300 (not a multiple of 8)."""
    check_paged_decode(quantize_int8(random_model(**shape)), kernels, 16, lengths=(20, 33), starts=(4, 0))


@needs_kernels
def test_a_loaded_checkpoint_decodes_like_its_model(tiny_loaded):
    """Loaded weights are column-major (the products read them transposed); longer sequences."""
    check_paged_decode(tiny_loaded.model, kernels, 16, lengths=(90, 5, 50), starts=(0, 40, 2), max_seq_len=128)


def _build(tmp_path, march: str) -> ctypes.CDLL:
    compiler = native.os.environ.get("CC") or "cc"
    if native.shutil.which(compiler) is None:
        pytest.skip("no C compiler")
    library = tmp_path / f"cpu_kernels-{march}.so"
    flags = [flag for flag in native.FLAGS if not flag.startswith("-march=")]
    result = subprocess.run([compiler, *flags, f"-march={march}", native._openmp_flag(compiler), "-o", str(library),
                             str(native.SOURCE), "-lm"], capture_output=True, text=True, timeout=native.BUILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return native.bind(ctypes.CDLL(str(library)))


@needs_kernels
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"], ids=["no AVX2", "AVX2, no AVX-512"])
def test_a_build_for_an_older_cpu_gives_the_same_logits(tmp_path, march):
    """The portable code (vector extensions lowered to SSE2, no intrinsics) and the AVX2 code, where
    -march=native may have used AVX-512."""
    if march == "x86-64-v3" and not {"avx2", "fma", "bmi2"} <= set(native._cpu_features().split()):
        pytest.skip("this CPU has no AVX2")
    older = _build(tmp_path, march)
    model = quantize_int8(random_model(**SHAPES["grouped, untied"]))  # the int8 kernel has its own AVX2 path
    for got, expected in zip(check_paged_decode(model, older, 16), check_paged_decode(model, kernels, 16)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    check_paged_decode(random_model(**SHAPES["head_dim 12"]), older, 5)


@needs_kernels
@needs_kernels
def test_fused_greedy_tokens_equal_eager_through_the_scheduler(tiny_loaded):
    """End to end on a loaded checkpoint: sequences join, grow across blocks and finish together."""
    from test_decode_step import prompts_of, run_greedy

    from qgpt_code.decode_step import EagerDecode, make_decode

    prompts = prompts_of([200, 3, 17, 100, 9])
    eager, _, _ = run_greedy(tiny_loaded, prompts, lambda m, c, b: EagerDecode(m, c))
    fused, _, decode = run_greedy(tiny_loaded, prompts, lambda m, c, b: make_decode(m, c, b, 256))
    assert isinstance(decode, NativeCpuDecode)
    assert fused == eager


def test_bad_positions_and_tables_are_refused_before_any_write():
    model = random_model(**SHAPES["grouped, untied"])  # rotary table: 96 positions
    cache = KVCache(model.args, 4, 16)
    fused = NativeCpuDecode(model, cache, kernels, 64)
    with pytest.raises(IndexError, match="position 64"):
        fused([1], [64], [[0, 1, 2, 3, 0]])
    with pytest.raises(IndexError, match="position 96"):  # within max_seq_len, past the rotary table
        NativeCpuDecode(model, cache, kernels, 200)([1], [96], [[0] * 7])
    with pytest.raises(IndexError, match="position -1"):
        fused([1, 1], [3, -1], [[0], [1]])
    with pytest.raises(IndexError, match="block 4 "):
        fused([1], [0], [[4]])
    with pytest.raises(IndexError, match="block -1 "):  # even where the position does not reach
        fused([1, 1], [0, 17], [[0], [1, 2, -1]])
    with pytest.raises(IndexError, match="table 1 has 1 blocks: position 16 needs 2"):
        fused([1, 1], [0, 16], [[0], [1]])
    with pytest.raises(ValueError, match="2 tokens, 2 positions, 1 tables"):
        fused([1, 1], [0, 0], [[0]])
    assert not cache.k.any() and not cache.v.any()


def test_supports_float32_caches_with_float32_or_int8_layers():
    model = random_model(**SHAPES["grouped, untied"])
    assert supports(model, KVCache(model.args, 2, 16))
    assert supports(quantize_int8(random_model(**SHAPES["grouped, untied"])), KVCache(model.args, 2, 16))
    assert not supports(model, KVCache(model.args, 2, 16, dtype=torch.bfloat16))


def test_make_decode_uses_the_fused_step_only_where_it_applies():
    from qgpt_code.decode_step import make_decode

    model = random_model(**SHAPES["grouped, untied"])
    cache = KVCache(model.args, 4, 16)
    if kernels is not None:
        assert isinstance(make_decode(model, cache, 2, 64), NativeCpuDecode)
    assert not isinstance(make_decode(model, cache, 2, 64, eager=True), NativeCpuDecode)
    bf16_cache = KVCache(model.args, 4, 16, dtype=torch.bfloat16)
    assert not isinstance(make_decode(model, bf16_cache, 2, 64), NativeCpuDecode)
    int8 = quantize_int8(random_model(**SHAPES["grouped, untied"]))
    assert isinstance(make_decode(int8, cache, 2, 64), NativeCpuDecode) == (kernels is not None)


def test_without_a_compiler_decoding_falls_back_to_pytorch(monkeypatch, tmp_path, capsys):
    from qgpt_code.decode_step import make_decode

    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("QGPT_CACHE_DIR", str(tmp_path))
    native.cpu_kernels.cache_clear()
    try:
        assert native.cpu_kernels() is None
        model = random_model(**SHAPES["grouped, untied"])
        assert not isinstance(make_decode(model, KVCache(model.args, 4, 16), 1, 64), NativeCpuDecode)
    finally:
        native.cpu_kernels.cache_clear()
    assert "no C compiler 'no-such-cc'" in capsys.readouterr().err


def test_the_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("QGPT_CACHE_DIR", str(tmp_path))
    if native.shutil.which("cc") is None:
        pytest.skip("no C compiler")
    first = native.build()
    built_at = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == built_at  # not rebuilt
    edited = tmp_path / "cpu_kernels.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.build() != first
    edited.write_text("this is not C")
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.build()


def test_the_thread_tuner_keeps_the_faster_choice_and_retries_the_other():
    """Steps are timed with every core (0) and one (1) per batch size; the faster is kept, the
    slower retried after RETRY_EVERY steps times how much slower it was (at most RETRY_AT_MOST)."""
    from qgpt_code.cpu_decode import ThreadTuner

    calls = []
    tuner = ThreadTuner(type("Kernels", (), {"quant_set_threads": staticmethod(calls.append)})())
    assert tuner.choose(1) is None  # a batch size's first step allocates: not timed
    assert tuner.choose(1) == 0
    tuner.record(1, 0, 0.100)
    assert tuner.choose(1) == 1
    tuner.record(1, 1, 0.020)  # one thread: 5x faster (a busy machine)
    choices = [tuner.choose(1) for _ in range(400)]
    assert choices[0] == 0 and choices[1:160] == [1] * 159 and choices[160] == 0  # retried 32 * 5 steps later
    assert tuner.choose(8) is None and tuner.choose(8) == 0  # each batch size on its own
    assert calls[-1] == 0 and set(calls) == {0, 1}


def test_a_retried_choice_s_new_time_replaces_a_spike():
    from qgpt_code.cpu_decode import ThreadTuner

    tuner = ThreadTuner(type("Kernels", (), {"quant_set_threads": staticmethod(lambda n: None)})())
    tuner.choose(1)
    tuner.record(1, tuner.choose(1), 0.400)  # every core, during a spike of load
    tuner.record(1, tuner.choose(1), 0.006)  # one
    while (choice := tuner.choose(1)) != 0:
        tuner.record(1, choice, 0.006)
    tuner.record(1, 0, 0.004)  # the retry: the machine is quiet again
    assert tuner.choose(1) == 0
