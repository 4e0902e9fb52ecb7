"""Run one-off heavy work (loading weights, allocating the KV cache) on a thread that then exits.

Why: libgomp, the OpenMP runtime under PyTorch's CPU kernels, gives every thread that runs a parallel
region its own pool of worker threads, kept until that thread exits; and once a process holds more
such workers than it has CPUs, every worker stops spinning between parallel regions and sleeps instead,
so each of the hundreds of small regions in a decode step pays a futex wake-up. A model loaded on the
main thread and then served from the engine's thread crossed that line on a 2-core machine and decoded
at half speed (10 against 20-24 tok/s). Work done on a thread that exits leaves no pool behind, so the
engine thread's pool is the only one.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread, waited for; its result, or its exception re-raised here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed to the caller, whatever it is
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"qgpt-{getattr(fn, '__name__', 'work')}", daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
