"""The serving engine both front ends share: requests in from any thread, token streams out.

One background thread owns the model, the KV cache and the `Scheduler`; callers only `submit`
requests and read events from the returned `RequestHandle` (a blocking iterator, or an async
iterator for asyncio servers). Keys/values of finished requests stay cached in the block pool, so the
next request about the same file or the next turn of the same chat only computes what changed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

import torch

from qgpt_code.checkpoints.assemble import LoadedModel
from qgpt_code.decode_step import acquire_runtime
from qgpt_code.errors import QGPTError
from qgpt_code.fresh_thread import run_in_fresh_thread
from qgpt_code.generation import Completion, SamplingParams, TokenEvent
from qgpt_code.cache_plan import plan_cache
from qgpt_code.kv_cache import BlockPool, KVCache
from qgpt_code.scheduler import Scheduler, Sequence as SchedSequence

DEFAULT_MAX_SEQ_LEN = 4096  # tokens one sequence may hold when the model's context is longer (--max-seq-len)


class EngineOverloaded(QGPTError):
    """The request queue is full; the caller should retry later (HTTP 429/503)."""


class EngineClosed(QGPTError):
    """The engine has been shut down."""


class EngineFailed(EngineClosed):
    """The engine thread stopped after repeated failures; the message says why."""


MAX_CONSECUTIVE_FAILURES = 3  # rounds in a row that raise before the engine gives up (a broken device, a bug)


@dataclass
class Request:
    prompt_tokens: Sequence[int]
    params: SamplingParams = SamplingParams()
    timeout: float | None = None  # seconds from submission; past it the request ends with "timeout"


class RequestHandle:
    """A submitted request: iterate it (or `async for` it) for `TokenEvent`s; the last one has a
    `finish_reason`. One consumer per handle."""

    def __init__(self, engine: "Engine", request: Request):
        self.engine = engine
        self.request = request
        self.prompt_tokens = len(request.prompt_tokens)
        self.cached_tokens = 0  # known once admitted: prompt tokens served from the prefix cache
        self.completion_tokens = 0
        self.tokens_proposed = self.tokens_accepted = 0  # speculation: guessed tokens, and those confirmed
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when the engine thread handed it to the scheduler
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._sequence: SchedSequence | None = None

    # -- producer side (engine thread) -----------------------------------------------------------
    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            if event.token_id is not None:
                self.completion_tokens += 1
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
            if event.finish_reason:
                self.finish_reason = event.finish_reason
                self.finished_at = time.monotonic()
            self._events.append(event)
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that consumer's event loop is closed: nobody is waiting any more
                pass

    # -- consumer side ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating at the next step; the event stream ends with finish_reason "cancelled"."""
        self.engine.cancel(self)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                event = self._events.popleft() if self._events else None
                if event is None:
                    flag = asyncio.Event()
                    self._async_waiters.append((loop, flag))
            if event is None:
                await flag.wait()
                continue
            yield event
            if event.finish_reason:
                return

    def result(self) -> Completion:
        """Block until the request ends; everything it generated."""
        completion = Completion("", [], "length", self.prompt_tokens,
                                [] if self.request.params.logprobs else None)
        for event in self:
            completion.add(event)
        return completion


