"""Device-resident key/value buffers, written by index.

One preallocated tensor per kind holds every layer, every row (batch slot) and every position, so the
decode step has static shapes (it can be captured in a CUDA graph) and a row can be copied to another
row in one call (the prefix store reuses rows this way).
"""

from __future__ import annotations

import torch

from qgpt_code.config import ModelArgs


class KVCache:
    """Keys and values for `n_rows` sequences of up to `max_seq_len` positions each."""

    def __init__(
        self,
        args: ModelArgs,
        n_rows: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (args.n_layers, n_rows, args.n_kv_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, rows, n_kv, S, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, rows, n_kv, S, hd)
        self.n_rows = n_rows
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        """Bytes one position of one row takes across all layers (keys and values)."""
        return 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8

    def write(
        self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store k, v (B, T, n_kv, hd) at `positions` (B, T) of cache `rows` (B,)."""
        row_index = rows[:, None]  # (B, 1), broadcasts against positions (B, T)
        # Advanced indices around a slice: the indexed view is (B, T, n_kv, hd), matching k and v.
        self.k[layer][row_index, :, positions] = k
        self.v[layer][row_index, :, positions] = v

    def read(
        self, layer: int, rows: torch.Tensor | slice, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `kv_len` positions of `rows`, (B, n_kv, kv_len, hd) each. A slice of rows gives
        views (no copy: the common decode case); a tensor of row ids gathers a copy."""
        return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (every layer)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
