"""The paged KV cache: one pool of fixed-size blocks, and the prefix index that shares them.

`KVCache` is the storage: keys and values for `n_blocks` blocks of `block_size` positions, every
layer, allocated once. A sequence owns no row of it; it holds a `BlockTable` (the ids of its blocks in
order) and grows one block at a time, so memory follows the tokens actually held, not `max_seq_len`.

`BlockPool` decides which block holds what. Full blocks are keyed by their tokens chained with their
parent's key (so equal keys mean equal prefixes; hits are verified against the tokens) and shared
read-only, with a reference count, by every sequence whose tokens start with them. A block nobody
references stays cached and is evicted least-recently-used, leaves first, only when a new block is
needed. A sequence that shares a cached block only in part (it diverges mid-block, or the block is
the partial tail of a finished sequence) gets a copy of that one block (copy-on-write).

    table of a sequence:  [ 7 | 3 | 12 | 40 ]      block 40 is its own, partly filled
    table of another:     [ 7 | 3 | 19 ]           blocks 7 and 3 shared (refs = 2)
    cached, unreferenced: [ 7 | 3 | 12 | 25 ]      block 25 evicted first (a leaf), then 40, 12, ...
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from qgpt_code.config import ModelArgs

BLOCK_SIZE = 16  # positions per block (vLLM's default): finer sharing than larger blocks, few enough to track
ROOT = -1  # the parent id of a sequence's first block


class KVCache:
    """Keys and values of `n_blocks` blocks of `block_size` positions, for every layer."""

    def __init__(
        self,
        args: ModelArgs,
        n_blocks: int,
        block_size: int = BLOCK_SIZE,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        # Within a block one KV head's keys are contiguous (block_size, hd): attention reads them in runs.
        shape = (args.n_layers, n_blocks, args.n_kv_heads, block_size, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, blocks, n_kv, bs, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, blocks, n_kv, bs, hd)
        self.n_blocks = n_blocks
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def block_bytes(self) -> int:
        return self.nbytes // self.n_blocks

    @property
    def tokens(self) -> int:
        """Positions the whole pool holds."""
        return self.n_blocks * self.block_size

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        """Bytes one position takes across all layers (keys and values)."""
        return 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8

    def slots(self, tables: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets), each (B, T): where the tokens at `positions` (B, T) of the sequences
        with block tables `tables` (B, W) are stored."""
        return tables.gather(1, positions // self.block_size), positions % self.block_size

    def write(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, T, n_kv, hd) at `offsets` (B, T) of `blocks` (B, T)."""
        # Advanced indices around a slice: the indexed view is (B, T, n_kv, hd), matching k and v.
        self.k[layer][blocks, :, offsets] = k
        self.v[layer][blocks, :, offsets] = v

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the blocks in `tables` (B, W) laid end to end, (B, n_kv, W * bs, hd)
        each: a copy. The reference path (prompt chunks, and decode without the fused kernels)."""
        B, W = tables.shape
        keys = self.k[layer][tables]  # (B, W, n_kv, bs, hd)
        values = self.v[layer][tables]
        return (keys.transpose(1, 2).reshape(B, keys.shape[2], W * self.block_size, -1),
                values.transpose(1, 2).reshape(B, values.shape[2], W * self.block_size, -1))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src` into block `dst` (every layer)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks needed to hold `tokens` positions."""
    return -(-tokens // block_size)


@dataclass
class BlockTable:
    """One sequence's blocks, in order, and the tokens whose keys/values they hold."""

    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    indexed: int = 0  # leading blocks registered in the prefix index (full, shared read-only)
    shareable: bool = True  # False after a hash collision: its later blocks are never indexed

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class _Block:
    """What the pool knows of one block."""

    refs: int = 0  # sequences whose tables hold it
    parent: int = ROOT  # the block before it in the prefix it belongs to (cached blocks only)
    tokens: tuple[int, ...] = ()  # the tokens it holds, once cached
    key: int | None = None  # chain key of a cached full block; None for a cached partial block
    cached: bool = False  # in the prefix index: outlives its sequences until evicted
    children: set[int] = field(default_factory=set)  # cached blocks whose parent it is


def chain_key(parent_key: int, tokens: Sequence[int]) -> int:
    """Key of a full block: its tokens and everything before them (through the parent's key)."""
    return hash((parent_key, tuple(tokens)))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BlockPool:
    """Allocation, sharing and eviction of a `KVCache`'s blocks.

    Every block is in exactly one state: free (holds nothing), referenced (refs > 0; cached or not),
    or cached and unreferenced (in `evictable`, least recently used first). Not thread-safe: the
    scheduler's thread owns it.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.block_size = cache.block_size
        self.blocks = [_Block() for _ in range(cache.n_blocks)]
        self.free: list[int] = list(range(cache.n_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, refs == 0; oldest first
        self.index: dict[int, int] = {}  # chain key -> cached full block
        self.root_children: set[int] = set()  # cached first blocks (the children of ROOT)
        self.evictions = 0
        self.copies = 0  # copy-on-write copies of a partly shared block

    # -- counts ------------------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks an allocation can get: free ones, then cached ones nobody references."""
        return len(self.free) + len(self.evictable)

    def counts(self) -> dict[str, int]:
        """total, used (referenced), shared (referenced more than once), cached (kept, unreferenced), free."""
        used = sum(1 for b in self.blocks if b.refs)
        shared = sum(1 for b in self.blocks if b.refs > 1)
        return dict(total=len(self.blocks), used=used, shared=shared, cached=len(self.evictable), free=len(self.free))

    # -- allocation --------------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A block for one sequence's own use (refs = 1), or None when every block is referenced."""
        if self.free:
            block = self.free.pop()
        else:
            block = self._evict()
            if block is None:
                return None
        self.blocks[block].refs = 1
        return block

    def _evict(self) -> int | None:
        """The least recently used unreferenced leaf, taken out of the index."""
        victim = next((b for b in self.evictable if not self.blocks[b].children), None)
        if victim is None:
            return None
        del self.evictable[victim]
        self._uncache(victim)
        self.evictions += 1
        return victim

    def _uncache(self, block: int) -> None:
        info = self.blocks[block]
        if info.key is not None and self.index.get(info.key) == block:
            del self.index[info.key]
        self._children_of(info.parent).discard(block)
        self.blocks[block] = _Block()

    def _children_of(self, block: int) -> set[int]:
        return self.root_children if block == ROOT else self.blocks[block].children

    def _ref(self, block: int) -> None:
        info = self.blocks[block]
        if info.refs == 0:
            self.evictable.pop(block, None)
        info.refs += 1

    def _unref(self, block: int) -> None:
        info = self.blocks[block]
        info.refs -= 1
        if info.refs:
            return
        if info.cached:
            self.evictable[block] = None  # most recently used
        else:
            self.blocks[block] = _Block()
            self.free.append(block)

    # -- sequences ---------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int], limit: int, after: BlockTable | None = None) -> tuple[list[int], int | None, int]:
        """The cached blocks holding the longest prefix of `tokens[:limit]` (continuing `after`, a
        table of indexed blocks, when given): (the full blocks, then a block that shares only its first
        `partial` tokens or None, partial)."""
        bs, parent, key, start = self.block_size, ROOT, 0, 0
        if after is not None and after.blocks:
            parent, start = after.blocks[-1], len(after)
            key = self.blocks[parent].key
        found: list[int] = []
        while start + bs <= limit:
            chunk = tuple(tokens[start : start + bs])
            key = chain_key(key, chunk)
            block = self.index.get(key)
            if block is None or self.blocks[block].parent != parent or self.blocks[block].tokens != chunk:
                break  # absent, or a hash collision: never serve another prefix's keys/values
            found.append(block)
            parent, start = block, start + bs
        rest = tokens[start:limit]
        best, best_length = None, 0
        for child in self._children_of(parent) if rest else ():
            length = common_prefix_length(self.blocks[child].tokens, rest)
            if length > best_length:
                best, best_length = child, length
        return found, best, best_length

    def attach_prefix(self, table: BlockTable, tokens: Sequence[int], limit: int, partial: bool = True) -> int:
        """Extend `table` (empty, or all of its blocks indexed) with the cached blocks that continue it
        along `tokens`, at most `limit` tokens in all; a block shared only in part is copied into a
        block of the table's own (if `partial` and the pool has one). Returns the tokens attached."""
        if not table.shareable or table.indexed < len(table.blocks):
            return 0  # its last block is its own: nothing cached can follow it
        start = len(table)
        found, partial_block, partial_length = self.lookup(tokens, limit, after=table)
        for block in found:
            self._ref(block)
            table.blocks.append(block)
            table.tokens.extend(self.blocks[block].tokens)
        table.indexed = len(table.blocks)
        if partial and partial_block is not None:
            self._ref(partial_block)  # so the allocation below cannot evict it
            copy = self.allocate()
            if copy is not None:
                self.cache.copy_block(partial_block, copy)
                self.copies += 1
                table.blocks.append(copy)
                table.tokens.extend(self.blocks[partial_block].tokens[:partial_length])
            self._unref(partial_block)
        return len(table) - start

    def copy_from(self, table: BlockTable, source: BlockTable, upto: int) -> int:
        """Extend a block-aligned `table` with copies of `source`'s blocks up to position `upto`
        (both tables hold the same tokens there): how a sequence takes over what a running one just
        computed but has not filled a whole block with yet. Returns the tokens copied."""
        start = len(table)
        while len(table) % self.block_size == 0 and len(table) < min(upto, len(source)):
            block = self.allocate()
            if block is None:
                break
            self.cache.copy_block(source.blocks[len(table) // self.block_size], block)
            self.copies += 1
            table.blocks.append(block)
            table.tokens.extend(source.tokens[len(table) : min(upto, len(source), len(table) + self.block_size)])
        return len(table) - start

    def reserve(self, table: BlockTable, new_tokens: int) -> bool:
        """Blocks for `new_tokens` more positions; False (keeping what it got) when the pool is out."""
        while len(table.blocks) * self.block_size < len(table) + new_tokens:
            block = self.allocate()
            if block is None:
                return False
            table.blocks.append(block)
        return True

    def trim(self, table: BlockTable) -> None:
        """Give back blocks reserved beyond the table's tokens and the next one (blocks taken for a
        speculative step's guesses that the model did not confirm)."""
        keep = blocks_for(len(table) + 1, self.block_size)
        while len(table.blocks) > keep:
            self._unref(table.blocks.pop())

    def commit(self, table: BlockTable, tokens: Sequence[int]) -> None:
        """Record that the table's next positions now hold `tokens`' keys/values; every block this
        fills is indexed (or, when an equal block is already cached, replaced by that one)."""
        table.tokens.extend(tokens)
        bs = self.block_size
        while table.shareable and (table.indexed + 1) * bs <= len(table):
            i = table.indexed
            parent = table.blocks[i - 1] if i else ROOT
            chunk = tuple(table.tokens[i * bs : (i + 1) * bs])
            key = chain_key(self.blocks[parent].key if i else 0, chunk)
            existing = self.index.get(key)
            if existing is None:
                self._cache(table.blocks[i], parent, chunk, key)
            elif self.blocks[existing].parent == parent and self.blocks[existing].tokens == chunk:
                # Another sequence computed the same block first (concurrent equal prompts): share its copy.
                self._ref(existing)
                self._unref(table.blocks[i])
                table.blocks[i] = existing
            else:  # a hash collision with another prefix: this sequence's blocks stay its own
                table.shareable = False
                return
            table.indexed += 1

    def _cache(self, block: int, parent: int, tokens: tuple[int, ...], key: int | None) -> None:
        info = self.blocks[block]
        info.parent, info.tokens, info.key, info.cached = parent, tokens, key, True
        if key is not None:
            self.index[key] = block
        self._children_of(parent).add(block)

    def release(self, table: BlockTable) -> None:
        """The sequence is done with its blocks. Its partial last block stays cached (unless a cached
        block already starts with the same tokens); each block goes back to the pool,
        or stays cached for later sequences while anything references it or until evicted."""
        bs = self.block_size
        tail = len(table) - table.indexed * bs
        if table.shareable and 0 < tail < bs and table.indexed == len(table.blocks) - 1:
            parent = table.blocks[-2] if len(table.blocks) > 1 else ROOT
            tokens = tuple(table.tokens[table.indexed * bs :])
            covered = any(self.blocks[c].tokens[:tail] == tokens for c in self._children_of(parent))
            if not covered and (parent == ROOT or self.blocks[parent].cached):
                self._cache(table.blocks[-1], parent, tokens, None)
        # Last block first: of one sequence's cached blocks, the leaves become the least recently used.
        for block in reversed(table.blocks):
            self._unref(block)
        table.blocks.clear()
        table.tokens.clear()
        table.indexed, table.shareable = 0, True

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the blocks holding anything: referenced or cached."""
        return (len(self.blocks) - len(self.free)) * self.cache.block_bytes
