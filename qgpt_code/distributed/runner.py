"""Rank 0 leads, the other ranks follow: every model call on rank 0 is announced to the followers first.

The front end (CLI, HTTP server, Engine, Scheduler) runs on rank 0 only and calls its model as it would on
one device. `LeaderModel` wraps rank 0's slice of the model: before each call it broadcasts what the
call needs -- an 8-number header and one int64 payload (token ids, positions, block tables) -- and the
followers, looping in `follow`, make the same call on their slices. The collectives inside the forward
pass (modules.py) then meet in the same order on every rank.

    rank 0:  scheduler -> LeaderModel.forward -> broadcast(header, payload) -> forward (all-reduces ...)
    rank k:  follow():    broadcast(header, payload) -> forward (all-reduces ...)

Only rank 0 allocates KV blocks (the block pool lives in its scheduler); block ids are the same on every
rank because tables travel in the payload. Each rank's `KVCache` holds its own KV heads. Operations:
CACHE (a new cache of n blocks: the followers allocate theirs), COPY (copy-on-write of one block),
FORWARD (a prompt chunk, or any plain call), MAKE_DECODE (build the decode step: CUDA graphs are
captured on all ranks together, so the all-reduces are inside every rank's graphs), DECODE (one decode
step), PING (keeps an idle follower's pending broadcast short of the collective timeout), STOP.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from qgpt_code.decode_step import EagerDecode, GraphedDecode
from qgpt_code.errors import QGPTError
from qgpt_code.kv_cache import KVCache

STOP, PING, CACHE, COPY, FORWARD, MAKE_DECODE, DECODE = range(7)
HEADER = 8  # int64s: the operation, then up to 7 numbers
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PING_SECONDS = 60.0  # an idle leader pings this often (collective timeouts are minutes)


class Link:
    """Broadcasts from rank 0 on the default process group, in tensors on `device` (NCCL needs CUDA ones)."""

    def __init__(self, device: torch.device):
        self.device = device

    def send(self, op: int, *fields: int, payload: torch.Tensor | None = None) -> None:
        header = [op, *fields] + [0] * (HEADER - 1 - len(fields))
        dist.broadcast(torch.tensor(header, dtype=torch.long, device=self.device), src=0)
        if payload is not None:
            dist.broadcast(payload.to(self.device, torch.long).contiguous(), src=0)

    def receive(self) -> list[int]:
        header = torch.empty(HEADER, dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        return header.tolist()

    def receive_payload(self, n: int) -> torch.Tensor:
        payload = torch.empty(n, dtype=torch.long, device=self.device)
        dist.broadcast(payload, src=0)
        return payload


def local_decode(model: nn.Module, cache: KVCache, max_batch: int, max_seq_len: int, eager: bool, progress=None):
    """A rank's decode step over its own slice: CUDA graphs on a GPU (each graph holds the step's
    all-reduces), plain PyTorch otherwise. Never the fused CPU kernels: they bypass the collectives."""
    if eager or model.tok_embeddings.weight.device.type != "cuda":
        return EagerDecode(model, cache)
    from qgpt_code.decode_step import power_of_two_buckets
    from qgpt_code.quantize import prepare_decode_kernels

    prepare_decode_kernels(model, power_of_two_buckets(1, max_batch))  # int8 kernels made now, captured below
    return GraphedDecode(model, cache, max_batch, max_seq_len, progress=progress)


def _pack_decode(tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> list[int]:
    """[tokens (B), positions (B), table lengths (B), the tables one after another]."""
    return [*tokens, *positions, *(len(t) for t in tables), *(b for t in tables for b in t)]


def _unpack_decode(values: list[int], batch: int) -> tuple[list[int], list[int], list[list[int]]]:
    tokens, positions, lengths = values[:batch], values[batch : 2 * batch], values[2 * batch : 3 * batch]
    tables, at = [], 3 * batch
    for n in lengths:
        tables.append(values[at : at + n])
        at += n
    return tokens, positions, tables


class Leader:
    """Rank 0's end of the link: announces each computation, one at a time (a lock: the engine thread,
    the pinging thread and copy-on-write all send)."""

    def __init__(self, model: nn.Module, link: Link, ping_seconds: float = PING_SECONDS):
        self.model, self.link = model, link
        self.lock = threading.RLock()
        self.cache: KVCache | None = None
        self.stopped = False
        self.out_of_step: str | None = None  # why the ranks may no longer be at the same collective
        self._last_sent = time.monotonic()
        self._stopping = threading.Event()
        self._pinger = threading.Thread(target=self._ping, args=(ping_seconds,), name="qgpt-tp-ping", daemon=True)
        self._pinger.start()

    def _send(self, op: int, *fields: int, payload: torch.Tensor | None = None) -> None:
        if self.stopped:
            raise QGPTError("the tensor-parallel group has been stopped")
        if self.out_of_step:
            raise QGPTError(f"the tensor-parallel ranks are out of step after {self.out_of_step}: restart")
        self.link.send(op, *fields, payload=payload)
        self._last_sent = time.monotonic()

    def run(self, op: int, fields: tuple[int, ...], payload: torch.Tensor | None, compute):
        """Announce one computation, then do rank 0's part of it. If rank 0's part fails (out of memory,
        SIGTERM mid-step), the followers may be waiting in a collective rank 0 never reaches: no more
        calls go out, and `stop` does not wait for them (they exit when this process does)."""
        with self.lock:
            self._send(op, *fields, payload=payload)
            try:
                return compute()
            except BaseException as exc:
                self.out_of_step = f"{type(exc).__name__} on rank 0 in the middle of a step"
                raise

    def _ping(self, seconds: float) -> None:
        while not self._stopping.wait(seconds / 4):
            with self.lock:
                if self.stopped or self.out_of_step:
                    return
                if time.monotonic() - self._last_sent >= seconds:
                    try:
                        self._send(PING)
                    except Exception as exc:  # a follower is gone; the next real call reports it
                        print(f"qgpt: tensor-parallel ping failed: {exc}", file=sys.stderr)
                        return

    def use_cache(self, cache: KVCache) -> None:
        """Make `cache` the one every rank computes into: the followers allocate theirs (same blocks,
        their heads), and block copies (copy-on-write in the block pool) are mirrored."""
        with self.lock:
            if cache is self.cache:
                return
            dtype = DTYPES.index(cache.k.dtype)
            self._send(CACHE, cache.n_blocks, cache.block_size, dtype)
            copy_locally = cache.copy_block

            def copy_block(src: int, dst: int) -> None:
                self.run(COPY, (src, dst), None, lambda: copy_locally(src, dst))

            cache.copy_block = copy_block  # this instance only: the pool calls it, the followers follow
            self.cache = cache

    def forward(self, tokens, positions, cache=None, tables=None, kv_len=None, last_index=None, causal_from=None):
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            raise QGPTError("a tensor-parallel model's decode step must come from model.make_decode (every rank "
                            "captures its graphs together), not from a capture on rank 0 alone")
        with self.lock:
            if cache is not None:
                self.use_cache(cache)
            batch, length = tokens.shape
            parts = [tokens, positions] + [t for t in (tables, last_index) if t is not None]
            payload = torch.cat([p.reshape(-1).to(torch.long) for p in parts])
            fields = (batch, length, -1 if tables is None else tables.shape[1], -1 if kv_len is None else kv_len,
                      int(last_index is not None), -1 if causal_from is None else causal_from, int(cache is not None))
            return self.run(FORWARD, fields, payload, lambda: self.model(
                tokens, positions, cache, tables=tables, kv_len=kv_len, last_index=last_index, causal_from=causal_from))

    def make_decode(self, cache: KVCache, max_batch: int, max_seq_len: int, eager: bool = False) -> "LeaderDecode":
        with self.lock:
            self.use_cache(cache)
            inner = self.run(MAKE_DECODE, (max_batch, max_seq_len, int(eager)), None,
                             lambda: local_decode(self.model, cache, max_batch, max_seq_len, eager, _graph_progress))
            return LeaderDecode(self, inner)

    def stop(self) -> None:
        """Tell the followers to exit (once; a follower already gone is not an error here). The pinging
        thread is joined: a daemon thread still alive when the interpreter finalizes can abort the
        process ("terminate called without an active exception")."""
        self._stopping.set()
        if self._pinger is not threading.current_thread():
            self._pinger.join(timeout=10)
        with self.lock:
            if self.stopped or self.out_of_step:
                self.stopped = True
                return
            try:
                self._send(STOP)
                dist.barrier()  # every rank past its last collective before any tears the group down
            except Exception as exc:
                print(f"qgpt: could not stop the other ranks: {exc}", file=sys.stderr)
            self.stopped = True


class LeaderDecode:
    """Rank 0's decode step: (tokens, positions, tables) -> (B, V) logits, announced to the followers."""

    def __init__(self, leader: Leader, inner):
        self.leader, self.inner = leader, inner

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        values = _pack_decode(tokens, positions, tables)
        return self.leader.run(DECODE, (len(tokens), len(values)), torch.tensor(values, dtype=torch.long),
                               lambda: self.inner(tokens, positions, tables))


