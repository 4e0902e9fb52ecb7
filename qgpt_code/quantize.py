"""Weight-only int8 quantization of the linear layers, applied to a loaded model (gpt-fast's scheme).

Each output channel (row) of a weight gets its own scale, max|w| / 127, and is stored as int8; the
forward pass converts the weight back to the activations' dtype and rescales the output. Decoding one
token reads every weight once, so halving (bf16) or quartering (fp32) the bytes read is the point; the
conversion only pays off where it is fused into the matrix product: on a GPU, decode-sized products
(a few rows) go through a torch.compile'd function whose generated kernel converts the int8 weight
as it reads it; on the CPU the fused decode step (cpu_decode.py) reads it through a C kernel;
prompt-sized products are bound by arithmetic, not reads, and run eagerly.
Embeddings and norms stay in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qgpt_code.model import Transformer

QUANTIZED_LAYERS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


class Int8Linear(nn.Module):
    """y = (x @ W_int8^T) * scale, W stored as int8 (out, in) with one scale per output row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the activations' dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight, scales = quantize_per_channel(linear.weight.detach())
        return cls(weight, scales.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.shape[:-1].numel() <= FUSED_MAX_ROWS:
            return fused_int8_matmul()(x, self.weight, self.scales)
        return int8_matmul(x, self.weight, self.scales)


FUSED_MAX_ROWS = 16  # decode steps: rows of activations (batch x tokens) at most
_fused = None


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ int8 weight (out, in)^T, rescaled per output channel: (..., out)."""
    return F.linear(x, weight.to(x.dtype)) * scales


def fused_int8_matmul():
    """int8_matmul compiled once per shape (static shapes: few, as decode batches come in buckets)."""
    global _fused
    if _fused is None:
        import torch._dynamo

        config = torch._dynamo.config  # each layer shape x batch bucket is one specialisation
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, limit):
                setattr(config, limit, max(getattr(config, limit), 64))
        _fused = torch.compile(int8_matmul, dynamic=False, fullgraph=True)
    return _fused


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (out, in) int8 and (out,) float32 scales, symmetric, round to nearest."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales  # row-major whatever the float weight's layout: the CPU kernel reads rows


def quantize_int8(model: Transformer) -> Transformer:
    """Replace the model's linear layers (and an untied output projection) by Int8Linear, in place,
    one layer at a time so peak memory grows by one layer's float weights at most."""
    for block in model.layers:
        for path in QUANTIZED_LAYERS:
            parent_name, child_name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child_name, Int8Linear.from_linear(getattr(parent, child_name)))
    if model.output is not None:
        model.output = Int8Linear.from_linear(model.output)
    return model
