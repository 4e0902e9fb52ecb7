"""The engine under faults: whatever raises on its thread fails only the requests it concerns, no caller
is left waiting, and once it cannot go on it says so (submit raises, /health answers 503 with the reason)."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import pytest

from qgpt_code.engine import MAX_CONSECUTIVE_FAILURES, Engine, EngineFailed, Request
from qgpt_code.generation import SamplingParams, TextState, generate_text
from qgpt_code.kv_cache import BlockPool
from qgpt_code.scheduler import Scheduler

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
WAIT_S = 60  # far beyond what any request here needs: a caller still waiting then is a hang


class InjectedFault(RuntimeError):
    pass


def flaky(original, rng: random.Random, rate: float):
    """`original`, raising InjectedFault on entry with probability `rate`."""
    def wrapper(*args, **kwargs):
        if rng.random() < rate:
            raise InjectedFault("injected")
        return original(*args, **kwargs)
    return wrapper


def results_of(engine, prompts, params=GREEDY) -> list:
    """Every prompt submitted from its own thread; each caller's result, the EngineFailed its submit
    raised, or None if it hung."""
    results: list = [None] * len(prompts)

    def client(i: int) -> None:
        try:
            results[i] = engine.submit(Request(prompts[i], params)).result()
        except EngineFailed as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S)
    return results


INJECTION_POINTS = {
    "a whole step": (Scheduler, "step"),
    "admission": (Scheduler, "_admit"),
    "a prompt chunk": (Scheduler, "_prefill_chunk"),
    "a decode step": (Scheduler, "_decode"),
    "block bookkeeping": (BlockPool, "commit"),
    "starting a request": (Engine, "_start"),
    "one row's sampling": (TextState, "accept"),
}


@pytest.mark.parametrize("point", INJECTION_POINTS)
def test_faults_anywhere_in_the_loop_never_leave_a_caller_waiting(tiny_loaded, monkeypatch, point):
    owner, name = INJECTION_POINTS[point]
    monkeypatch.setattr(owner, name, flaky(getattr(owner, name), random.Random(point), rate=0.15))
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(5, 60))] for _ in range(12)]
    with Engine(tiny_loaded, max_batch=4, max_seq_len=256, cache_bytes=1 << 20) as engine:
        results = results_of(engine, prompts)
        assert all(r is not None for r in results), "a caller was left waiting"
        reasons = {"refused" if isinstance(r, EngineFailed) else r.finish_reason for r in results}
        assert reasons <= {"length", "stop", "error", "refused"}
        assert reasons & {"error", "refused"}  # the faults did strike
        monkeypatch.undo()  # faults over: the engine serves as before, or says why it cannot
        if engine.failure is None:
            prompt = prompts[0]
            again = engine.submit(Request(prompt, GREEDY)).result()
            assert again.tokens == generate_text(tiny_loaded, prompt, GREEDY).tokens
        else:
            with pytest.raises(EngineFailed):
                engine.submit(Request(prompts[0], GREEDY))


def test_one_rows_failure_stays_in_its_row(tiny_loaded, monkeypatch):
    """A sampling failure of one sequence (here: turning its token into text raises) ends it alone with
    an error; the others in the same batch finish with exactly the tokens they get alone."""
    doomed = [1, 99, 98, 97]
    sample = Scheduler._sample

    def sample_unless_doomed(self, seq, logits, events):
        if seq.prompt == doomed:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return sample(self, seq, logits, events)

    monkeypatch.setattr(Scheduler, "_sample", sample_unless_doomed)
    prompts = [[1, 5, 6, 7], doomed, [1, 40, 41, 42, 43, 44]]
    with Engine(tiny_loaded, max_batch=4, max_seq_len=256, cache_bytes=1 << 20) as engine:
        handles = [engine.submit(Request(p, GREEDY)) for p in prompts]
        results = [h.result() for h in handles]
        assert engine.failure is None
    assert results[1].finish_reason == "error" and "UnicodeDecodeError" in handles[1].error
    for i in (0, 2):
        assert results[i].tokens == generate_text(tiny_loaded, prompts[i], GREEDY).tokens and handles[i].error is None


def test_a_request_that_cannot_start_fails_alone(tiny_loaded):
    """A seed torch cannot take (2**64) fails that request with the reason; the engine goes on."""
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=1 << 20) as engine:
        bad = engine.submit(Request([1, 5, 6], SamplingParams(max_new_tokens=4, seed=2**64)))
        assert bad.result().finish_reason == "error" and bad.error
        good = engine.submit(Request([1, 5, 6], GREEDY)).result()
        assert good.finish_reason in ("length", "stop") and engine.failure is None


def test_a_consumer_whose_event_loop_closed_does_not_stop_the_engine(tiny_loaded):
    """An asyncio consumer that gave up (its loop closed while it waited) used to kill the engine thread
    on the next event: waking it raises RuntimeError."""
    long_run = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    with Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=1 << 20) as engine:
        handle = engine.submit(Request([1, 5, 6, 7], long_run))

        async def impatient():
            async def read_all():
                return [event async for event in handle]
            try:
                await asyncio.wait_for(read_all(), timeout=0.001)
            except asyncio.TimeoutError:
                pass

        asyncio.run(impatient())  # leaves a waiter registered on a loop that is now closed
        handle.cancel()
        after = engine.submit(Request([1, 8, 9], GREEDY)).result()
        assert after.finish_reason in ("length", "stop") and engine.failure is None


def test_an_engine_that_keeps_failing_stops_and_says_why(tiny_loaded, monkeypatch):
    from test_server_support import RunningServer

    from qgpt_code.server.settings import ServerSettings

    def broken(self):
        raise InjectedFault("device lost")

    engine = Engine(tiny_loaded, max_batch=2, max_seq_len=256, cache_bytes=1 << 20)
    server = RunningServer(engine, ServerSettings(model_id="t"))
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        monkeypatch.setattr(Scheduler, "step", broken)
        results = results_of(engine, [[1, 5, 6]] * (MAX_CONSECUTIVE_FAILURES + 2))
        assert all(isinstance(r, EngineFailed) or (r is not None and r.finish_reason == "error") for r in results)
        assert engine.failure == "InjectedFault: device lost"
        with pytest.raises(EngineFailed, match="device lost"):
            engine.submit(Request([1, 5], GREEDY))
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["error"] == "InjectedFault: device lost"
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": "t", "prompt": "x", "max_tokens": 2})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_failed"
    finally:
        server.close()
        engine.close()
