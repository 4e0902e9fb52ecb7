"""The fused CPU decode step (cpu_kernels.c through cpu_decode.py) equals the PyTorch model.

Same logits and the same cache writes as `EagerDecode` for batches of rows at different positions,
grouped and plain attention, tied and untied output; the same greedy tokens through the scheduler;
and the build falls back to plain PyTorch, saying so, when there is no C compiler.
"""

from __future__ import annotations

import pytest
import torch

import qgpt_code.native as native
from qgpt_code.config import ModelArgs
from qgpt_code.cpu_decode import NativeCpuDecode, supports
from qgpt_code.decode_step import EagerDecode, make_decode
from qgpt_code.kv_cache import KVCache
from qgpt_code.model import Transformer
from qgpt_code.quantize import quantize_int8

from test_decode_step import prompts_of, run_greedy

kernels = native.cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C compiler to build the CPU kernels")

SHAPES = {
    "grouped, untied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "plain heads, tied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=True),
    "one kv head": dict(n_heads=6, n_kv_heads=1, tie_embeddings=False),
}


def random_model(seed: int = 0, **shape) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=48 if shape["n_heads"] == 6 else 64, n_layers=2, vocab_size=300, max_seq_len=96,
                     multiple_of=32, **shape)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # non-trivial norm weights: a wrong scale would show
    return model


def prefilled_caches(model: Transformer, prompt_lengths: dict[int, int]) -> tuple[KVCache, KVCache]:
    """Two identical caches with each row's prompt already computed: {row: prompt length}."""
    caches = KVCache(model.args, 5, 80), KVCache(model.args, 5, 80)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for row, length in prompt_lengths.items():
            tokens = torch.randint(0, model.args.vocab_size, (1, length), generator=generator)
            for cache in caches:
                model(tokens, torch.arange(length)[None], cache, rows=[row], kv_len=length)
    return caches


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fused_step_equals_the_model(shape):
    """Rows 4, 0 and 2 (not contiguous, not in order) at positions 17, 1 and 60, three steps."""
    model = random_model(**shape)
    eager_cache, fused_cache = prefilled_caches(model, {4: 17, 0: 1, 2: 60})
    eager, fused = EagerDecode(model, eager_cache), NativeCpuDecode(model, fused_cache, kernels)
    rows, positions, tokens = [4, 0, 2], [17, 1, 60], [5, 299, 0]
    with torch.inference_mode():
        for _ in range(3):
            expected = eager(tokens, positions, rows, 64)
            got = fused(tokens, positions, rows, 64)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
            tokens = expected.argmax(-1).tolist()
            positions = [p + 1 for p in positions]
    torch.testing.assert_close(fused_cache.k, eager_cache.k, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_cache.v, eager_cache.v, rtol=0, atol=1e-5)
    assert not fused_cache.k[:, [1, 3]].any()  # rows nobody decodes stay untouched


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES["grouped, untied"], SHAPES["one kv head"]], ids=["untied", "odd widths"])
def test_fused_int8_step_equals_the_int8_model(shape):
    """Weight-only int8 layers (and the int8 output head) through the C kernel, against the
    PyTorch int8 path: dims 48 and 64, hidden 128 and 192, vocab 300 (not a multiple of 8)."""
    model = quantize_int8(random_model(**shape))
    eager_cache, fused_cache = prefilled_caches(model, {1: 9, 3: 30})
    eager, fused = EagerDecode(model, eager_cache), NativeCpuDecode(model, fused_cache, kernels)
    with torch.inference_mode():
        expected = eager([7, 8], [9, 30], [1, 3], 64)
        got = fused([7, 8], [9, 30], [1, 3], 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(fused_cache.k, eager_cache.k, rtol=0, atol=1e-5)


@needs_kernels
def test_fused_greedy_tokens_equal_eager_through_the_scheduler(tiny_loaded):
    """A loaded checkpoint (column-major weights), five sequences of different lengths together."""
    prompts = prompts_of([200, 3, 17, 100, 9])
    eager, _, _ = run_greedy(tiny_loaded, prompts, lambda m, c, b: EagerDecode(m, c))
    fused, _, decode = run_greedy(tiny_loaded, prompts, make_decode)
    assert isinstance(decode, NativeCpuDecode)
    assert fused == eager


@needs_kernels
def test_a_position_or_row_outside_the_cache_is_refused_before_any_write():
    model = random_model(**SHAPES["grouped, untied"])
    cache = KVCache(model.args, 2, 16)
    fused = NativeCpuDecode(model, cache, kernels)
    with pytest.raises(IndexError, match="position 16"):
        fused([1], [16], [0], 16)
    with pytest.raises(IndexError, match="row 2"):
        fused([1], [0], [2], 16)
    with pytest.raises(IndexError, match="position -1"):
        fused([1, 1], [3, -1], [0, 1], 16)
    assert not cache.k.any()


def test_make_decode_uses_the_fused_step_only_where_it_applies():
    model = random_model(**SHAPES["grouped, untied"])
    cache = KVCache(model.args, 2, 32)
    assert supports(model, cache)
    if kernels is not None:
        assert isinstance(make_decode(model, cache, 2), NativeCpuDecode)
    assert isinstance(make_decode(model, cache, 2, eager=True), EagerDecode)
    bf16_cache = KVCache(model.args, 2, 32, dtype=torch.bfloat16)
    assert not supports(model, bf16_cache)
    assert isinstance(make_decode(model, bf16_cache, 2), EagerDecode)  # and no graphs on a CPU
    int8 = quantize_int8(random_model(**SHAPES["grouped, untied"]))
    assert isinstance(make_decode(int8, cache, 2), NativeCpuDecode if kernels else EagerDecode)


def test_without_a_compiler_decoding_falls_back_to_pytorch(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("QGPT_CACHE_DIR", str(tmp_path))
    native.cpu_kernels.cache_clear()
    try:
        assert native.cpu_kernels() is None
        model = random_model(**SHAPES["grouped, untied"])
        assert isinstance(make_decode(model, KVCache(model.args, 1, 32), 1), EagerDecode)
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
