"""Prometheus metrics for one app, in a registry of its own (several apps may live in one process).

HTTP requests are counted by route template and status in an ASGI middleware; generations are
observed when they finish (tokens, time to first token, time per output token); the engine's own
gauges (queue depth, cache bytes) are read from `engine.stats()` at scrape time, so they are never stale.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qgpt_code.engine import Engine, RequestHandle

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("qgpt_http_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("qgpt_prompt_tokens", "Prompt tokens of finished generations", registry=registry)
        self.cached_tokens = Counter("qgpt_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=registry)
        self.completion_tokens = Counter("qgpt_completion_tokens", "Tokens generated", registry=registry)
        self.finished = Counter("qgpt_generations_finished", "Generations by finish reason", ["reason"],
                                registry=registry)
        self.ttft = Histogram("qgpt_time_to_first_token_seconds", "Submission to first token",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.per_token = Histogram("qgpt_time_per_output_token_seconds",
                                   "Mean time between a generation's tokens after the first",
                                   buckets=PER_TOKEN_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine))

    def generation_finished(self, handle: RequestHandle, reason: str) -> None:
        now = time.monotonic()
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(handle.prompt_tokens)
        self.cached_tokens.inc(handle.cached_tokens)
        self.completion_tokens.inc(handle.completion_tokens)
        if handle.first_token_at is not None:
            self.ttft.observe(handle.first_token_at - handle.submitted_at)
            if handle.completion_tokens > 1:
                self.per_token.observe((now - handle.first_token_at) / (handle.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Counts every HTTP response by the route that served it (templates keep the label set small)."""

        async def count(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = "no_response"  # the client left before an answer began

            async def sending(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = str(message["status"])
                await send(message)

            try:
                await app(scope, receive, sending)
            except Exception:
                if status == "no_response":
                    status = "500"  # answered by Starlette's outermost error middleware, beyond this one
                raise
            finally:
                route = scope.get("route")
                self.requests.labels(getattr(route, "path", "other"), status).inc()

        return count


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, help_text, value in (
            ("qgpt_queue_depth", "Requests waiting for a batch slot", stats.queued),
            ("qgpt_running_sequences", "Sequences in the running batch", stats.running),
            ("qgpt_kv_cache_bytes_in_use", "Key/value bytes held (running and cached prefixes)",
             stats.cache_bytes_in_use),
            ("qgpt_kv_cache_bytes_capacity", "Bytes of the KV block pool", stats.cache_bytes_capacity),
            ("qgpt_kv_blocks_total", f"KV blocks in the pool ({stats.block_size} tokens each)", stats.blocks_total),
            ("qgpt_kv_blocks_used", "KV blocks referenced by running sequences", stats.blocks_used),
            ("qgpt_kv_blocks_shared", "KV blocks referenced by more than one running sequence", stats.blocks_shared),
            ("qgpt_kv_blocks_cached", "KV blocks kept for later requests, referenced by none", stats.blocks_cached),
            ("qgpt_kv_blocks_free", "KV blocks holding nothing", stats.blocks_free),
            ("qgpt_prefix_cache_hit_rate", "Fraction of admitted prompt tokens served from the prefix cache",
             stats.prefix_hit_rate),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        for name, help_text, value in (
            ("qgpt_prefix_cache_hits", "Admitted requests that reused a cached prefix", stats.prefix_hits),
            ("qgpt_tokens_computed", "Tokens run through the model (prefill and decode)", stats.tokens_computed),
            ("qgpt_prefix_cache_evictions", "Cached KV blocks evicted for room", stats.evictions),
            ("qgpt_preemptions", "Running sequences sent back to wait when the block pool ran out", stats.preemptions),
            ("qgpt_speculative_tokens_proposed", "Guessed tokens verified by the model (speculation)",
             stats.tokens_proposed),
            ("qgpt_speculative_tokens_accepted", "Guessed tokens the model confirmed (each saved a step)",
             stats.tokens_accepted),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