class LeaderModel(nn.Module):
    """Rank 0's model as the front end sees it: the rank's `Transformer` slice (its args: this rank's
    heads, whole vocabulary; attributes read through), whose calls run on every rank. `make_decode`
    builds the decode step on every rank (the Engine asks for it instead of decode_step.make_decode)."""

    def __init__(self, model: nn.Module, leader: Leader):
        super().__init__()
        self.inner = model
        self.leader = leader

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, tokens, positions, cache=None, tables=None, kv_len=None, last_index=None, causal_from=None):
        return self.leader.forward(tokens, positions, cache, tables, kv_len, last_index, causal_from)

    def make_decode(self, cache: KVCache, max_batch: int, max_seq_len: int, eager: bool = False) -> LeaderDecode:
        return self.leader.make_decode(cache, max_batch, max_seq_len, eager)


def follow(model: nn.Module, link: Link, rank: int) -> None:
    """A follower's whole life after loading: mirror rank 0's calls until STOP (or until rank 0 is gone,
    which surfaces as an error from the next broadcast). A call that raises here raised on rank 0 too
    (same inputs, same checks), so it is reported and the loop goes on, as the engine does."""
    device = model.tok_embeddings.weight.device
    cache: KVCache | None = None
    decode = None
    torch.set_grad_enabled(False)
    while True:
        op, *f = link.receive()
        if op == STOP:
            dist.barrier()
            return
        payload = None
        if op == FORWARD:
            batch, length, width, _, has_last, _, _ = f
            payload = link.receive_payload(2 * batch * length + max(width, 0) * batch + batch * has_last)
        elif op == DECODE:
            payload = link.receive_payload(f[1])
        try:
            if op == CACHE:
                cache = decode = None  # the old one goes first: memory for one cache at a time
                cache = KVCache(model.args, f[0], f[1], device, DTYPES[f[2]])
            elif op == COPY:
                cache.copy_block(f[0], f[1])
            elif op == FORWARD:
                _forward(model, cache, f, payload)
            elif op == MAKE_DECODE:
                decode = local_decode(model, cache, f[0], f[1], bool(f[2]))
            elif op == DECODE:
                decode(*_unpack_decode(payload.tolist(), f[0]))
        except Exception as exc:
            print(f"qgpt: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _forward(model: nn.Module, cache: KVCache | None, f: list[int], payload: torch.Tensor) -> None:
    batch, length, width, kv_len, has_last, causal_from, has_cache = f
    n = batch * length
    tokens, positions = payload[:n].view(batch, length), payload[n : 2 * n].view(batch, length)
    at = 2 * n
    tables = last_index = None
    if width >= 0:
        tables, at = payload[at : at + batch * width].view(batch, width), at + batch * width
    if has_last:
        last_index = payload[at : at + batch]
    model(tokens, positions, cache if has_cache else None, tables=tables, kv_len=None if kv_len < 0 else kv_len,
          last_index=last_index, causal_from=None if causal_from < 0 else causal_from)


def _graph_progress(done: int, total: int) -> None:
    end = "\n" if done == total else "\r"
    print(f"qgpt: capturing decode graphs on every rank: {done}/{total}", end=end, file=sys.stderr, flush=True)


# -- generation on rank 0 (the CLI's complete/chat) ----------------------------------------------------


def generate(model: LeaderModel, tokenizer, prompts: Sequence[Sequence[int]], params, max_seq_len: int | None = None,
             eager: bool = False) -> Iterator[list]:
    """generation.generate for a tensor-parallel model: the same scheduler, the decode step from
    `model.make_decode` (built on every rank)."""
    from qgpt_code.generation import fit_prompt
    from qgpt_code.kv_cache import BLOCK_SIZE, BlockPool, blocks_for
    from qgpt_code.scheduler import Scheduler

    context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    prompts = [fit_prompt(p, context, params.truncate_prompt) for p in prompts]
    lengths = [len(p) + min(params.max_new_tokens, context - len(p)) for p in prompts]
    weights = model.tok_embeddings.weight
    cache = KVCache(model.args, sum(blocks_for(n) for n in lengths), BLOCK_SIZE, weights.device, weights.dtype)
    decode = model.make_decode(cache, len(prompts), max(lengths), eager)
    scheduler = Scheduler(model, tokenizer, BlockPool(cache), max_batch=len(prompts), max_seq_len=context,
                          prefill_budget=max(lengths), decode=decode)
    index = {scheduler.add(p, params).id: i for i, p in enumerate(prompts)}
    while scheduler.has_work():
        yield [(index[seq.id], event) for seq, event in scheduler.step()]


def stream_text(loaded, prompt_tokens: Sequence[int], params, eager: bool = False) -> Iterator[str]:
    """generation.stream_text on every rank."""
    for events in generate(loaded.model, loaded.tokenizer, [prompt_tokens], params, eager=eager):
        for _, event in events:
            if event.text:
                yield event.text
