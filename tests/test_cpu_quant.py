"""Block-quantized weights on the CPU (quant_blocks.py, the quant_* kernels of cpu_kernels.c).

The float reference is gguf's own: `gguf.quants.dequantize` of the blocks, then a float64 matrix
product. The kernels quantize the activations per block to int8 first (llama.cpp's scheme), so they
are held to (a) that reference with the activations as the kernel quantized them, tightly, and
(b) the reference with the float activations, within what 8-bit activations cost. Every format,
shapes with odd row counts and odd block counts, batches of 1 to 17 (past the integer kernels'
limit, where the weights are dequantized for BLAS), and each implementation this CPU has (portable,
AVX2, AVX-512): the others are skipped. A build for a plain x86-64 target still finds the SIMD
paths at run time. Then whole models: our --quantize int8/int4 of a float model, and GGUF files
kept quantized, through the fused decode step and the model's forward.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import qgpt_code.native as native
from qgpt_code import quant_blocks as qb

kernels = native.cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="no C compiler to build the CPU kernels")
BEST = -1 if kernels is None else kernels.quant_best_isa()
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(kernels is None or isa > BEST, reason=f"this CPU has no {name}"),
                     id=name) for isa, name in [(0, "portable"), (1, "avx2"), (2, "avx512")]]
FORMATS = ["Q4_0", "Q4_1", "Q8_0"]
# (rows, cols, batch): odd rows (not a multiple of the 16 rows a thread takes), one block, odd block
# counts (the AVX-512 path takes two blocks at a time), batches within and past the tiles of 4 and 8.
SHAPES = [(37, 96, 1), (19, 32, 3), (50, 160, 5), (64, 224, 8), (33, 64, 9), (130, 576, 2)]


def random_blocks(fmt: str, rows: int, cols: int, seed: int) -> tuple[qb.BlockTensor, torch.Tensor]:
    """Blocks gguf's quantizer made from random weights, and gguf's dequantization of them (float64)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 2, (rows, 1)).astype(np.float32)
    raw = gguf_quantize(weights, Q[fmt])
    reference = torch.from_numpy(gguf_dequantize(raw, Q[fmt]).reshape(rows, cols)).double()
    return qb.BlockTensor(fmt, torch.from_numpy(raw.copy()), cols), reference


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x (N, cols) as the kernel sees it: its 16-bit blocks (two int8 planes) times their steps (float64)."""
    n_blocks = x.numel() // 32
    hi, lo = torch.empty(x.numel(), dtype=torch.int8), torch.empty(x.numel(), dtype=torch.int8)
    d, s = torch.empty(n_blocks), torch.empty(n_blocks)
    kernels.quant_activations(x.data_ptr(), n_blocks, hi.data_ptr(), lo.data_ptr(), d.data_ptr(), s.data_ptr())
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127
    q64 = (256 * hi.double() + lo.double()).view(n_blocks, 32)
    torch.testing.assert_close(s.double(), d.double() * q64.sum(1), rtol=1e-6, atol=1e-6)  # the block sums
    return (q64 * d.double()[:, None]).view(x.shape)


@needs_kernels
def test_activations_are_rounded_to_the_nearest_step():
    x = torch.randn(4, 96) * torch.tensor([[1e-3], [1.0], [50.0], [0.0]])
    approx = quantized_activations(x)
    steps = x.view(-1, 32).abs().amax(1) / 127 / 256  # (blocks,): 16 bits, 1/32512 of the block's max
    assert ((approx - x.double()).view(-1, 32).abs() <= steps.double()[:, None] + 1e-9).all()
    assert (approx[3] == 0).all()  # an all-zero block: scale 0, no division by it


@needs_kernels
@pytest.mark.parametrize("method", ["integer", "float"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_products_equal_the_float_reference(fmt, isa, method):
    for i, (rows, cols, batch) in enumerate(SHAPES):
        blocks, w = random_blocks(fmt, rows, cols, seed=i)
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(i))
        got = torch.empty(batch, rows)
        qb.matmul([blocks], x, got, isa, method)
        floats = x.double() @ w.t()
        # integer: what its arithmetic computes, on the activations as it quantized them
        exact = quantized_activations(x) @ w.t() if method == "integer" else floats
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item(),
                                   msg=lambda m: f"{rows}x{cols}, batch {batch}: {m}")
        # and both close to float activations (16-bit activations cost ~1e-5)
        assert (got.double() - floats).norm() / floats.norm() < 1e-4, (rows, cols, batch)


@needs_kernels
@pytest.mark.parametrize("method", ["integer", "float"])
@pytest.mark.parametrize("isa", ISAS)
def test_parts_of_several_formats_write_their_own_columns(isa, method):
    """A fused weight whose parts differ in format (q/k in Q4_1, v converted to Q8_0): each part
    writes its columns of a row whose stride is the whole width, nothing else."""
    parts, refs = zip(*(random_blocks(fmt, rows, 64, seed) for seed, (fmt, rows) in
                        enumerate([("Q4_1", 24), ("Q8_0", 9), ("Q4_0", 17)])))
    x = torch.randn(3, 64)
    out = torch.empty(3, 50)
    qb.matmul(list(parts), x, out, isa, method)
    expected = (quantized_activations(x) if method == "integer" else x.double()) @ torch.cat(refs).t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_rows_dequantize_for_blas(fmt, monkeypatch):
    """Past INT_KERNEL_MAX_ROWS (and, with a small chunk, in slices of rows) the product is float."""
    monkeypatch.setattr(qb, "DEQUANTIZE_CHUNK", 10 * 64)  # 10 rows a slice: 4 slices, the last partial
    blocks, w = random_blocks(fmt, 37, 64, seed=3)
    x = torch.randn(qb.INT_KERNEL_MAX_ROWS + 1, 64)
    got = torch.empty(len(x), 37)
    qb.matmul([blocks], x, got)
    torch.testing.assert_close(got.double(), x.double() @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_and_quantize_match_gguf(fmt):
    blocks, w = random_blocks(fmt, 21, 96, seed=5)
    assert torch.equal(blocks.dequantize().double(), w)  # bit for bit
    weights = torch.randn(21, 96) * 3
    ours = qb.quantize(weights, fmt).data.numpy()
    theirs = gguf_quantize(weights.numpy(), Q[fmt])
    assert (ours == theirs).mean() > 0.999  # ggml's rounding; a rare tie may round the other way
    step = np.abs(weights.numpy()).max() / (127 if fmt == "Q8_0" else 7)
    assert np.abs(gguf_dequantize(ours, Q[fmt]) - weights.numpy()).max() <= step


def test_bad_shapes_are_refused_clearly():
    with pytest.raises(ValueError, match="rows of 40 values"):
        qb.BlockTensor("Q8_0", torch.zeros(2, 34, dtype=torch.uint8), 40)
    with pytest.raises(ValueError, match="not one of"):
        qb.BlockTensor("Q2_K", torch.zeros(2, 34, dtype=torch.uint8), 32)
    with pytest.raises(Exception, match="not a multiple of 32"):
        qb.quantize(torch.zeros(3, 40), "Q4_0")


@needs_kernels
def test_an_isa_the_cpu_lacks_is_refused():
    if BEST == 2:
        pytest.skip("this CPU has every implementation")
    blocks, _ = random_blocks("Q8_0", 4, 32, seed=0)
    with pytest.raises(ValueError, match="cannot run on this CPU"):
        qb.matmul([blocks], torch.randn(1, 32), torch.empty(1, 4), BEST + 1)


@needs_kernels
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
def test_a_plain_x86_64_build_chooses_simd_at_run_time(tmp_path):
    """Built for the x86-64 baseline (SSE2 only), the library still has the AVX2 and AVX-512 paths
    (compiled for their own targets) and picks the best at run time; every path agrees."""
    compiler = native.os.environ.get("CC") or "cc"
    library = tmp_path / "baseline.so"
    flags = [flag for flag in native.FLAGS if not flag.startswith("-march=")]
    result = subprocess.run([compiler, *flags, "-march=x86-64", native._openmp_flag(compiler), "-o", str(library),
                             str(native.SOURCE), "-lm"], capture_output=True, text=True, timeout=native.BUILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    baseline = native.bind(ctypes.CDLL(str(library)))
    assert baseline.quant_best_isa() == BEST
    for fmt in FORMATS:
        blocks, w = random_blocks(fmt, 40, 160, seed=7)
        x = torch.randn(5, 160)
        expected = quantized_activations(x) @ w.t()
        for isa in range(BEST + 1):
            for method, reference in ((1, expected), (2, x.double() @ w.t())):  # integer, float
                out = torch.empty(5, 40)
                assert baseline.quant_matmul(qb.FORMAT_IDS[fmt], blocks.data.data_ptr(), x.data_ptr(), out.data_ptr(),
                                             5, 160, 40, 40, isa, method) == 0
                torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-4)


# --- whole models ---------------------------------------------------------------------------------


def _random_model(**shape):
    from test_cpu_decode import random_model

    return random_model(**shape)


@needs_kernels
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0"], ids=["int8", "int4"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_quantized_models_decode_like_their_forward(fmt, tied, monkeypatch):
    """--quantize int8/int4 on the CPU: the fused paged decode step equals the quantized model's
    own forward pass (the products there made by the same integer kernels), and stays close to
    the float model."""
    from test_cpu_decode import check_paged_decode

    monkeypatch.setattr(qb, "INT_KERNEL_MAX_ROWS", 1 << 20)  # the reference's whole-sequence products too
    shape = dict(dim=64, n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    model = qb.quantize_model(_random_model(**shape), fmt)
    assert all(isinstance(m, qb.BlockQuantLinear) for m in [model.layers[0].attention.wqkv, model.output])
    # An ulp upstream may round an activation to its next 16-bit step: ~1e-4 of the logits, which
    # are ~2 untied and ~60 tied (the random embedding table as the head).
    steps = check_paged_decode(model, kernels, 16, lengths=(20, 33), starts=(4, 0), atol=0.01 if tied else 1e-3)
    assert all(torch.isfinite(s).all() for s in steps)
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        quantized = model(tokens, torch.arange(24)[None])
        floats = _random_model(**shape)(tokens, torch.arange(24)[None])
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(1), floats.flatten(1)).item()
    assert cosine > (0.999 if fmt == "Q8_0" else 0.98), cosine


@needs_kernels
@pytest.mark.parametrize("choice,fmt", [("int8", "Q8_0"), ("int4", "Q4_0")])
def test_the_quantize_option_makes_blocks_on_the_cpu(tiny_hf, choice, fmt):
    """`--quantize int8|int4` of a float checkpoint on the CPU: the blocks the kernels read, and
    greedy decoding through the fused step that stays close to the float model's."""
    import argparse

    from qgpt_code.cli_common import add_model_options, load_from_args
    from qgpt_code.generation import SamplingParams, generate_text

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args(["--model", str(tiny_hf[1]), "--device", "cpu", "--quantize", choice])
    loaded = load_from_args(args, progress=lambda done, total: None)
    assert loaded.model.layers[1].feed_forward.w2.formats == [fmt] and loaded.model.output.formats == [fmt]
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.inference_mode():
        quantized = loaded.model(tokens, torch.arange(6)[None])
        args.quantize = None
        floats = load_from_args(args, progress=lambda done, total: None).model(tokens, torch.arange(6)[None])
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(1), floats.flatten(1)).item()
    assert cosine > (0.999 if choice == "int8" else 0.98), cosine  # int4 of random weights: 0.987
    assert len(generate_text(loaded, [1, 5, 6], SamplingParams(max_new_tokens=5, temperature=0)).tokens) == 5