@dataclass(frozen=True)
class EngineStats:
    requests_submitted: int
    requests_finished: int
    running: int
    queued: int
    prefix_hits: int  # admitted requests that reused a cached prefix
    prompt_tokens: int  # prompt tokens of admitted requests
    tokens_reused: int  # of those, served from the prefix cache (prefix hit rate: tokens_reused / prompt_tokens)
    tokens_computed: int  # tokens run through the model (prefill and decode)
    cache_bytes_in_use: int  # blocks holding keys/values: referenced or cached
    cache_bytes_capacity: int  # the whole block pool
    blocks_total: int
    blocks_used: int  # referenced by running sequences
    blocks_shared: int  # referenced by more than one running sequence
    blocks_cached: int  # kept for later requests, referenced by none (evictable)
    blocks_free: int
    block_size: int  # tokens per block
    evictions: int  # cached blocks evicted for room
    preemptions: int  # running sequences sent back to wait (recomputed later) when the pool ran out
    tokens_proposed: int = 0  # speculation: guessed tokens fed to the model
    tokens_accepted: int = 0  # of those, confirmed (each saved a decode step)

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of admitted prompt tokens served from the prefix cache."""
        return self.tokens_reused / self.prompt_tokens if self.prompt_tokens else 0.0


class Engine:
    """A model served to many concurrent callers with continuous batching and prefix reuse.

    max_batch: sequences decoded together; max_queue: requests waiting beyond those (more fail fast
    with EngineOverloaded); cache_bytes: the KV block pool (default: most of the GPU memory left free
    after the weights and the largest step's activations, or 2 GiB on the CPU; see cache_plan.py);
    max_seq_len: tokens one sequence may hold (prompt and completion; reserves nothing, but at most
    what the pool holds); prefill_budget: prompt tokens computed per step, shared by new requests.
    eager: run the decode step as plain PyTorch (default: CUDA graphs captured at start-up on a GPU,
    fused kernels on the CPU). speculate: guess tokens from each sequence's own text (n-gram lookup,
    qgpt_code/speculative.py) and verify them as extra rows of the decode step, within max_batch rows.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 8,
        max_queue: int = 64,
        cache_bytes: int | None = None,
        max_seq_len: int | None = None,
        prefill_budget: int = 512,
        eager: bool = False,
        speculate: bool = False,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_budget < 1:
            raise QGPTError(f"max_batch must be at least 1 (got {max_batch}), max_queue at least 0 (got {max_queue}), "
                            f"prefill_budget at least 1 (got {prefill_budget})")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        args = loaded.model.args
        self.plan = plan_cache(loaded, cache_bytes, max_batch, prefill_budget, min(max_seq_len or DEFAULT_MAX_SEQ_LEN, args.max_seq_len))
        self.max_seq_len = self.plan.max_seq_len
        # The cache and its decode step: the model's own when free and large enough (graphs captured once
        # per model, see decode_step.acquire_runtime), else made now (cache allocated and zeroed off the
        # calling thread: see qgpt_code/fresh_thread.py; graphs captured now, on a GPU). A tensor-parallel
        # model builds its step on every rank (qgpt_code/distributed).
        self.runtime = acquire_runtime(loaded.model, self.plan.blocks, max_batch, self.max_seq_len, eager,
                                       make_cache=lambda *a: run_in_fresh_thread(KVCache, *a),
                                       build=getattr(loaded.model, "make_decode", None), exact=True)
        cache, decode = self.runtime.cache, self.runtime.decode
        self.pool = BlockPool(cache)
        self.scheduler = Scheduler(loaded.model, loaded.tokenizer, self.pool, max_batch, self.max_seq_len,
                                   prefill_budget, decode, speculate=speculate)
        self._lock = threading.Condition()
        self._incoming: deque[RequestHandle] = deque()
        self._handles: dict[int, RequestHandle] = {}  # sequence id -> handle, engine thread only
        self._submitted = self._finished = 0
        self._closed = False
        self.failure: str | None = None  # why the engine thread stopped, if it did (then submit raises)
        self._thread = threading.Thread(target=self._run, name="qgpt-engine", daemon=True)
        self._thread.start()

    # -- public API (any thread) -----------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request. Raises PromptTooLongError / EmptyPromptError for a prompt that cannot
        run and EngineOverloaded when the queue is full, both before anything is queued."""
        from qgpt_code.generation import fit_prompt

        fit_prompt(request.prompt_tokens, self.max_seq_len, request.params.truncate_prompt)
        handle = RequestHandle(self, request)
        with self._lock:
            if self.failure is not None:
                raise EngineFailed(f"the engine stopped: {self.failure}")
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if self._queued_locked() >= self.max_queue:
                raise EngineOverloaded(
                    f"server overloaded: {self._queued_locked()} requests already waiting (max_queue={self.max_queue})"
                )
            self._incoming.append(handle)
            self._submitted += 1
            self._lock.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle in self._incoming:  # never reached the scheduler
                self._incoming.remove(handle)
                handle._push(TokenEvent(None, "", finish_reason="cancelled"))
                self._finished += 1
            elif handle._sequence is not None and handle._sequence.abort_reason is None:
                handle._sequence.abort_reason = "cancelled"
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            pool, scheduler = self.pool, self.scheduler
            blocks = pool.counts()
            return EngineStats(
                requests_submitted=self._submitted, requests_finished=self._finished,
                running=len(scheduler.running), queued=self._queued_locked(),
                prefix_hits=scheduler.prefix_hits, prompt_tokens=scheduler.prompt_tokens,
                tokens_reused=scheduler.tokens_reused, tokens_computed=scheduler.tokens_computed,
                cache_bytes_in_use=pool.bytes_in_use, cache_bytes_capacity=pool.cache.nbytes,
                blocks_total=blocks["total"], blocks_used=blocks["used"], blocks_shared=blocks["shared"],
                blocks_cached=blocks["cached"], blocks_free=blocks["free"], block_size=pool.block_size,
                evictions=pool.evictions, preemptions=scheduler.preemptions,
                tokens_proposed=scheduler.tokens_proposed, tokens_accepted=scheduler.tokens_accepted,
            )

    def describe_cache(self) -> str:
        """One line for start-up: what the KV cache holds."""
        return self.plan.describe()

    def close(self) -> None:
        """Stop the engine thread; requests still running end with finish_reason "cancelled"."""
        with self._lock:
            self._closed = True
            for handle in list(self._incoming):
                handle._push(TokenEvent(None, "", finish_reason="cancelled"))
            self._incoming.clear()
            for handle in self._handles.values():
                if handle._sequence is not None:
                    handle._sequence.abort_reason = "cancelled"
            self._lock.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.runtime.release()  # the cache and graphs go back to the model for later callers

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- engine thread ---------------------------------------------------------------------------
    def _queued_locked(self) -> int:
        """Requests waiting beyond the batch: those not running yet, less the batch slots still free
        (a request submitted while a slot is free is about to run; counting it would refuse a second
        one that arrives before the engine thread has admitted the first)."""
        pending = len(self._incoming) + len(self.scheduler.waiting)
        return max(0, pending - (self.max_batch - len(self.scheduler.running)))

    def _run(self) -> None:
        """Serve rounds until closed. Whatever a round raises fails the requests it concerns and the
        engine keeps serving; only several failing rounds in a row stop it (`failure` says why)."""
        torch.set_grad_enabled(False)
        failures = 0
        while True:
            try:
                if not self._serve_round():
                    return
                failures = 0
            except Exception as exc:  # a bug or out-of-memory: fail the running requests, keep serving
                failures += 1
                self._fail_all(exc)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._stop_failed(f"{type(exc).__name__}: {exc}")
                    return

    def _serve_round(self) -> bool:
        """Admit what was submitted, run one scheduler step, deliver its events; False once closed."""
        with self._lock:
            while not self._incoming and not self.scheduler.has_work() and not self._closed:
                self._lock.wait()
            if self._closed and not self.scheduler.has_work():
                return False
            while self._incoming:
                handle = self._incoming.popleft()
                try:
                    self._start(handle)
                except Exception as exc:  # this request alone cannot run (submit() checked the prompt already)
                    self._fail(handle, str(exc) if isinstance(exc, QGPTError) else f"{type(exc).__name__}: {exc}")
        events = self.scheduler.step()
        with self._lock:  # handles are shared with cancel() and close()
            for seq, event in events:
                handle = self._handles.pop(seq.id) if event.finish_reason else self._handles[seq.id]
                handle.cached_tokens = seq.cached_tokens
                if handle.first_token_at is None:  # the instant its time limit counts from, not the delivery's
                    handle.first_token_at = seq.text.first_token_at
                if seq.speculation is not None:
                    handle.tokens_proposed, handle.tokens_accepted = seq.speculation.proposed, seq.speculation.accepted
                if seq.error is not None:
                    handle.error = seq.error
                handle._push(event)
                if event.finish_reason:
                    self._finished += 1
        return True

    def _start(self, handle: RequestHandle) -> None:
        request = handle.request
        deadline = None if request.timeout is None else handle.submitted_at + request.timeout
        seq = self.scheduler.add(request.prompt_tokens, request.params, deadline)
        handle.started_at = time.monotonic()
        handle._sequence = seq
        self._handles[seq.id] = handle

    def _fail_all(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        print(f"qgpt: engine error, failing {len(self._handles)} request(s): {message}", file=sys.stderr)
        with self._lock:
            self.scheduler.retire_all("error")
            for handle in self._handles.values():
                self._fail(handle, message)
            self._handles.clear()

    def _stop_failed(self, reason: str) -> None:
        """Give up: every request, queued or not, ends with an error, and later submits raise EngineFailed."""
        print(f"qgpt: engine stopped after {MAX_CONSECUTIVE_FAILURES} failing rounds in a row: {reason}",
              file=sys.stderr)
        with self._lock:
            self.failure = reason
            for handle in self._incoming:
                self._fail(handle, f"the engine stopped: {reason}")
            self._incoming.clear()

    def _fail(self, handle: RequestHandle, message: str) -> None:
        """End one request with finish_reason "error" and the reason in `handle.error`."""
        handle.error = message
        handle._push(TokenEvent(None, "", finish_reason="error"))
        self._finished += 1
