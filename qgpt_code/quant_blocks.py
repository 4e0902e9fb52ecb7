"""Block-quantized weights on the CPU: GGUF's Q4_0, Q4_1 and Q8_0 kept as stored, read by the C kernels.

A decode step reads every weight once, so its time is the weights' bytes over memory bandwidth plus
the arithmetic on them. Dequantizing a Q4_1 file to float32 at load made SmolLM2 read ~540 MB a token
where the file holds ~96 MB. Here a matrix stays in its GGUF blocks of 32 values (layouts in
cpu_kernels.c), and products read them directly:

- a few rows of activations (a decode step, a short prompt chunk): `quant_matmul` quantizes the
  activations per block to int8 and takes integer dot products (llama.cpp's scheme), AVX-512/VNNI,
  AVX2 or portable C, chosen at run time;
- many rows (a prompt chunk, where arithmetic, not reading, is the cost): the weights are
  dequantized a slice at a time into a scratch buffer and multiplied by BLAS in float32.

Formats the kernels do not read (the K-quants, Q5_0, Q5_1) are dequantized at load and stored as
Q8_0: 8.5 bits a weight, close to lossless next to the 4.5-6.6 bits they came from. Our own
`--quantize int8` / `int4` of a float checkpoint makes Q8_0 / Q4_0 blocks the same way ggml's
reference quantizers do. Without a C compiler everything still works through gguf's numpy code, slowly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qgpt_code.errors import QGPTError

BLOCK = 32  # values per block in every format here
FORMAT_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # ggml's type ids, which the C kernels take
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
KEPT = tuple(FORMAT_IDS)
# Stored formats the kernels do not read -> the format they are converted to at load.
REQUANTIZED = {"Q4_K": "Q8_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0", "Q5_0": "Q8_0", "Q5_1": "Q8_0"}
QUANTIZE_CHOICES = {"int8": "Q8_0", "int4": "Q4_0"}  # --quantize on the CPU
ISA_NAMES = {-1: "best", 0: "portable", 1: "avx2", 2: "avx512"}
METHODS = {"auto": 0, "integer": 1, "float": 2}  # quant_matmul's ways to multiply (cpu_kernels.c)

# Products with at most this many rows of activations read the blocks in the C kernels; more rows
# dequantize slices into float32 for BLAS. Measured on SmolLM2's w13 (3072 x 576, Q4_1), one thread,
# kernel / BLAS path: 16 rows 0.34 / 3.8 ms, 32 rows 2.4 / 5.0 ms, 64 rows 7.1 / 10.3 ms (a busy
# machine: rough); dequantizing writes 4 bytes per weight, which a short prompt does not repay.
INT_KERNEL_MAX_ROWS = 64
DEQUANTIZE_CHUNK = 1 << 21  # weights dequantized at once for a BLAS product (8 MiB of float32)


def _kernels():
    from qgpt_code.native import cpu_kernels

    return cpu_kernels()


@dataclass(frozen=True)
class BlockTensor:
    """A (rows, cols) matrix stored as rows of 32-value blocks of one format."""

    fmt: str
    data: torch.Tensor  # (rows, cols // 32 * block bytes) uint8, contiguous
    cols: int

    def __post_init__(self):
        if self.fmt not in FORMAT_IDS:
            raise ValueError(f"block format {self.fmt!r} is not one of {', '.join(KEPT)}")
        if self.cols % BLOCK or self.data.dtype != torch.uint8 or self.data.dim() != 2 \
                or self.data.shape[1] != self.cols // BLOCK * BLOCK_BYTES[self.fmt]:
            raise ValueError(f"{self.fmt} data {tuple(self.data.shape)} {self.data.dtype} does not hold "
                             f"rows of {self.cols} values")

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def dequantize(self, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..stop as float32 (stop - start, cols), into `out` when given."""
        stop = self.rows if stop is None else stop
        data = self.data[start:stop]
        out = torch.empty(stop - start, self.cols) if out is None else out
        kernels = _kernels()
        if kernels is None:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            flat = dequantize(data.numpy().reshape(1, -1), GGMLQuantizationType[self.fmt])
            out.copy_(torch.from_numpy(flat.reshape(stop - start, self.cols)))
        else:
            kernels.quant_dequantize(FORMAT_IDS[self.fmt], data.data_ptr(), out.data_ptr(), stop - start, self.cols)
        return out


def from_gguf_bytes(fmt: str, raw: np.ndarray, cols: int) -> BlockTensor:
    """A BlockTensor from a GGUF tensor's bytes (rows, row bytes) (a view of the file: copied here),
    converting the formats the kernels do not read (REQUANTIZED) to theirs."""
    if fmt in FORMAT_IDS:
        return BlockTensor(fmt, torch.from_numpy(np.array(raw, dtype=np.uint8)), cols)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    weights = dequantize(raw.reshape(1, -1), GGMLQuantizationType[fmt]).reshape(raw.shape[0], cols)
    return quantize(torch.from_numpy(weights), REQUANTIZED[fmt])


