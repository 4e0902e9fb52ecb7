"""int8 under real traffic: every kernel is made at start-up, no request compiles anything.

Before, every product of <= 16 activation rows went through one torch.compile'd function with static
shapes, so each new prompt-chunk length compiled (stalling every stream) until the recompile limit
failed the whole batch. Now only the decode buckets' row counts have fused kernels, prepared at
start-up; everything else converts the weight and uses the regular product. Compilations are
counted with torch._dynamo's own counters. On the CPU the "eager" compile backend stands in for
inductor (same tracing and guards, no code generation); on a GPU the real thing runs, in graphs.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils

from qgpt_code.engine import Engine, Request
from qgpt_code.generation import SamplingParams
from qgpt_code.quantize import Int8Linear, int8_matmul, prepare_decode_kernels, quantize_int8

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BUCKETS = [1, 2, 4]  # an engine of max_batch 4 decodes in these


def compilations() -> int:
    """Graphs dynamo has compiled in this process (each new shape specialisation is one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def int8_model(tiny_hf, device="cpu", dtype="float32"):
    from qgpt_code import load_model

    loaded = load_model(tiny_hf[1], device=device, dtype=dtype)
    quantize_int8(loaded.model)
    return loaded


def count_kernel_calls(model) -> dict:
    """Wrap every prepared kernel so the test can see the decode rows really used them."""
    calls = {"n": 0}
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            for key, fn in layer.decode_kernels.items():
                def counted(*args, fn=fn):
                    calls["n"] += 1
                    return fn(*args)
                layer.decode_kernels[key] = counted
    return calls


def serve_every_prompt_length(loaded, eager: bool, max_batch: int = 4) -> list:
    """200 requests with prompts of 1..200 tokens through an Engine; their results."""
    params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    with Engine(loaded, max_batch=max_batch, max_queue=256, max_seq_len=256, cache_bytes=8 << 20, eager=eager) as engine:
        handles = [engine.submit(Request([1] + [3 + (7 * i) % 500 for i in range(n - 1)], params))
                   for n in range(1, 201)]
        results = [h.result() for h in handles]
        assert engine.failure is None
    return results


def test_after_start_up_200_prompt_lengths_compile_nothing(tiny_hf):
    loaded = int8_model(tiny_hf)
    model = loaded.model
    before = compilations()
    layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert prepare_decode_kernels(model, BUCKETS, kernel="compiled", backend="eager") == layers * len(BUCKETS)
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, Int8Linear)}
    assert compilations() - before == len(shapes) * len(BUCKETS)  # start-up compiled, and the counter sees it
    assert prepare_decode_kernels(model, BUCKETS, kernel="compiled", backend="eager") == 0  # idempotent
    calls = count_kernel_calls(model)

    after_start_up = compilations()
    results = serve_every_prompt_length(loaded, eager=True)
    assert compilations() == after_start_up
    assert all(r.finish_reason == "length" and len(r.tokens) == 3 for r in results)
    assert calls["n"] > 0  # decode rows of 1, 2 and 4 (and prompt chunks of as many rows) used the kernels

    # What the old routing did with a prompt chunk of 3 rows: a new specialisation, i.e. a compilation.
    layer = model.layers[0].attention.wo
    fused = torch.compile(int8_matmul, dynamic=False, fullgraph=True, backend="eager")
    with torch.inference_mode():
        fused(torch.zeros(3, layer.weight.shape[1]), layer.weight, layer.scales)
    assert compilations() == after_start_up + 1


def test_rows_without_a_kernel_take_the_plain_product_with_the_same_result(tiny_hf):
    """A prepared kernel (ATen's int8 weight-only product here) and the plain product agree, and a
    row count with no kernel never reaches one."""
    loaded = int8_model(tiny_hf)
    layer = loaded.model.layers[1].feed_forward.w13
    x = torch.randn(4, layer.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = layer(x)
        prepare_decode_kernels(loaded.model, [4], kernel="int8pack")
        assert set(layer.decode_kernels) == {(4, torch.float32)}
        torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5)
        plain_three = int8_matmul(x[:3], layer.weight, layer.scales)
        torch.testing.assert_close(layer(x[:3]), plain_three, rtol=0, atol=0)  # 3 rows: the plain product
    with pytest.raises(ValueError, match="unknown int8 decode kernel 'triton'"):
        prepare_decode_kernels(loaded.model, [1], kernel="triton")


def test_graph_buckets_run_the_prepared_kernels_and_give_the_eager_tokens(tiny_hf, monkeypatch):
    """The decode graphs' padded batches (3 rows -> bucket 4) go through the kernels prepared for the
    buckets without compiling, and give the tokens of the plain product. On the CPU the graphs are
    the recorder of tests/test_decode_step.py (a replay recomputes the step on the static buffers)."""
    import qgpt_code.decode_step as decode_step
    from test_decode_step import prompts_of, replaying_recorder, run_greedy

    monkeypatch.setattr(decode_step, "KV_BUCKET", 32)  # several key buckets within the tiny context
    loaded = int8_model(tiny_hf)
    prompts = prompts_of([5, 40, 17])
    eager, _, _ = run_greedy(loaded, prompts, lambda m, c, b: decode_step.EagerDecode(m, c), max_new_tokens=30)
    prepare_decode_kernels(loaded.model, BUCKETS, kernel="compiled", backend="eager")
    calls = count_kernel_calls(loaded.model)
    after_start_up = compilations()
    graphed, _, _ = run_greedy(loaded, prompts, lambda m, c, b: decode_step.GraphedDecode(
        m, c, 4, 256, capture=replaying_recorder), max_new_tokens=30)
    assert compilations() == after_start_up and calls["n"] > 0
    assert graphed == eager


def test_a_kernel_that_cannot_be_made_leaves_the_plain_product(tiny_hf, monkeypatch, capsys):
    """A start-up failure (here: the fused op raising) is one line on stderr, no kernel is half
    installed, and the model still computes what it did."""
    import qgpt_code.quantize as quantize

    loaded = int8_model(tiny_hf)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    layer = loaded.model.layers[0].attention.wqkv
    with torch.inference_mode():
        before = layer(x)

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(quantize, "int8pack_matmul", broken)
    assert prepare_decode_kernels(loaded.model, BUCKETS, kernel="int8pack") == 0
    assert "int8 decode kernel 'int8pack' unavailable (RuntimeError: no kernel image" in capsys.readouterr().err
    assert all(not m.decode_kernels for m in loaded.model.modules() if isinstance(m, Int8Linear))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


@cuda
def test_cuda_int8_compiles_at_start_up_only_and_graphs_equal_eager(tiny_hf):
    """The real thing: inductor kernels compiled while the engine starts, captured in the graphs;
    200 prompt lengths compile nothing more; graphed tokens equal eager ones."""
    loaded = int8_model(tiny_hf, device="cuda", dtype="float32")  # float32: greedy ties cannot flip between paths
    before = compilations()
    graphed = serve_every_prompt_length(loaded, eager=False, max_batch=2)  # start-up compiles for buckets 1, 2
    after_first = compilations()
    assert after_first - before <= 2 * 5  # at most (5 weight shapes) x (2 buckets), all at start-up
    again = serve_every_prompt_length(loaded, eager=False, max_batch=2)  # the runtime on the model is reused
    assert compilations() == after_first
    eager = serve_every_prompt_length(loaded, eager=True, max_batch=2)
    assert [r.tokens for r in graphed] == [r.tokens for r in again] == [r.tokens for r in eager]
