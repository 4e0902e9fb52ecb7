"""Device-resident key/value buffers, written by index.

One preallocated tensor per kind holds every layer, every row (batch slot) and every position, so the
decode step has static shapes (it can be captured in a CUDA graph) and a row can be copied to another
row in one call (the prefix store reuses rows this way).
"""

from __future__ import annotations

from typing import Sequence

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


BLOCK_SIZE = 32  # tokens per hashed block of the prefix index


def _chain_hash(previous: int, block: Sequence[int]) -> int:
    """Hash of a block given the hash of everything before it (so equal hashes mean equal prefixes,
    up to collisions, which `PrefixStore` rules out by comparing the tokens themselves)."""
    return hash((previous, tuple(block)))


def common_prefix_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixStore:
    """Which token prefixes the rows of a `KVCache` hold, so later requests can reuse them.

    Storage is row-based: a sequence lives in one cache row of `max_seq_len` positions, and a
    finished sequence's row keeps its keys/values (prompt *and* generated tokens) until it is
    evicted. Rows rather than pages because the decode step then reads each sequence's keys/values as
    one contiguous run (static shapes, CUDA-graph friendly, and the layout attention kernels with a
    `cache_batch_idx` take directly), and because rows are few (tens), so per-row bookkeeping is cheap.
    Reusing a prefix costs nothing when its row is idle (the new request takes the row over) and one
    device copy of the prefix when its row is busy.

    The index is a hash chain over 32-token blocks: each full block of a row is keyed by the hash of
    all tokens up to its end, so a lookup walks the prompt block by block (O(prompt length)) to the
    rows sharing the longest block-aligned prefix, then extends the match token by token into the
    next block: prefixes that end mid-block are reused in full. Candidate rows are verified against
    their actual tokens, so a hash collision can never hand out the wrong keys/values.

    Eviction is least-recently-used among idle rows; a row in use is never evicted.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.bytes_per_token = cache.nbytes // (cache.n_rows * cache.max_seq_len)
        self.tokens: list[list[int]] = [[] for _ in range(cache.n_rows)]  # tokens whose K/V each row holds
        self.hashes: list[list[int]] = [[] for _ in range(cache.n_rows)]  # chain hash of each full block
        self.index: dict[int, set[int]] = {}  # chain hash -> rows holding that prefix
        self.in_use = [False] * cache.n_rows
        self.last_used = [0] * cache.n_rows  # logical clock for LRU
        self.clock = 0
        self.hits = self.tokens_reused = self.evictions = 0

    # -- lookup and allocation -------------------------------------------------------------------
    def longest_prefix(self, tokens: Sequence[int], limit: int) -> tuple[int | None, int]:
        """(row, length) of the longest cached prefix of `tokens`, at most `limit` tokens long."""
        candidates: set[int] = set()
        h = 0
        for start in range(0, limit - BLOCK_SIZE + 1, BLOCK_SIZE):
            h = _chain_hash(h, tokens[start : start + BLOCK_SIZE])
            rows = self.index.get(h)
            if not rows:
                break
            candidates = rows
        if not candidates:  # no full block shared: a short prefix is not worth a lookup
            return None, 0
        best = max(candidates, key=lambda r: (common_prefix_length(self.tokens[r], tokens, limit), not self.in_use[r]))
        return best, common_prefix_length(self.tokens[best], tokens, limit)

    def acquire(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """A row for a sequence starting with `tokens`, holding its longest cached prefix (all but the
        last token at most, whose logits are needed); returns (row, tokens reused), or None when every
        row is in use."""
        source, reused = self.longest_prefix(tokens, len(tokens) - 1)
        if source is not None and not self.in_use[source]:
            row = source  # take the idle row over: no copy
        else:
            row = self._free_row()
            if row is None:
                return None
            if source is not None:
                self.cache.copy_row(source, row, reused)
        self.in_use[row] = True
        if row != source:  # a copied prefix (or none): the row's old contents are gone
            self._truncate(row, 0)
            self.extend(row, tokens[:reused])
        else:
            self._truncate(row, reused)
        if reused:
            self.hits += 1
            self.tokens_reused += reused
        return row, reused

    def _free_row(self) -> int | None:
        idle = [r for r in range(self.cache.n_rows) if not self.in_use[r]]
        if not idle:
            return None
        empty = [r for r in idle if not self.tokens[r]]
        if empty:
            return empty[0]
        row = min(idle, key=lambda r: self.last_used[r])
        self.evictions += 1
        self._truncate(row, 0)
        return row

    # -- bookkeeping -----------------------------------------------------------------------------
    def extend(self, row: int, new_tokens: Sequence[int]) -> None:
        """Record that the row now also holds keys/values for `new_tokens`; index completed blocks."""
        tokens, hashes = self.tokens[row], self.hashes[row]
        tokens.extend(new_tokens)
        h = hashes[-1] if hashes else 0
        for start in range(len(hashes) * BLOCK_SIZE, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
            h = _chain_hash(h, tokens[start : start + BLOCK_SIZE])
            hashes.append(h)
            self.index.setdefault(h, set()).add(row)

    def release(self, row: int) -> None:
        """The sequence in `row` is finished; its keys/values stay cached until evicted."""
        self.in_use[row] = False
        self.clock += 1
        self.last_used[row] = self.clock

    def _truncate(self, row: int, length: int) -> None:
        """Forget all but the first `length` tokens of a row (their blocks leave the index)."""
        hashes = self.hashes[row]
        keep = length // BLOCK_SIZE
        for h in hashes[keep:]:
            self._unindex(h, row)
        del hashes[keep:]
        del self.tokens[row][length:]

    def _unindex(self, h: int, row: int) -> None:
        rows = self.index.get(h)
        if rows is not None:
            rows.discard(row)
            if not rows:
                del self.index[h]

    @property
    def bytes_in_use(self) -> int:
        return sum(len(t) for t in self.tokens) * self.bytes_per_token
