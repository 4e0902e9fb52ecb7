"""Weight-only int8: the quantizer's round trip and the quantized model's logits against float."""

import torch

from qgpt_code.generation import SamplingParams, generate_text
from qgpt_code.quantize import Int8Linear, quantize_int8, quantize_per_channel


def test_per_channel_round_trip_error_is_within_half_a_step():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 64)[:, None]
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (q.float() * scales[:, None] - w).abs()
    assert (error <= scales[:, None] / 2 + 1e-6).all()  # each row within half its own step


def test_quantized_model_logits_stay_close_to_float(tiny_hf):
    from qgpt_code import load_model

    reference = load_model(tiny_hf[1], device="cpu", dtype="float32")
    quantized = load_model(tiny_hf[1], device="cpu", dtype="float32")
    quantize_int8(quantized.model)
    assert isinstance(quantized.model.layers[0].attention.wqkv, Int8Linear)
    assert isinstance(quantized.model.output, Int8Linear)
    tokens = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(48).expand(2, 48)
    with torch.no_grad():
        ref = reference.model(tokens, positions)
        got = quantized.model(tokens, positions)
    relative = ((got - ref).norm() / ref.norm()).item()
    assert relative < 0.02, relative  # int8 per-channel: about 1% of the logits' magnitude
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # and it still generates through the same scheduler
    completion = generate_text(quantized, [1, 5, 6], SamplingParams(max_new_tokens=5, temperature=0))
    assert len(completion.tokens) <= 5 and completion.tokens
