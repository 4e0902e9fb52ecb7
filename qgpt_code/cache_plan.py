"""How many KV blocks the engine allocates: from `--cache-bytes`, or from the memory a device has left.

On a GPU the default is the memory still free once the weights are loaded, less what the largest step
needs for its activations and a fixed margin (allocator fragmentation, cuBLAS workspaces, the CUDA
graphs' pool); on the CPU it is 2 GiB (at most a quarter of RAM), since RAM is shared with everything
else. `max_seq_len` reserves nothing; it is capped at what the pool holds, so that one sequence can
always run alone. The engine refuses to start only when not even a few blocks fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qgpt_code.config import ModelArgs
from qgpt_code.errors import QGPTError
from qgpt_code.kv_cache import BLOCK_SIZE, KVCache

DEFAULT_CPU_CACHE_BYTES = 2 << 30
GPU_MARGIN_BYTES = 1 << 30  # left free on a GPU beyond the measured needs
CUDA_CONTEXT_BYTES = 600 << 20  # what the CUDA context and PyTorch's kernels take before any tensor (planning only)
MIN_BLOCKS = 4  # "a few blocks": below this the engine cannot do useful work


@dataclass(frozen=True)
class CachePlan:
    blocks: int
    block_size: int
    bytes_per_token: int
    max_seq_len: int  # what one sequence may hold: the asked-for limit, capped at the pool
    device: str

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.tokens * self.bytes_per_token

    def sequences(self, length: int) -> int:
        """Sequences of `length` tokens the pool holds at once (more of them when they share a prefix)."""
        return self.tokens // length

    def describe(self) -> str:
        return (f"KV cache: {self.tokens:,} tokens in {self.blocks:,} blocks of {self.block_size} "
                f"({self.nbytes / 2**30:.2f} GiB on {self.device}), room for {self.sequences(self.max_seq_len)} "
                f"sequence(s) of {self.max_seq_len} tokens at once, more when shorter or sharing a prefix")


def activation_bytes(args: ModelArgs, dtype: torch.dtype, max_batch: int, prefill_budget: int, max_seq_len: int) -> int:
    """Peak memory of the largest steps beyond weights and cache, counted generously: a prompt chunk of
    `prefill_budget` tokens (hidden states, the fused qkv and w13 outputs, one layer's keys/values of a
    whole sequence gathered from the blocks, attention scores should SDPA use its math kernel) plus a
    decode step of `max_batch` rows (kept apart: on a GPU its CUDA graphs have their own memory pool)."""
    e = torch.finfo(dtype).bits // 8
    kv_width = args.n_kv_heads * args.head_dim
    qkv_width = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    per_token = (4 * args.dim + qkv_width + 3 * args.hidden_dim) * e
    gathered = 2 * kv_width * max_seq_len * e  # one layer's keys and values of one sequence
    prefill = prefill_budget * per_token + gathered + args.n_heads * prefill_budget * max_seq_len * 4 + args.vocab_size * 4
    decode = max_batch * (per_token + gathered + args.n_heads * max_seq_len * 4 + args.vocab_size * 4)
    return prefill + decode


def default_cache_bytes(device: torch.device, activations: int) -> int:
    """The pool's default size on `device`, measured now (after the weights are loaded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return gpu_cache_bytes(free, activations)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(DEFAULT_CPU_CACHE_BYTES, total // 4)


def gpu_cache_bytes(free_bytes: int, activations: int) -> int:
    return max(0, free_bytes - activations - GPU_MARGIN_BYTES)


def plan_from_bytes(args: ModelArgs, dtype: torch.dtype, cache_bytes: int, max_seq_len: int, device: str) -> CachePlan:
    per_token = KVCache.bytes_per_token(args, dtype)
    blocks = cache_bytes // (per_token * BLOCK_SIZE)
    if blocks < MIN_BLOCKS:
        raise QGPTError(
            f"the KV cache gets {cache_bytes / 2**20:.0f} MiB, {blocks} blocks of {BLOCK_SIZE} tokens; at least "
            f"{MIN_BLOCKS} are needed ({MIN_BLOCKS * BLOCK_SIZE * per_token / 2**20:.1f} MiB): "
            + ("raise --cache-bytes" if device == "cpu" else "use a larger GPU, --quantize int8, or raise --cache-bytes"))
    # One sequence must fit the pool alone; a full block table is also what the decode step sizes for.
    max_seq_len = min(max_seq_len, blocks * BLOCK_SIZE)
    return CachePlan(blocks, BLOCK_SIZE, per_token, max_seq_len, device)


def plan_cache(loaded, cache_bytes: int | None, max_batch: int, prefill_budget: int, max_seq_len: int) -> CachePlan:
    """The plan for a loaded model: `cache_bytes` if given, else the device's default."""
    args, dtype, device = loaded.model.args, loaded.dtype, loaded.device
    if cache_bytes is None:
        cache_bytes = default_cache_bytes(device, activation_bytes(args, dtype, max_batch, prefill_budget, max_seq_len))
    return plan_from_bytes(args, dtype, cache_bytes, max_seq_len, str(device))


def plan_for_card(args: ModelArgs, dtype: torch.dtype, card_bytes: int, max_batch: int = 8,
                  prefill_budget: int = 512, max_seq_len: int = 4096) -> CachePlan:
    """What the engine would allocate on a GPU of `card_bytes` for this model: the start-up formula
    with the free memory predicted (card less weights less the CUDA context) instead of measured."""
    weights = args.n_params * (torch.finfo(dtype).bits // 8)
    free = card_bytes - weights - CUDA_CONTEXT_BYTES
    if free <= 0:
        raise QGPTError(f"the weights take {weights / 2**30:.1f} GiB, more than the {card_bytes / 2**30:.1f} GiB "
                        "card leaves after the CUDA context: use more GPUs or a quantized model")
    activations = activation_bytes(args, dtype, max_batch, prefill_budget, max_seq_len)
    return plan_from_bytes(args, dtype, gpu_cache_bytes(free, activations), max_seq_len, "cuda")

