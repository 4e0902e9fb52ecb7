"""Weight-only int8 quantization of the linear layers, applied to a loaded model (gpt-fast's scheme).

Each output channel (row) of a weight gets its own scale, max|w| / 127, and is stored as int8; the
forward pass converts the weight back to the activations' dtype and rescales the output. Decoding one
token reads every weight once, so halving (bf16) or quartering (fp32) the bytes read is the point; the
conversion only pays off where it is fused into the matrix product.

The kernels form a bounded set, fixed at start-up (a compilation at request time would stall every
stream, and torch.compile gives up after its recompile limit):
- decode steps: each batch bucket's row count gets a fused kernel in `prepare_decode_kernels`, which
  `make_decode` calls before capturing the CUDA graphs; `DECODE_KERNEL` names the one used (see there);
- everything else (prompt chunks of any length, compute-bound) converts the weight and uses the regular
  matrix product, `int8_matmul`, which compiles nothing;
- on the CPU the fused decode step (cpu_decode.py) reads the int8 weight through its own C kernel.
Embeddings and norms stay in floating point.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qgpt_code.model import Transformer

QUANTIZED_LAYERS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")

# The decode-step kernel, chosen by measurement on a GPU (`bench/gpu.py --int8-kernels` times each
# against bf16 at the engine's batch buckets):
#   "compiled": gpt-fast's -- `int8_matmul` under torch.compile (inductor, coordinate-descent tuning),
#               one specialisation per (weight shape, bucket), all compiled in prepare_decode_kernels;
#   "int8pack": torch._weight_int8pack_mm, a fixed ATen kernel (nothing to compile);
#   "dequant":  `int8_matmul` as is (converts the whole weight each step: the no-fusion baseline).
DECODE_KERNEL = "compiled"
KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (rows, in), (out, in), (out,) -> (rows, out)


class Int8Linear(nn.Module):
    """y = (x @ W_int8^T) * scale, W stored as int8 (out, in) with one scale per output row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the activations' dtype
        # (rows, activation dtype) -> the fused kernel prepared for it; any other input uses int8_matmul
        self.decode_kernels: dict[tuple[int, torch.dtype], KernelFn] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight, scales = quantize_per_channel(linear.weight.detach())
        return cls(weight, scales.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        rows = x.shape[:-1].numel()
        kernel = self.decode_kernels.get((rows, x.dtype))
        if kernel is None:  # a prompt chunk, or a row count no decode bucket has
            return int8_matmul(x, self.weight, self.scales)
        return kernel(x.reshape(rows, x.shape[-1]), self.weight, self.scales).view(*x.shape[:-1], -1)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ int8 weight (out, in)^T, rescaled per output channel: (..., out)."""
    return F.linear(x, weight.to(x.dtype)) * scales


def int8pack_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same product through ATen's fused int8 weight-only kernel: x (rows, in) -> (rows, out)."""
    return torch._weight_int8pack_mm(x, weight, scales.to(x.dtype))


def prepare_decode_kernels(model: Transformer, rows: Iterable[int], kernel: str | None = None,
                           backend: str = "inductor") -> int:
    """Give every Int8Linear of `model` a fused kernel for each row count in `rows` (the decode batch
    buckets), running each once now so that any compilation happens here and never at request time.
    Idempotent; returns how many (layer, rows) pairs were new. `kernel` defaults to DECODE_KERNEL;
    `backend` is torch.compile's (tests on the CPU pass "eager" to count compilations without paying
    for code generation). A kernel that cannot be made here (no compiler toolchain, an op this torch
    lacks on this device) is reported on stderr and the model keeps the plain product: slower, same
    results, still nothing compiled at request time."""
    kernel = kernel or DECODE_KERNEL
    layers = int8_layers(model)
    if not layers or kernel == "dequant":
        return 0
    dtype = model.tok_embeddings.weight.dtype
    rows = sorted(set(rows))
    if kernel == "compiled":
        _specialisations.update((backend, tuple(m.weight.shape), n, dtype) for m in layers for n in rows)
        fn = _compiled(backend, specialisations=len(_specialisations))
    elif kernel == "int8pack":
        fn = int8pack_matmul
    else:
        raise ValueError(f"unknown int8 decode kernel {kernel!r}: choose compiled, int8pack or dequant")
    made: list[tuple[Int8Linear, tuple[int, torch.dtype]]] = []
    try:
        with torch.inference_mode():
            for layer in layers:
                for n in rows:
                    if (n, dtype) not in layer.decode_kernels:
                        fn(torch.zeros(n, layer.weight.shape[1], dtype=dtype, device=layer.weight.device),
                           layer.weight, layer.scales)
                        made.append((layer, (n, dtype)))
    except Exception as exc:  # all or nothing: a half-prepared model would mix kernels by layer
        reason = (str(exc).strip().splitlines() or [""])[-1]
        print(f"qgpt: int8 decode kernel {kernel!r} unavailable ({type(exc).__name__}: {reason}); "
              "int8 layers use the plain matrix product", file=sys.stderr, flush=True)
        return 0
    for layer, key in made:
        layer.decode_kernels[key] = fn
    return len(made)


def int8_layers(model: nn.Module) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


_compiled_fns: dict[str, KernelFn] = {}
_specialisations: set[tuple] = set()  # every (backend, weight shape, rows, dtype) prepared in this process


def _compiled(backend: str, specialisations: int) -> KernelFn:
    """int8_matmul under torch.compile with static shapes, allowed as many specialisations as the
    (weight shape, bucket) pairs of every model prepared so far need (dynamo counts them per function)."""
    import torch._dynamo
    import torch._inductor.config

    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), specialisations + 8))
    if backend == "inductor":
        # gpt-fast's setting: lets inductor fuse the int8->bf16 conversion into an M=1 reduction
        torch._inductor.config.coordinate_descent_tuning = True
    if backend not in _compiled_fns:
        _compiled_fns[backend] = torch.compile(int8_matmul, dynamic=False, fullgraph=True, backend=backend)
    return _compiled_fns[backend]


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
    model.decode_runtime = None  # graphs captured before read the float weights: capture anew
    return model