def quantize(weight: torch.Tensor, fmt: str) -> BlockTensor:
    """Blocks of `fmt` (Q8_0, Q4_0 or Q4_1) for a float matrix (rows, cols), cols a multiple of 32."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise QGPTError(f"cannot quantize a {rows}x{cols} weight to {fmt}: its rows are not a multiple of {BLOCK}")
    w = weight.detach().to(torch.float32).contiguous()  # row-major, whatever the float layout
    kernels = _kernels()
    if kernels is None:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize

        data = torch.from_numpy(gguf_quantize(w.numpy(), GGMLQuantizationType[fmt]))
    else:
        data = torch.empty(rows, cols // BLOCK * BLOCK_BYTES[fmt], dtype=torch.uint8)
        kernels.quant_quantize(FORMAT_IDS[fmt], w.data_ptr(), data.data_ptr(), rows, cols)
    return BlockTensor(fmt, data, cols)


_scratch = threading.local()  # per thread: the float32 slice of weights a BLAS product reads


def _scratch_buffer(values: int) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < values:
        buffer = _scratch.buffer = torch.empty(values)
    return buffer[:values]


def matmul(parts: list[BlockTensor], x: torch.Tensor, out: torch.Tensor, isa: int = -1,
           method: str = "auto") -> torch.Tensor:
    """out (N, sum of parts' rows) = x (N, cols) @ W.t(), W the parts stacked by rows; float32,
    contiguous. `isa` forces one kernel implementation (ISA_NAMES; tests), -1: the best; `method`
    one of METHODS (auto: integer dot products for one row, float multiply-adds for more)."""
    n, kernels = x.shape[0], _kernels()
    if kernels is not None and n <= INT_KERNEL_MAX_ROWS:
        column = 0
        for part in parts:
            status = kernels.quant_matmul(FORMAT_IDS[part.fmt], part.data.data_ptr(), x.data_ptr(),
                                          out.data_ptr() + 4 * column, n, part.cols, part.rows, out.shape[1], isa,
                                          METHODS[method])
            if status != 0:
                raise ValueError(f"the {ISA_NAMES.get(isa, isa)} kernel cannot run on this CPU")
            column += part.rows
        return out
    column = 0
    for part in parts:  # compute-bound: float32 slices of W through BLAS
        step = max(1, DEQUANTIZE_CHUNK // part.cols)
        for start in range(0, part.rows, step):
            stop = min(start + step, part.rows)
            w = part.dequantize(start, stop, _scratch_buffer((stop - start) * part.cols).view(stop - start, part.cols))
            if len(parts) == 1 and stop - start == part.rows:
                torch.mm(x, w.t(), out=out)
            else:
                out[:, column + start : column + stop] = torch.mm(x, w.t())
        column += part.rows
    return out


class BlockQuantLinear(nn.Module):
    """y = x @ W.t() with W kept in blocks: one or more parts stacked by rows (a fused q/k/v weight
    whose parts came in different formats), each a buffer `blocks{i}` with its format in `formats`."""

    def __init__(self, parts: list[BlockTensor]):
        super().__init__()
        if not parts or len({p.cols for p in parts}) != 1:
            raise ValueError("a BlockQuantLinear needs parts with the same number of columns")
        self.formats = [p.fmt for p in parts]
        for i, part in enumerate(parts):
            self.register_buffer(f"blocks{i}", part.data)
        self.in_features, self.out_features = parts[0].cols, sum(p.rows for p in parts)

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str) -> "BlockQuantLinear":
        return cls([quantize(linear.weight, fmt)])

    def parts(self) -> list[BlockTensor]:
        return [BlockTensor(fmt, getattr(self, f"blocks{i}"), self.in_features) for i, fmt in enumerate(self.formats)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32).contiguous()  # (N, in)
        out = torch.empty(rows.shape[0], self.out_features)
        matmul(self.parts(), rows, out)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, formats={self.formats}"


def quantize_model(model: nn.Module, fmt: str) -> nn.Module:
    """Our `--quantize` on the CPU: every float projection (wqkv, wo, w13, w2, the output head; for a
    tied model a quantized copy of the embedding as the head) becomes a BlockQuantLinear of `fmt`,
    in place, one at a time. Layers already in blocks (a GGUF file's) stay as they are."""
    for layer in model.layers:
        for parent, name in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                             (layer.feed_forward, "w13"), (layer.feed_forward, "w2")):
            module = getattr(parent, name)
            if isinstance(module, nn.Linear):
                setattr(parent, name, BlockQuantLinear.from_linear(module, fmt))
    if model.output is None:  # tied: the table is still gathered from in float
        model.output = BlockQuantLinear([quantize(model.tok_embeddings.weight, fmt)])
    elif isinstance(model.output, nn.Linear):
        model.output = BlockQuantLinear.from_linear(model.output, fmt)
    return model


def best_isa() -> str:
    """The kernel implementation this CPU runs: "avx512", "avx2" or "portable" (None: no kernels)."""
    kernels = _kernels()
    return "none" if kernels is None else ISA_NAMES[kernels.quant_best_isa()]
